"""The reference path: the hand-derived math in plain torch ops, on any device.

It is what runs on CPU tensors, what the Triton kernels are tested against in
spirit (the tests use native autograd and float64 math as the oracle), and what
double backward differentiates through: every op here is itself differentiable.
"""

from manualbp.reference.linear import linear_backward, linear_forward
from manualbp.reference.mse import mse_backward, mse_forward

__all__ = ["linear_forward", "linear_backward", "mse_forward", "mse_backward"]
