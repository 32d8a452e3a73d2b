"""Host-side facts every launcher needs, importable without triton: the interpreter switch,
the launch device and the accumulator dtype. (``manualbp`` reads them too, before anything
may import triton: importing triton fixes ``TRITON_INTERPRET`` for the process.)"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["FLOAT_DTYPES", "acc_dtype", "interpreting", "on_device"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET`` is read when triton is
    imported, so this is fixed for the process once it is)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulator dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for a launch when it is a CUDA device (Triton launches on the
    current device); a no-op otherwise."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
