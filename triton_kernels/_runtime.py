"""What every kernel module needs about where it runs: the host facts of :mod:`._host` and
their Triton-side forms (a constexpr for the interpreter, the accumulator as a ``tl`` dtype).

One home for these facts, shared by :mod:`.linear_forward`, :mod:`.linear_backward`,
:mod:`.mse` and :mod:`.sgd`.
"""

from __future__ import annotations

import torch
import triton.language as tl

from ._host import FLOAT_DTYPES, acc_dtype, interpreting, on_device

__all__ = [
    "INTERPRETER",
    "FLOAT_DTYPES",
    "acc_dtype",
    "interpreting",
    "on_device",
    "tl_acc_dtype",
]

# A constexpr for kernels: compiled GPU code never contains the interpreter-only branches.
INTERPRETER: tl.constexpr = tl.constexpr(interpreting())


def tl_acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """:func:`acc_dtype` as a Triton dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32
