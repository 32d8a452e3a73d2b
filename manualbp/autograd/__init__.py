"""The ``torch.autograd.Function`` subclasses with hand-written backward passes."""

from manualbp.autograd.linear import LinearFunction
from manualbp.autograd.linear_mse import LinearMSELossFunction
from manualbp.autograd.mse import MSELossFunction

__all__ = ["LinearFunction", "LinearMSELossFunction", "MSELossFunction"]
