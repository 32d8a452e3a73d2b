"""What every launcher needs to know about where it runs: the interpreter, the device, dtypes.

One home for these facts, shared by every kernel module (:mod:`.linear_forward`,
:mod:`.linear_backward`, :mod:`.mse`, :mod:`.sgd`).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton.language as tl

__all__ = [
    "INTERPRETER",
    "FLOAT_DTYPES",
    "acc_dtype",
    "interpreting",
    "on_device",
    "tl_acc_dtype",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET`` is read when triton is
    imported, so this is fixed for the process)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# A constexpr for kernels: compiled GPU code never contains the interpreter-only branches.
INTERPRETER: tl.constexpr = tl.constexpr(interpreting())


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulator dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """:func:`acc_dtype` as a Triton dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for a launch when it is a CUDA device (Triton launches on the
    current device); a no-op otherwise."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
