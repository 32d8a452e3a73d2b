"""The ``nn.Module`` stand-ins for the built-in layers."""

from manualbp.modules.convert import convert
from manualbp.modules.fused_mlp import FusedMLP
from manualbp.modules.linear import Linear
from manualbp.modules.linear_mse import LinearMSELoss
from manualbp.modules.loss import MSELoss
from manualbp.modules.sequential import Sequential

__all__ = ["FusedMLP", "Linear", "LinearMSELoss", "MSELoss", "Sequential", "convert"]
