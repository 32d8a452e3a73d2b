"""manualbp: hand-written backprop for PyTorch.

Autograd Functions with hand-derived backward passes for the linear layer (bias
and fused activation) and the MSE loss, drop-in ``nn.Module`` stand-ins for
``nn.Linear`` and ``nn.MSELoss``, and Triton kernels on CUDA.
"""

# First: from a source checkout that was not installed, map triton_kernels/ to manualbp.kernels.
import manualbp._source_checkout  # noqa: F401  (isort: skip)
from manualbp import functional, modules, optim
from manualbp._mode import get_backend, set_backend, use_backend
from manualbp.activations import ACTIVATIONS, Sine
from manualbp.errors import ShapeError
from manualbp.modules import *  # noqa: F403  (every stand-in module, and convert)
from manualbp.ops.fused_mlp import FusedMLPFunction, FusedMLPGradFunction
from manualbp.ops.linear import LinearFunction
from manualbp.ops.linear_mse import LinearMSELossFunction
from manualbp.ops.mse import MSELossFunction
from manualbp.overrides import enable

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "FusedMLPFunction",
    "FusedMLPGradFunction",
    "LinearFunction",
    "LinearMSELossFunction",
    "MSELossFunction",
    "ShapeError",
    "Sine",
    "enable",
    "functional",
    "optim",
    "get_backend",
    "set_backend",
    "use_backend",
    *modules.__all__,
]
