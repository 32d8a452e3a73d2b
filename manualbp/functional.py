"""The functional API: validated entry points over the autograd Functions.

``linear`` and ``mse_loss`` check their arguments the way native PyTorch does
(shapes, dtypes, devices, options), honour autocast like the native ops, and
then run :class:`~manualbp.LinearFunction` / :class:`~manualbp.MSELossFunction`.
"""

from __future__ import annotations

import contextlib
import warnings
from numbers import Real

import torch
from torch import Tensor

from manualbp.activations import get_activation
from manualbp.autograd._eager import function_for
from manualbp.autograd.linear import LinearFunction, LinearFunctionEager, as_rows
from manualbp.autograd.linear_mse import LinearMSELossFunction, default_chunk_rows
from manualbp.autograd.mse import MSELossFunction, MSELossFunctionEager
from manualbp.dispatch import backend_for

__all__ = ["linear", "linear_mse_loss", "mse_loss"]

REDUCTIONS = ("mean", "sum", "none")


def _require_tensor(name: str, value: object, op: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")


def _check_same_device(op: str, **tensors: Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise RuntimeError(f"{op}: expected all tensors on the same device, got {where}")


def _check_linear_args(
    input: Tensor, weight: Tensor, bias: Tensor | None, negative_slope: float
) -> None:
    _require_tensor("input", input, "linear")
    _require_tensor("weight", weight, "linear")
    if bias is not None:
        _require_tensor("bias", bias, "linear")
    if not isinstance(negative_slope, Real) or isinstance(negative_slope, bool):
        raise TypeError(
            f"linear: negative_slope must be a real number, got {type(negative_slope).__name__}"
        )
    if weight.dim() != 2:
        raise ValueError(
            "linear: weight must be 2-D (out_features, in_features), "
            f"got shape {tuple(weight.shape)}"
        )
    if input.dim() < 1:
        raise ValueError("linear: input must have at least 1 dimension (*, in_features), got 0-D")
    if input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: input.shape[-1] ({input.shape[-1]}) must equal in_features = "
            f"weight.shape[1] ({weight.shape[1]}); input {tuple(input.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"linear: bias must have shape ({weight.shape[0]},) = (out_features,), "
            f"got {tuple(bias.shape)}"
        )
    _check_same_device("linear", input=input, weight=weight, bias=bias)


def _check_linear_dtypes(input: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    dtypes = {"input": input.dtype, "weight": weight.dtype}
    if bias is not None:
        dtypes["bias"] = bias.dtype
    if not input.dtype.is_floating_point or len(set(dtypes.values())) > 1:
        got = ", ".join(f"{k} {v}" for k, v in dtypes.items())
        raise TypeError(f"linear: expected floating-point tensors of one dtype, got {got}")


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_cast(cast: torch.dtype | None, *tensors: Tensor | None) -> tuple:
    """``tensors`` as autocast casts them for a lower-precision op: every floating tensor but
    float64 goes to the autocast dtype ``cast`` (no-op when autocast is off)."""
    if cast is None:
        return tensors
    return tuple(
        t.to(cast) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    *,
    negative_slope: float = 0.01,
) -> Tensor:
    r"""``act(input @ weight.T + bias)`` with a hand-written backward.

    Args:
        input: ``(*, in_features)``, rank >= 1 (a 1-D input gives a 1-D output).
        weight: ``(out_features, in_features)``, the ``nn.Linear`` layout.
        bias: ``(out_features,)`` or ``None``.
        activation: ``None``, ``"relu"``, ``"gelu"`` (exact erf form, as ``nn.GELU()``),
            ``"gelu_tanh"`` (as ``nn.GELU(approximate="tanh")``), ``"silu"``, ``"tanh"``,
            ``"sigmoid"`` or ``"leaky_relu"``.
        negative_slope: slope of ``"leaky_relu"`` for negative inputs.

    Returns:
        ``(*, out_features)``. Under autocast it computes in the autocast dtype, as
        ``F.linear`` does.
    """
    _check_linear_args(input, weight, bias, negative_slope)
    get_activation(activation)
    cast = _autocast_dtype(input.device.type)
    input, weight, bias = _autocast_cast(cast, input, weight, bias)
    _check_linear_dtypes(input, weight, bias)
    with torch.autocast(input.device.type, enabled=False) if cast else contextlib.nullcontext():
        return _linear(input, weight, bias, activation, float(negative_slope))


def _linear(input, weight, bias, activation, negative_slope) -> Tensor:
    if torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        fn = function_for(LinearFunction, LinearFunctionEager)
        return fn.apply(input, weight, bias, activation, negative_slope)[0]
    # No graph to record: skip the Function and keep no pre-activation.
    y, _ = backend_for(input, weight, bias).linear_forward(
        input, weight, bias, get_activation(activation), negative_slope, store_preact=False
    )
    return y


def _check_reduction(reduction: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")


def _warn_if_sizes_differ(input_size: torch.Size, target_size: torch.Size) -> None:
    if target_size != input_size:
        warnings.warn(
            f"Using a target size ({target_size}) that is different to the input size "
            f"({input_size}). This will likely lead to incorrect results due to "
            "broadcasting. Please ensure they have the same size.",
            stacklevel=3,
        )


def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    r"""Mean squared error with a hand-written backward; the semantics of ``F.mse_loss``.

    ``reduction``: ``"mean"`` (default), ``"sum"`` or ``"none"``. ``input`` and
    ``target`` broadcast against each other (with the same ``UserWarning`` as
    ``F.mse_loss`` when their sizes differ) and promote to a common dtype; a target
    that requires grad gets a gradient. Under autocast it computes in float32.
    """
    _require_tensor("input", input, "mse_loss")
    _require_tensor("target", target, "mse_loss")
    _check_reduction(reduction)
    if input.shape != target.shape:
        _warn_if_sizes_differ(input.size(), target.size())
        try:
            torch.broadcast_shapes(input.shape, target.shape)
        except RuntimeError as e:
            raise ValueError(
                f"mse_loss: input of shape {tuple(input.shape)} and target of shape "
                f"{tuple(target.shape)} cannot be broadcast together ({e})"
            ) from None
    if not torch.promote_types(input.dtype, target.dtype).is_floating_point:
        raise TypeError(
            f"mse_loss: expected a floating-point input or target, got {input.dtype} "
            f"and {target.dtype}"
        )
    _check_same_device("mse_loss", input=input, target=target)
    if _autocast_dtype(input.device.type) is not None:
        # Autocast runs mse_loss in float32, widening lower-precision floats.
        input, target = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
                         for t in (input, target))  # fmt: skip
    if torch.is_grad_enabled() and (input.requires_grad or target.requires_grad):
        fn = function_for(MSELossFunction, MSELossFunctionEager)
        return fn.apply(input, target, reduction)[0]
    return MSELossFunction.forward(input, target, reduction)[0]


def linear_mse_loss(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    reduction: str = "mean",
    *,
    chunk_rows: int | None = None,
) -> Tensor:
    r"""``mse_loss(linear(input, weight, bias), target, reduction)`` as one memory-lean op.

    Equal to ``F.mse_loss(F.linear(input, weight, bias), target, reduction=reduction)``
    (with its size warning), but the prediction ``ŷ = input @ weight.T + bias`` is made
    ``chunk_rows`` rows at a time and never kept: for ``"mean"``/``"sum"`` in float32 and
    float64 the gradients for ``input``, ``weight`` and ``bias`` are computed during the
    forward pass and backward only scales them; for ``"none"``, and in float16/bfloat16
    (autocast included), backward recomputes ``ŷ`` chunk by chunk instead, so that the
    upstream gradient (per element, or a GradScaler's scale) is applied before rounding,
    exactly as native autograd does.

    When it helps: wide outputs (``out_features`` >> ``in_features``, e.g. N >= 4096), where
    ``ŷ`` and ``dL/dŷ`` (each tokens x N) dominate the memory of the unfused pair. When it
    does not: narrow outputs, where ``ŷ`` is small anyway and the chunked GEMMs are less
    efficient than one large one; and a target that requires grad, or ``target`` of another
    dtype than ``input``, which take the unfused path (same result, no memory saving).

    Args:
        input: ``(*, in_features)``; weight: ``(out_features, in_features)``;
        bias: ``(out_features,)`` or None; target: broadcastable to ``(*, out_features)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        chunk_rows: rows of ``ŷ`` per chunk; default about ``rows / ceil(N / K)``, so a chunk
            is about the size of ``input``.
    """
    _check_linear_args(input, weight, bias, 0.01)
    _require_tensor("target", target, "linear_mse_loss")
    _check_reduction(reduction)
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"linear_mse_loss: chunk_rows must be a positive int, got {chunk_rows!r}")
    out_shape = torch.Size((*input.shape[:-1], weight.shape[0]))
    _warn_if_sizes_differ(out_shape, target.size())
    try:
        shape = torch.broadcast_shapes(out_shape, target.shape)
    except RuntimeError as e:
        raise ValueError(
            f"linear_mse_loss: output of shape {tuple(out_shape)} and target of shape "
            f"{tuple(target.shape)} cannot be broadcast together ({e})"
        ) from None
    _check_same_device("linear_mse_loss", input=input, weight=weight, bias=bias, target=target)
    cast = _autocast_dtype(input.device.type)
    input, weight, bias = _autocast_cast(cast, input, weight, bias)
    _check_linear_dtypes(input, weight, bias)
    loss_dtype = torch.float32 if cast is not None and input.dtype != torch.float64 else None
    if (
        shape != out_shape  # the target broadcasts the prediction: not a per-row op
        or target.requires_grad
        or (loss_dtype is None and target.dtype != input.dtype)
    ):
        with torch.autocast(input.device.type, enabled=False):
            y = _linear(input, weight, bias, None, 0.01)
            return mse_loss(y if loss_dtype is None else y.float(), target, reduction)
    loss_dtype = loss_dtype or input.dtype
    x = as_rows(input)
    t = as_rows(target.expand(out_shape))
    rows = chunk_rows or default_chunk_rows(x.shape[0], weight.shape[1], weight.shape[0])
    with torch.autocast(input.device.type, enabled=False):
        if torch.is_grad_enabled() and any(
            p is not None and p.requires_grad for p in (input, weight, bias)
        ):
            loss = LinearMSELossFunction.apply(x, weight, bias, t, reduction, loss_dtype, rows)[0]
        else:
            loss = LinearMSELossFunction.forward(x, weight, bias, t, reduction, loss_dtype, rows)[0]
    return loss.view(out_shape) if reduction == "none" else loss
