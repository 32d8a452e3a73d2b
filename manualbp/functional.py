"""The functional API: every entry point of manualbp, one function per op.

Each checks its arguments the way native PyTorch does (shapes, dtypes, devices, options; shape
errors raise :class:`~manualbp.errors.ShapeError`, both a ``ValueError`` and the
``RuntimeError`` native PyTorch raises), honours autocast as the native op does, and runs its
op's ``autograd.Function`` (the hand-written backward). Where a graph is captured that cannot
hold a Python Function (``torch.export``, ``torch.jit.trace``), the same math runs as plain
differentiable torch ops, so the captured graph is made of native aten ops and trains as the
native model's does; ``torch.compile`` keeps the Functions. Each op lives in one file of
:mod:`manualbp.ops`, with its reference math and its Function.
"""

from manualbp.errors import ShapeError
from manualbp.ops.fused_mlp import fused_mlp, fused_mlp_mse_loss
from manualbp.ops.linear import linear
from manualbp.ops.linear_chain import linear_chain
from manualbp.ops.linear_mse import linear_mse_loss
from manualbp.ops.mse import mse_loss

__all__ = [
    "ShapeError",
    "fused_mlp",
    "fused_mlp_mse_loss",
    "linear",
    "linear_chain",
    "linear_mse_loss",
    "mse_loss",
]
