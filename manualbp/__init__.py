"""manualbp: hand-written backprop for PyTorch.

Autograd Functions with hand-derived backward passes for the linear layer (bias
and fused activation) and the MSE loss, drop-in ``nn.Module`` stand-ins for
``nn.Linear`` and ``nn.MSELoss``, and Triton kernels on CUDA.
"""

from manualbp import functional, optim
from manualbp.activations import ACTIVATIONS
from manualbp.autograd import LinearFunction, LinearMSELossFunction, MSELossFunction
from manualbp.dispatch import get_backend, set_backend, use_backend
from manualbp.modules import Linear, LinearMSELoss, MSELoss, Sequential, convert

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "Linear",
    "LinearFunction",
    "LinearMSELoss",
    "LinearMSELossFunction",
    "MSELoss",
    "MSELossFunction",
    "Sequential",
    "convert",
    "functional",
    "optim",
    "get_backend",
    "set_backend",
    "use_backend",
]
