"""Argument checks shared by the entry points: native PyTorch's errors, in its exception types
(shape mismatches raise :class:`~manualbp.errors.ShapeError`, a ``RuntimeError`` as natively
and a ``ValueError``); each check changes nothing."""

from __future__ import annotations

import warnings
from numbers import Real

import torch
from torch import Tensor

from manualbp.errors import ShapeError

__all__ = [
    "REDUCTIONS",
    "broadcast",
    "check_linear_args",
    "check_linear_dtypes",
    "check_reduction",
    "require_tensor",
    "same_device",
    "warn_if_sizes_differ",
]

REDUCTIONS = ("mean", "sum", "none")


def require_tensor(name: str, value: object, op: str, optional: bool = False) -> None:
    if not isinstance(value, Tensor) and not (optional and value is None):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")


def same_device(op: str, **tensors: Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    first = next(iter(present.values())).device
    if any(v.device != first for v in present.values()):
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise RuntimeError(f"{op}: expected all tensors on the same device, got {where}")


def check_linear_args(
    input: Tensor, weight: Tensor, bias: Tensor | None, negative_slope: object = None
) -> None:
    """Raise as ``F.linear`` would on what does not fit (written for the per-call cost of
    small layers: the common case tests little)."""
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor)
            and (bias is None or isinstance(bias, Tensor))):  # fmt: skip
        require_tensor("input", input, "linear")
        require_tensor("weight", weight, "linear")
        require_tensor("bias", bias, "linear", optional=True)
    if (
        negative_slope is not None
        and type(negative_slope) is not float
        and (not isinstance(negative_slope, Real) or isinstance(negative_slope, bool))
    ):
        raise TypeError(
            f"linear: negative_slope must be a real number, got {type(negative_slope).__name__}"
        )
    if weight.ndim != 2:
        raise ShapeError(
            "linear: weight must be 2-D (out_features, in_features), "
            f"got shape {tuple(weight.shape)}"
        )
    in_shape, w_shape = input.shape, weight.shape
    if not in_shape:
        raise ShapeError("linear: input must have at least 1 dimension (*, in_features), got 0-D")
    if in_shape[-1] != w_shape[1]:
        raise ShapeError(
            f"linear: input.shape[-1] ({in_shape[-1]}) must equal in_features = "
            f"weight.shape[1] ({w_shape[1]}); input {tuple(in_shape)}, weight {tuple(w_shape)}"
        )
    if (
        bias is not None
        and bias.shape != w_shape[:1]
        and bias.ndim <= 1
        and bias.numel() not in (1, w_shape[0])
    ):
        raise ShapeError(
            f"linear: bias must have shape ({w_shape[0]},) = (out_features,), "
            f"got {tuple(bias.shape)}"
        )
    device = input.device
    if weight.device != device or (bias is not None and bias.device != device):
        same_device("linear", input=input, weight=weight, bias=bias)


def check_linear_dtypes(input: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    dtype = input.dtype
    if dtype.is_floating_point and weight.dtype == dtype and (bias is None or bias.dtype == dtype):
        return
    dtypes = {"input": input.dtype, "weight": weight.dtype}
    if bias is not None:
        dtypes["bias"] = bias.dtype
    if not input.dtype.is_floating_point or len(set(dtypes.values())) > 1:
        got = ", ".join(f"{k} {v}" for k, v in dtypes.items())
        raise TypeError(f"linear: expected floating-point tensors of one dtype, got {got}")


def check_reduction(reduction: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")


def warn_if_sizes_differ(input_size: torch.Size, target_size: torch.Size, stacklevel: int) -> None:
    if target_size != input_size:
        warnings.warn(
            f"Using a target size ({target_size}) that is different to the input size "
            f"({input_size}). This will likely lead to incorrect results due to "
            "broadcasting. Please ensure they have the same size.",
            stacklevel=stacklevel + 1,
        )


def broadcast(op: str, what: str, shape: torch.Size, target: torch.Size) -> torch.Size:
    try:
        return torch.broadcast_shapes(shape, target)
    except RuntimeError as e:
        raise ShapeError(
            f"{op}: {what} of shape {tuple(shape)} and target of shape {tuple(target)} "
            f"cannot be broadcast together ({e})"
        ) from None
