"""Argument checks shared by the entry points: native PyTorch's errors, in its exception types
(shape mismatches raise :class:`~manualbp.errors.ShapeError`, a ``RuntimeError`` as natively
and a ``ValueError``, with native's wording first); each check changes nothing. And the
questions that send a call to native's own op instead (:func:`overrides_torch_function`,
:func:`linear_applies`, :func:`mse_applies`): where the hand-derived path does not apply,
native's op runs, with native's result or native's error, never a new one."""

from __future__ import annotations

import math
import warnings
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Parameter

from manualbp.activations import bind
from manualbp.errors import ShapeError

__all__ = ["PLAIN", "REDUCTIONS", "broadcast", "check_linear_args", "check_linear_dtypes",
           "check_reduction", "check_slope", "linear_applies", "mse_applies", "native_linear",
           "overrides_torch_function", "require_tensor", "same_device",
           "warn_if_sizes_differ"]  # fmt: skip

REDUCTIONS = ("mean", "sum", "none")
# The tensor types an entry point's fast path takes: no ``__torch_function__`` of their own
# (``type(t) in PLAIN`` is also cheaper than ``isinstance(t, Tensor)``, whose metaclass check
# costs a call).
PLAIN = (Tensor, Parameter)
_DISABLED = torch._C._disabled_torch_function_impl


def overrides_torch_function(*args: object) -> bool:
    """Whether PyTorch would hand a call on ``args`` to an argument's ``__torch_function__``: a
    tensor subclass that keeps it on (or any object that defines one). Such calls run native's
    op, so the subclass sees ``F.linear`` / ``F.mse_loss`` (and the activation) as natively and
    gets its own type back. ``Parameter``, ``DTensor`` and the fake and functional tensors of
    torch.compile / export switch it off, and stay on manualbp's path."""
    for a in args:
        cls = type(a)
        if cls is Tensor or cls is Parameter or a is None:
            continue
        if getattr(cls, "__torch_function__", _DISABLED) is not _DISABLED:
            return True
    return False


def native_linear(
    input: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None, slope: float
) -> Tensor:
    """Native's op for ``linear(...)``: ``F.linear``, then the activation's native function
    (``F.gelu``, ``torch.tanh``, ...), recorded by native autograd."""
    z = F.linear(input, weight, bias)
    act = bind(activation, slope)
    return z if act is None else act.forward(z)


def linear_applies(
    input: Tensor, weight: Tensor, bias: Tensor | None, cast: torch.dtype | None
) -> bool:
    """Whether the hand-derived Linear computes ``F.linear(input, weight, bias)`` (tensors
    already checked to be tensors; ``cast``: the autocast dtype, if on): a 2-D weight (or any
    but 1-D, which then raises a ShapeError), one device, and one floating dtype once autocast
    has cast them. Otherwise (a matrix-vector ``F.linear`` with a 1-D weight, integer or
    complex tensors, mixed dtypes or devices) native's op runs: its result, or its error."""
    if weight.dim() == 1:
        return False
    dtype = input.dtype
    if cast is None:  # the common case, inline
        if not (dtype.is_floating_point and weight.dtype is dtype
                and (bias is None or bias.dtype is dtype)):  # fmt: skip
            return False
    elif (
        not dtype.is_floating_point
        or len({_cast_dtype(t, cast) for t in (input, weight, bias) if t is not None}) != 1
    ):
        return False
    device = input.device
    return weight.device == device and (bias is None or bias.device == device)


def _cast_dtype(t: Tensor, cast: torch.dtype) -> torch.dtype:
    """The dtype ``t`` has once autocast casts it (``_mode.cast``'s rule, without casting)."""
    if not t.is_floating_point() or t.dtype == torch.float64:
        return t.dtype
    return cast


def mse_applies(input: Tensor, target: Tensor, reduction: object) -> bool:
    """Whether the hand-derived MSE computes ``F.mse_loss(input, target, reduction=reduction)``
    (tensors already checked to be tensors): a reduction of ``REDUCTIONS``, one device, and a
    floating dtype once promoted. Otherwise (``"elementwise_mean"``, which native maps to
    ``"mean"`` with a warning; an unknown reduction; integer, boolean or complex operands;
    another device) native's op runs: its result, or its error."""
    dtype = input.dtype
    return (
        reduction in REDUCTIONS
        and target.device == input.device
        and ((target.dtype is dtype and dtype.is_floating_point)
             or torch.promote_types(dtype, target.dtype).is_floating_point)
    )  # fmt: skip


def require_tensor(name: str, value: object, op: str, optional: bool = False) -> None:
    if not isinstance(value, Tensor) and not (optional and value is None):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")


def same_device(op: str, **tensors: Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    first = next(iter(present.values())).device
    if any(v.device != first for v in present.values()):
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise RuntimeError(f"{op}: expected all tensors on the same device, got {where}")


def check_slope(negative_slope: object) -> None:
    """``negative_slope`` must be a real number (not a bool): ``TypeError`` otherwise."""
    if (
        negative_slope is not None
        and type(negative_slope) is not float
        and (not isinstance(negative_slope, Real) or isinstance(negative_slope, bool))
    ):
        raise TypeError(
            f"linear: negative_slope must be a real number, got {type(negative_slope).__name__}"
        )


def check_linear_args(
    input: Tensor, weight: Tensor, bias: Tensor | None, negative_slope: object = None
) -> None:
    """Raise as ``F.linear`` would on what does not fit, native's words first (written for the
    per-call cost of small layers: the common case tests little)."""
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor)
            and (bias is None or isinstance(bias, Tensor))):  # fmt: skip
        require_tensor("input", input, "linear")
        require_tensor("weight", weight, "linear")
        require_tensor("bias", bias, "linear", optional=True)
    if negative_slope is not None:
        check_slope(negative_slope)
    if weight.ndim != 2:
        raise ShapeError(
            "linear: weight must be 2-D (out_features, in_features) (or 1-D, a matrix-vector "
            f"product), got shape {tuple(weight.shape)}"
        )
    in_shape, w_shape = input.shape, weight.shape
    if not in_shape:
        raise ShapeError(
            "linear: both arguments to linear need to be at least 1D, but they are 0D and 2D: "
            "input must have at least 1 dimension (*, in_features)"
        )
    if in_shape[-1] != w_shape[1]:
        rows = math.prod(in_shape[:-1])
        raise ShapeError(
            f"linear: mat1 and mat2 shapes cannot be multiplied ({rows}x{in_shape[-1]} and "
            f"{w_shape[1]}x{w_shape[0]}): input.shape[-1] ({in_shape[-1]}) must equal "
            f"in_features = weight.shape[1] ({w_shape[1]}); input {tuple(in_shape)}, "
            f"weight {tuple(w_shape)}"
        )
    if (
        bias is not None
        and bias.shape != w_shape[:1]
        and bias.ndim <= 1
        and bias.numel() not in (1, w_shape[0])
    ):
        raise ShapeError(
            f"linear: the expanded size of the tensor ({w_shape[0]}) must match the existing "
            f"size ({bias.numel()}) of bias: bias must have shape ({w_shape[0]},) = "
            f"(out_features,), got {tuple(bias.shape)}"
        )
    device = input.device
    if weight.device != device or (bias is not None and bias.device != device):
        same_device("linear", input=input, weight=weight, bias=bias)


def check_linear_dtypes(input: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Raise where the tensors are not of one floating dtype, in native's exception types:
    ``RuntimeError`` for mixed dtypes (as ``F.linear``), ``NotImplementedError`` (a
    ``RuntimeError``) for one dtype the hand-derived ops do not take."""
    dtype = input.dtype
    if dtype.is_floating_point and weight.dtype == dtype and (bias is None or bias.dtype == dtype):
        return
    dtypes = {"input": input.dtype, "weight": weight.dtype}
    if bias is not None:
        dtypes["bias"] = bias.dtype
    got = ", ".join(f"{k} {v}" for k, v in dtypes.items())
    if len(set(dtypes.values())) > 1:
        raise RuntimeError(
            f"linear: expected m1 and m2 to have the same dtype, but got: {got} (input, weight "
            "and bias must have one dtype)"
        )
    raise NotImplementedError(f"linear: not implemented for {dtype}: expected floating-point "
                              f"tensors, got {got}")  # fmt: skip


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
    """The broadcast shape of ``shape`` and ``target``, or a ShapeError in native's words (the
    first dimension from the right that does not fit, numbered in the broadcast shape)."""
    try:
        return torch.broadcast_shapes(shape, target)
    except RuntimeError:
        pass
    ndim = max(len(shape), len(target))
    for i in range(ndim - 1, -1, -1):
        offset = ndim - 1 - i
        a = shape[len(shape) - 1 - offset] if offset < len(shape) else 1
        b = target[len(target) - 1 - offset] if offset < len(target) else 1
        if a != b and a != 1 and b != 1:
            break
    raise ShapeError(
        f"{op}: the size of tensor a ({a}) must match the size of tensor b ({b}) at "
        f"non-singleton dimension {i}: {what} of shape {tuple(shape)} and target of shape "
        f"{tuple(target)} cannot be broadcast together"
    )
