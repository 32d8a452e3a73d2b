"""What every kernel module needs about where it runs: the host facts of :mod:`._host` and
their Triton-side forms (a constexpr for the interpreter, the accumulator as a ``tl`` dtype).

One home for these facts, shared by :mod:`.linear_forward`, :mod:`.linear_backward`,
:mod:`.mse` and :mod:`.sgd`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import FLOAT_DTYPES, acc_dtype, interpreting, on_device

__all__ = [
    "INTERPRETER",
    "FLOAT_DTYPES",
    "acc_dtype",
    "interpreting",
    "load",
    "on_device",
    "store",
    "tl_acc_dtype",
]

# A constexpr for kernels: compiled GPU code never contains the interpreter-only branches.
INTERPRETER: tl.constexpr = tl.constexpr(interpreting())


def tl_acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """:func:`acc_dtype` as a Triton dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def load(ptr, off, mask, ACC: tl.constexpr, MASKED: tl.constexpr):
    """``ptr[off]`` converted to ``ACC``; masked (other 0) only when ``MASKED``, so full
    blocks of aligned contiguous data compile to vector loads."""
    v = tl.load(ptr + off, mask=mask, other=0.0) if MASKED else tl.load(ptr + off)
    return v.to(ACC)


@triton.jit
def store(ptr, off, value, mask, MASKED: tl.constexpr):
    """``ptr[off] = value`` cast to ``ptr``'s dtype; masked only when ``MASKED``."""
    if MASKED:
        tl.store(ptr + off, value.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + off, value.to(ptr.dtype.element_ty))
