"""The functional API: validated entry points over the autograd Functions.

``linear`` and ``mse_loss`` check their arguments the way native PyTorch does
(shapes, dtypes, devices, options), honour autocast like the native ops, and
then run :class:`~manualbp.LinearFunction` / :class:`~manualbp.MSELossFunction`.
Shape errors raise :class:`~manualbp.errors.ShapeError`, both a ``ValueError`` and the
``RuntimeError`` native PyTorch raises.

Where a graph is captured that cannot hold a Python ``autograd.Function``
(``torch.export``, ``torch.jit.trace``), the same math runs as plain differentiable torch
ops, so the captured graph is made of native aten ops and trains exactly as the native
model's does. ``torch.compile`` keeps the Functions and their hand-written backward.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from numbers import Real

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from manualbp import _autocast as autocast
from manualbp.activations import ACTIVATIONS, get_activation
from manualbp.autograd._eager import _unwrap_if_dead, grad_enabled, transforms_active
from manualbp.autograd.linear import LINEAR, as_rows
from manualbp.autograd.linear_mse import HEAD, default_chunk_rows, head_loss
from manualbp.autograd.mse import MSE, MSELossFunction, broadcast_promoted
from manualbp.backends.reference import REFERENCE
from manualbp.backends.sharding import any_dtensor
from manualbp.dispatch import backend_for
from manualbp.errors import ShapeError

__all__ = ["ShapeError", "linear", "linear_mse_loss", "mse_loss"]

DEFAULT_SLOPE = 0.01  # leaky_relu's, as in F.leaky_relu (unused without that activation)
REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# Which Function runs, or none
# --------------------------------------------------------------------------------------------
def _captured() -> bool:
    """Whether ``torch.export`` or ``torch.jit.trace`` records this call. Neither keeps a
    Python autograd.Function: export records its forward under no_grad (the exported program
    would have no gradient), jit.trace records an opaque Python op it cannot save (and its
    check re-traces under no_grad, where manualbp takes another path). manualbp then runs
    plain differentiable torch ops, which both record as native aten ops."""
    return torch.compiler.is_exporting() or _jit_tracing()


def _jit_tracing() -> bool:
    """``torch.jit.is_tracing()``, read from the tracer's state directly outside torch.compile
    (which cannot trace that read, and never runs under the JIT tracer)."""
    return not torch.compiler.is_compiling() and torch._C._is_tracing()


def _records(*tensors: Tensor | None) -> bool:
    """Whether autograd records this call (or forward-mode AD is on): a Function is needed."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return fwAD._current_level >= 0  # inside fwAD.dual_level(): the Functions' jvp


# The other state reads of _plain_eager, bound once (no attribute look-ups per call).
_function_mode_on = torch._C._is_torch_function_mode_enabled
_autocast_on = torch._C._is_any_autocast_enabled
_compiling = torch.compiler.is_compiling
_jit_trace_state = torch._C._is_tracing


def _plain_eager(a: Tensor, b: Tensor, c: Tensor | None = None) -> bool:
    """Whether plain eager autograd records a call on ``a``, ``b`` (and ``c``) and nothing
    else is on: grad mode with one of them requiring grad, and no torch.compile,
    torch.export, torch.jit.trace, torch.func transform, forward-mode AD, autocast or
    TorchFunctionMode. Where the call's arguments are also of the common kind, an entry
    point's fast path then applies its Function's eager form at once: the per-call cost of
    small layers. (torch.export sets torch.compile's flag too, strict or not.)"""
    if (
        not grad_enabled()
        or _function_mode_on()
        or _autocast_on()
        or transforms_active()
        or fwAD._current_level >= 0
        or _compiling()
        or _jit_trace_state()  # read only outside torch.compile, which cannot trace it
    ):
        return False
    return a.requires_grad or b.requires_grad or (c is not None and c.requires_grad)


# Set while a manualbp entry point runs with a TorchFunctionMode on: manualbp.enable()'s mode
# (manualbp/overrides.py) then leaves the F.linear / F.mse_loss calls manualbp makes itself to
# PyTorch. A plain module global, as dispatch's backend choice, so torch.compile can trace it
# (so shared by threads: while one thread runs a manualbp op under a mode, a call another
# thread routes meanwhile runs natively, with the same result).
_routing_paused = False


def _entry_point(fn: Callable) -> Callable:
    """``fn`` (a public op) run with manualbp.enable()'s routing paused, when a mode is on
    (and without the TracerWarnings of its argument checks under torch.jit.trace)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _routing_paused
        if _jit_tracing():
            # The argument checks compare traced sizes: not data flow, so no TracerWarning.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                return fn(*args, **kwargs)
        if _routing_paused or not torch._C._is_torch_function_mode_enabled():
            return fn(*args, **kwargs)
        _routing_paused = True
        try:
            return fn(*args, **kwargs)
        finally:
            _routing_paused = False

    return wrapper


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------
def _require_tensor(name: str, value: object, op: str, optional: bool = False) -> None:
    if not isinstance(value, Tensor) and not (optional and value is None):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")


def _check_same_device(op: str, **tensors: Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    first = next(iter(present.values())).device
    if any(v.device != first for v in present.values()):
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise RuntimeError(f"{op}: expected all tensors on the same device, got {where}")


def _check_linear_args(
    input: Tensor, weight: Tensor, bias: Tensor | None, negative_slope: float | None = None
) -> None:
    """Raise as ``F.linear`` would on what does not fit (written for the per-call cost of
    small layers: the common case tests little)."""
    if not (
        isinstance(input, Tensor)
        and isinstance(weight, Tensor)
        and (bias is None or isinstance(bias, Tensor))
    ):
        _require_tensor("input", input, "linear")
        _require_tensor("weight", weight, "linear")
        _require_tensor("bias", bias, "linear", optional=True)
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
            f"weight.shape[1] ({w_shape[1]}); input {tuple(in_shape)}, "
            f"weight {tuple(w_shape)}"
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
        _check_same_device("linear", input=input, weight=weight, bias=bias)


def _check_linear_dtypes(input: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    dtype = input.dtype
    if dtype.is_floating_point and weight.dtype == dtype and (bias is None or bias.dtype == dtype):
        return
    dtypes = {"input": input.dtype, "weight": weight.dtype}
    if bias is not None:
        dtypes["bias"] = bias.dtype
    if not input.dtype.is_floating_point or len(set(dtypes.values())) > 1:
        got = ", ".join(f"{k} {v}" for k, v in dtypes.items())
        raise TypeError(f"linear: expected floating-point tensors of one dtype, got {got}")


def _check_reduction(reduction: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")


def _warn_if_sizes_differ(input_size: torch.Size, target_size: torch.Size, stacklevel: int):
    if target_size != input_size:
        warnings.warn(
            f"Using a target size ({target_size}) that is different to the input size "
            f"({input_size}). This will likely lead to incorrect results due to "
            "broadcasting. Please ensure they have the same size.",
            stacklevel=stacklevel + 1,
        )


def _broadcast(op: str, what: str, shape: torch.Size, target: torch.Size) -> torch.Size:
    try:
        return torch.broadcast_shapes(shape, target)
    except RuntimeError as e:
        raise ShapeError(
            f"{op}: {what} of shape {tuple(shape)} and target of shape {tuple(target)} "
            f"cannot be broadcast together ({e})"
        ) from None


# --------------------------------------------------------------------------------------------
# Bias shapes and autocast
# --------------------------------------------------------------------------------------------
def _is_vector_bias(bias: Tensor | None, out_features: int) -> bool:
    """Whether ``bias`` is ``nn.Linear``'s bias as ``F.linear`` broadcasts it for every input:
    shape (), (1,), (N,) or (1, N). Any other shape goes to ``F.linear`` itself."""
    if bias is None:
        return True
    if bias.dim() <= 1:
        return bias.numel() in (1, out_features)
    return bias.shape == (1, out_features)


def _as_vector(bias: Tensor | None, out_features: int) -> Tensor | None:
    """A vector bias as the (N,) the Functions take; its gradient sums back to its shape."""
    if bias is None or bias.shape == (out_features,):
        return bias
    return bias.reshape(-1).expand(out_features)


# --------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------
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
        bias: ``(out_features,)`` or ``None``; also ``()``, ``(1,)`` and ``(1, out_features)``
            (the gradient is summed to the bias's shape, as natively). A bias of any other
            shape that ``F.linear`` broadcasts (``(rows, out_features)`` for 2-D input, say)
            runs through ``F.linear`` itself, with native autograd, or fails as it does.
        activation: ``None``, ``"relu"``, ``"gelu"`` (exact erf form, as ``nn.GELU()``),
            ``"gelu_tanh"`` (as ``nn.GELU(approximate="tanh")``), ``"silu"``, ``"tanh"``,
            ``"sigmoid"`` or ``"leaky_relu"``.
        negative_slope: slope of ``"leaky_relu"`` for negative inputs.

    Returns:
        ``(*, out_features)``. Under autocast it computes in the autocast dtype, as
        ``F.linear`` does.

    Raises:
        ShapeError: (a ``ValueError`` and a ``RuntimeError``) on shapes that do not fit.
    """
    if (
        isinstance(input, Tensor)
        and isinstance(weight, Tensor)
        and (bias is None or isinstance(bias, Tensor))
        and _plain_eager(input, weight, bias)  # first: under torch.jit.trace, no size compared
        and (activation is None or (type(activation) is str and activation in ACTIVATIONS))
        and type(negative_slope) is float
        and (dtype := input.dtype).is_floating_point
        and weight.dtype is dtype
        and weight.dim() == 2
        and input.dim() != 0
        and input.shape[-1] == (w_shape := weight.shape)[1]
        and (device := input.device) == weight.device
        and (
            bias is None
            or (bias.dtype is dtype and bias.shape == w_shape[:1] and bias.device == device)
        )
    ):
        # The fast path: valid arguments, a vector bias, plain eager autograd.
        return LINEAR.eager_apply(
            _unwrap_if_dead(input), _unwrap_if_dead(weight),
            None if bias is None else _unwrap_if_dead(bias), activation, negative_slope,
        )  # fmt: skip
    return _linear_checked(input, weight, bias, activation, negative_slope)


@_entry_point
def _linear_checked(input, weight, bias, activation, negative_slope) -> Tensor:
    """:func:`linear`, every argument checked, every path."""
    _check_linear_args(input, weight, bias, negative_slope)
    get_activation(activation)
    cast = autocast.dtype_of(input)
    if cast is None:  # the common case: no context to enter
        _check_linear_dtypes(input, weight, bias)
        return _linear(input, weight, bias, activation, float(negative_slope))
    device_type = input.device.type
    input, weight, bias = autocast.cast(cast, input, weight, bias)
    _check_linear_dtypes(input, weight, bias)
    with autocast.off(device_type, cast):
        return _linear(input, weight, bias, activation, float(negative_slope))


def _linear(input, weight, bias, activation, negative_slope) -> Tensor:
    out_features = weight.shape[0]
    vector_bias = bias is None or bias.shape == (out_features,)
    if not (vector_bias or _is_vector_bias(bias, out_features)) or _captured():
        # Plain ops (F.linear, then the activation) for native autograd to record.
        return REFERENCE.linear_forward(
            input, weight, bias, get_activation(activation), negative_slope, store_preact=False
        )[0]
    bias = _as_vector(bias, out_features)
    if _records(input, weight, bias):
        return LINEAR.first(input, weight, bias, activation, negative_slope)
    # No graph to record: skip the Function and keep no pre-activation.
    y, _ = backend_for(input, weight, bias).linear_forward(
        input, weight, bias, get_activation(activation), negative_slope, store_preact=False
    )
    return y


# --------------------------------------------------------------------------------------------
# mse_loss
# --------------------------------------------------------------------------------------------
def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    r"""Mean squared error with a hand-written backward; the semantics of ``F.mse_loss``.

    ``reduction``: ``"mean"`` (default), ``"sum"`` or ``"none"``. ``input`` and
    ``target`` broadcast against each other (with the same ``UserWarning`` as
    ``F.mse_loss`` when their sizes differ; :class:`ShapeError` when they cannot) and
    promote to a common dtype; a target that requires grad gets a gradient. Under autocast
    it computes in float32.
    """
    if (
        isinstance(input, Tensor)
        and isinstance(target, Tensor)
        and _plain_eager(input, target)  # first: under torch.jit.trace, no size compared
        and reduction in REDUCTIONS
        and input.dtype is target.dtype
        and input.dtype.is_floating_point
        and input.shape == target.shape
        # Devices: a CPU input with a target elsewhere runs aten's op, which refuses as
        # F.mse_loss does; on the GPU the kernels need them equal.
        and (not input.is_cuda or input.device == target.device)
    ):
        # The fast path: valid arguments of one shape and dtype, plain eager autograd.
        return MSE.eager_apply(_unwrap_if_dead(input), _unwrap_if_dead(target), reduction)
    return _mse_loss_checked(input, target, reduction)


@_entry_point
def _mse_loss_checked(input: Tensor, target: Tensor, reduction: str) -> Tensor:
    """:func:`mse_loss`, every argument checked, every path."""
    if not (isinstance(input, Tensor) and isinstance(target, Tensor)):
        _require_tensor("input", input, "mse_loss")
        _require_tensor("target", target, "mse_loss")
    _check_reduction(reduction)
    if input.shape != target.shape:
        _warn_if_sizes_differ(input.size(), target.size(), stacklevel=4)
        _broadcast("mse_loss", "input", input.shape, target.shape)
    dtype = input.dtype
    if (
        not (dtype.is_floating_point and target.dtype == dtype)
        and not torch.promote_types(dtype, target.dtype).is_floating_point
    ):
        raise TypeError(
            f"mse_loss: expected a floating-point input or target, got {input.dtype} "
            f"and {target.dtype}"
        )
    if target.device != input.device:
        _check_same_device("mse_loss", input=input, target=target)
    if autocast.dtype_of(input) is not None:
        # Autocast runs mse_loss in float32, widening lower-precision floats.
        input, target = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
                         for t in (input, target))  # fmt: skip
    return _mse_loss(input, target, reduction)


def _mse_loss(input: Tensor, target: Tensor, reduction: str) -> Tensor:
    if _captured():
        return REFERENCE.mse_forward(*broadcast_promoted(input, target), reduction)[0]
    if _records(input, target):
        return MSE.first(input, target, reduction)
    return MSELossFunction.forward(input, target, reduction)[0]


# --------------------------------------------------------------------------------------------
# linear_mse_loss
# --------------------------------------------------------------------------------------------
@_entry_point
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
    exactly as native autograd does. Without a graph to record (``no_grad``,
    ``inference_mode``) it computes the loss alone, with no gradient buffer.

    When it helps: wide outputs (``out_features`` >> ``in_features``, e.g. N >= 4096), where
    ``ŷ`` and ``dL/dŷ`` (each tokens x N) dominate the memory of the unfused pair. When it
    does not: narrow outputs, where ``ŷ`` is small anyway and the chunked GEMMs are less
    efficient than one large one; and a target that requires grad, ``target`` of another
    dtype than ``input``, a target that broadcasts the prediction, a bias of another shape
    than ``(out_features,)``, ``torch.func`` transforms (``vmap``, ``grad``, ``jacfwd``) and
    ``torch.export``/``torch.jit.trace``, which take the unfused path (same result, no
    memory saving).

    Args:
        input: ``(*, in_features)``; weight: ``(out_features, in_features)``;
        bias: ``(out_features,)`` or None; target: broadcastable to ``(*, out_features)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        chunk_rows: rows of ``ŷ`` per chunk; default about ``rows / ceil(N / K)``, so a chunk
            is about the size of ``input``.
    """
    out_shape, shape = _check_head_args(input, weight, bias, target, reduction, chunk_rows)
    cast = autocast.dtype_for(input.device.type)
    input, weight, bias = autocast.cast(cast, input, weight, bias)
    _check_linear_dtypes(input, weight, bias)
    # Autocast computes the loss in float32 (float64 stays float64), as for F.mse_loss.
    loss_dtype = torch.float32 if cast is not None and input.dtype != torch.float64 else None
    with autocast.off(input.device.type, cast):
        if _head_unfused(input, weight, bias, target, out_shape, shape, loss_dtype):
            y = _linear(input, weight, bias, None, DEFAULT_SLOPE)
            return _mse_loss(y if loss_dtype is None else y.float(), target, reduction)
        loss_dtype = loss_dtype or input.dtype
        return _fused_head(input, weight, bias, target, out_shape, reduction, loss_dtype,
                           chunk_rows)  # fmt: skip


def _head_unfused(input, weight, bias, target, out_shape, shape, loss_dtype) -> bool:
    """Whether the head runs as ``mse_loss(linear(...))`` (same result, no memory saving)."""
    return (
        shape != out_shape  # the target broadcasts the prediction: not a per-row op
        or target.requires_grad
        # a target dtype the loss promotes to (no autocast: any other; autocast: float64)
        or (target.dtype != input.dtype and (loss_dtype is None or target.dtype == torch.float64))
        or not _is_vector_bias(bias, weight.shape[0])  # F.linear's own broadcasting
        or _captured()
        or torch._C._are_functorch_transforms_active()  # vmap, jacfwd: their batching rules
        or any_dtensor(input, weight, bias, target)  # its per-chunk accumulators: plain tensors
    )


def _check_head_args(input, weight, bias, target, reduction, chunk_rows):
    """Checks as :func:`linear` and :func:`mse_loss` make them; ``(out_shape, shape)``: the
    prediction's shape and its broadcast shape with ``target``."""
    _check_linear_args(input, weight, bias)
    _require_tensor("target", target, "linear_mse_loss")
    _check_reduction(reduction)
    if chunk_rows is not None and (
        not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1
    ):
        raise ValueError(f"linear_mse_loss: chunk_rows must be a positive int, got {chunk_rows!r}")
    out_shape = torch.Size((*input.shape[:-1], weight.shape[0]))
    _warn_if_sizes_differ(out_shape, target.size(), stacklevel=4)
    shape = _broadcast("linear_mse_loss", "output", out_shape, target.shape)
    _check_same_device("linear_mse_loss", input=input, weight=weight, bias=bias, target=target)
    return out_shape, shape


def _fused_head(input, weight, bias, target, out_shape, reduction, loss_dtype, chunk_rows):
    x = as_rows(input)
    t = as_rows(target.expand(out_shape))
    rows = chunk_rows or default_chunk_rows(x.shape[0], weight.shape[1], weight.shape[0])
    args = (x, weight, _as_vector(bias, weight.shape[0]), t, reduction, loss_dtype, rows)
    # With no graph to record, the loss alone, no gradient buffers.
    loss = HEAD.first(*args) if _records(input, weight, bias) else head_loss(*args)
    return loss.view(out_shape) if reduction == "none" else loss
