"""Autocast as ``F.linear`` meets it, in one place for every manualbp entry point.

Under ``torch.autocast`` a lower-precision op (``F.linear``) computes in the autocast dtype:
every floating tensor but float64 is cast to it. manualbp's entry points cast their tensors
the same way (:func:`cast`) and then compute with autocast switched off (:func:`off`), so the
dtypes they chose stand.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

__all__ = ["cast", "dtype_for", "dtype_of", "off"]


def dtype_for(device_type: str) -> torch.dtype | None:
    """The autocast dtype for ``device_type``, or ``None`` where autocast is off (only CUDA
    and CPU have one)."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def dtype_of(t: Tensor) -> torch.dtype | None:
    """:func:`dtype_for` ``t``'s device, without making a device object."""
    if not torch._C._is_any_autocast_enabled():  # the common case, in one call
        return None
    if t.is_cuda:
        return dtype_for("cuda")
    return dtype_for("cpu") if t.is_cpu else None


def cast(dtype: torch.dtype | None, *tensors: Tensor | None) -> tuple:
    """``tensors`` as autocast casts them for a lower-precision op: every floating tensor but
    float64 goes to ``dtype`` (no-op when autocast is off, ``dtype`` None)."""
    if dtype is None:
        return tensors
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def off(device_type: str, dtype: torch.dtype | None) -> Any:
    """Autocast switched off for ``device_type`` while manualbp computes in the dtypes it
    chose, entered only where autocast is on (``dtype``): not every device type has one."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
