"""The last Linear layer and the MSE loss as one memory-lean op, ``loss = mse(x W^T + b,
target)``: its reference math, its autograd Function and the entry point
:func:`linear_mse_loss`.

For ``"mean"``/``"sum"`` the gradients for x, W and b are made during the forward pass, a chunk
of rows at a time, so the prediction ``ŷ`` and the full-size ``dL/dŷ`` never exist whole;
backward only scales them by the upstream gradient ``g``. Every gradient is linear in ``g``:
the chunks' ``dL/dŷ`` for ``g = 1`` is ``norm D`` (``D = ŷ - t``; ``norm`` 2/numel or 2),
rounded to the input dtype, and dW, db are summed in fp32 (fp64) in place. In float16 that
``norm D`` would underflow for large N (a GradScaler's ``g`` is what keeps it in range
natively), so the chunks carry ``s norm D`` with a power of two ``s`` (``s norm`` in (1/2, 1])
and backward scales by ``g / s``: exact for a power-of-two ``g``, as a GradScaler's is. For
``"none"`` (a per-element upstream gradient) backward recomputes each chunk of ``ŷ``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from manualbp import _mode
from manualbp.kernels import library
from manualbp.kernels._host import acc_dtype
from manualbp.ops._checks import (
    broadcast,
    check_linear_args,
    check_linear_dtypes,
    check_reduction,
    require_tensor,
    same_device,
    warn_if_sizes_differ,
)
from manualbp.ops.linear import as_rows, is_vector_bias, linear_unchecked, sum_present
from manualbp.ops.mse import mse_loss_unchecked, norm_of

__all__ = ["LinearMSELossFunction", "default_chunk_rows", "linear_mse_loss"]

MIN_CHUNK_ROWS = 256
# Each chunk's temporaries (its rows of ŷ and of dx) stay within this share of the unfused
# pair's ŷ, so the head's peak memory stays well under that of nn.Linear + nn.MSELoss.
CHUNK_SHARE = 8


def default_chunk_rows(rows: int, in_features: int, out_features: int) -> int:
    """Rows per chunk: a power of two whose chunk of ŷ and dx (rows x (N + K)) is at most
    1/:data:`CHUNK_SHARE` of the whole ŷ (M x N), and at least :data:`MIN_CHUNK_ROWS` rows
    so that a narrow head does not turn into many tiny GEMMs bound by launch overhead."""
    budget = rows * out_features // CHUNK_SHARE
    per_row = max(in_features + out_features, 1)
    rows_per_chunk = max(budget // per_row, min(rows, MIN_CHUNK_ROWS), 1)
    return 1 << (rows_per_chunk.bit_length() - 1)  # round down to a power of two


def grad_scale(dtype: torch.dtype, norm: float) -> float:
    """``s``: the power of two the chunks' gradients carry (module docstring): 1, except in
    float16, where ``s norm`` is brought into (1/2, 1]."""
    return 2.0 ** math.floor(math.log2(1.0 / norm)) if dtype == torch.float16 else 1.0


# --------------------------------------------------------------------------------------------
# The reference math, one row chunk at a time
# --------------------------------------------------------------------------------------------
def _chunk_residual(x_c, weight, bias, t_c, loss_dtype, kernels: bool) -> Tensor:
    """``D = ŷ - t`` for one chunk of rows, in the loss dtype, in a buffer of its own (the
    chunk's ŷ, reused), which the caller may overwrite with the chunk's gradient."""
    if kernels:
        y_c = library.load("linear").forward(x_c, weight, bias, None, store_preact=False)[0]
    else:
        y_c = F.linear(x_c, weight, bias)
    return y_c.to(loss_dtype).sub_(t_c.to(loss_dtype))


def _accumulate(g, x_c, weight, dx_rows, dw_acc, db_acc, kernels: bool) -> None:
    """Chain one chunk's ``dL/dŷ`` through ``ŷ = x W^T + b``, in place: ``dx_rows = g W``,
    ``dw_acc += g^T x``, ``db_acc += sum_rows g``; dW summed into the accumulator itself (no
    W-sized temporary per chunk: 16-bit chunks are widened, chunk-sized)."""
    if kernels:
        library.load("linear").grad_accumulate(g, x_c, weight, dx_rows, dw_acc, db_acc)
        return
    if dx_rows is not None:
        torch.mm(g, weight, out=dx_rows)
    if dw_acc is not None:
        dw_acc.addmm_(g.mT.to(dw_acc.dtype), x_c.to(dw_acc.dtype))
    if db_acc is not None:
        db_acc += g.sum(0, dtype=db_acc.dtype)


def _chunked(input, weight, bias, target, reduction, loss_dtype, rows, needs, grad_loss=None,
             choice=None):  # fmt: skip
    """The head chunk by chunk: ``(loss, dx, dW, db)``. With ``needs`` (dx, dW, db) and
    ``grad_loss`` ``None``, the gradients for ``g = 1`` (times ``s``) are made in the same
    pass; with ``grad_loss`` (reduction ``"none"``, or a second backward), the gradients of
    that upstream gradient, ``g`` applied before rounding, as natively (``choice``: the
    backend setting of the forward's thread)."""
    M, N = input.shape[0], weight.shape[0]
    kernels = _mode.kernels_for(input, weight, bias, target, choice=choice)
    acc = acc_dtype(loss_dtype)
    norm = norm_of(reduction, M * N)
    scale = grad_scale(input.dtype, norm) if grad_loss is None else 1.0
    dx = torch.empty_like(input) if needs[0] else None
    dw = weight.new_zeros(weight.shape, dtype=acc) if needs[1] else None
    db = weight.new_zeros(N, dtype=acc) if needs[2] else None
    wants_grad = any(needs)
    loss = input.new_empty((M, N), dtype=loss_dtype) if reduction == "none" else None
    total = input.new_zeros((), dtype=acc)
    for r0 in range(0, M, rows):
        x_c, t_c = input[r0 : r0 + rows], target[r0 : r0 + rows]
        d = _chunk_residual(x_c, weight, bias, t_c, loss_dtype, kernels)
        if grad_loss is None:
            if reduction == "none":
                torch.mul(d, d, out=loss[r0 : r0 + rows])
                continue
            total += (d * d).sum(dtype=acc)
            if not wants_grad:
                continue
            g = d.mul_(norm * scale)
        else:  # g * 2D/N formed before rounding to the input dtype, as native autograd does
            g_c = grad_loss if grad_loss.dim() == 0 else grad_loss[r0 : r0 + rows]
            g = d.mul_(norm).mul_(g_c.to(d.dtype))
        dx_rows = None if dx is None else dx[r0 : r0 + rows]
        _accumulate(g.to(input.dtype), x_c, weight, dx_rows, dw, db, kernels)
    if reduction == "mean":
        total = total / (M * N) if M * N else total.new_tensor(float("nan"))
    return (loss if loss is not None else total.to(loss_dtype)), dx, dw, db, scale


# --------------------------------------------------------------------------------------------
# The autograd Function
# --------------------------------------------------------------------------------------------
class LinearMSELossFunction(Function):
    """``loss = mse(input @ weight.T + bias, target)`` with gradients made during forward.

    ``apply(input, weight, bias, target, reduction, loss_dtype, chunk_rows)`` on 2-D ``input``
    (M, K), ``weight`` (N, K), ``bias`` (N,) or None and ``target`` (M, N) (any strides)
    returns ``(loss, dx, dW, db)``: the last three (not differentiable) are the gradients for
    an upstream gradient of 1 times ``s`` (dW, db in fp32/fp64), ``None`` where not needed or
    for ``"none"``. ``loss_dtype``: float32 under autocast, as for ``F.mse_loss``.
    """

    @staticmethod
    def forward(input, weight, bias, target, reduction, loss_dtype, chunk_rows):
        needs = (input.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        needs = needs if reduction != "none" else (False, False, False)
        return _chunked(input, weight, bias, target, reduction, loss_dtype, chunk_rows, needs)[:4]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, weight, bias, target, reduction, loss_dtype, chunk_rows = inputs
        _, dx, dw, db = output
        ctx.mark_non_differentiable(*(t for t in (dx, dw, db) if t is not None))
        ctx.set_materialize_grads(False)  # no zeros made for them in backward: they are x-sized
        ctx.save_for_backward(input, weight, bias, target, dx, dw, db)
        if _mode.setup(ctx):
            ctx.save_for_forward(input, weight, bias, target)
        # What the gradients carry (see grad_scale), and whether they are still unscaled:
        # backward scales them in place, once; a second backward (retain_graph) recomputes.
        norm = norm_of(reduction, input.shape[0] * weight.shape[0])
        precomputed = any(t is not None for t in (dx, dw, db))
        ctx.head = [reduction, loss_dtype, chunk_rows, grad_scale(input.dtype, norm), precomputed]

    @staticmethod
    def jvp(ctx: Any, input_t, weight_t, bias_t, target_t, *_: None) -> tuple:
        """Forward mode. With ``ŷ = X W^T + b``, ``D = ŷ - t`` and tangents Ẋ, Ẇ, ḃ, ṫ:

        Ḋ = Ẋ W^T + X Ẇ^T + ḃ - ṫ,    L̇ = mean(2 D ⊙ Ḋ)
        (sum: sum(2 D ⊙ Ḋ); none: 2 D ⊙ Ḋ elementwise), the product rule on L = reduce(D ⊙ D).
        D and Ḋ are made chunk by chunk of rows, as in forward, so for a scalar loss neither
        exists whole. ŷ and its tangent are rounded to the input dtype before the loss dtype,
        as native autocast does.
        """
        if all(t is None for t in (input_t, weight_t, bias_t, target_t)):
            return None, None, None, None
        input, weight, bias, target = ctx.saved_tensors
        tangents = (input_t, weight_t, bias_t, target_t)
        reduction, loss_dtype, step = ctx.head[:3]
        M, N = input.shape[0], weight.shape[0]
        acc = acc_dtype(loss_dtype)
        parts, total = [], torch.zeros((), dtype=acc, device=input.device)
        for r0 in range(0, M, step):
            rows = slice(r0, r0 + step)
            d = F.linear(input[rows], weight, bias).to(loss_dtype)
            d = d - target[rows].to(loss_dtype)
            part = 2 * d * _residual_tangent(rows, input, weight, *tangents, loss_dtype)
            if reduction == "none":
                parts.append(part.expand_as(d))
            else:
                total = total + part.sum(dtype=acc)
        if reduction == "none":
            if not parts:
                return input.new_zeros((0, N), dtype=loss_dtype), None, None, None
            return torch.cat(parts), None, None, None
        if reduction == "mean":
            total = total / (M * N) if M * N else total.new_tensor(float("nan"))
        return total.to(loss_dtype), None, None, None

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, *_: None) -> tuple:
        """With ``ŷ = x W^T + b``, ``D = ŷ - t`` and upstream ``g``:

        dL/dŷ = g * 2D / N (mean), g * 2D (sum), g_mn * 2D_mn (none);
        dx = dL/dŷ W,  dW = (dL/dŷ)^T x,  db = sum_m dL/dŷ,  dt = -dL/dŷ.
        For mean/sum the forward pass made dx, dW, db for g = 1 (times s), so this scales
        them by g / s. For "none", and a second backward, it recomputes ŷ chunk by chunk and
        applies g before rounding, as native autograd does. Recorded for double backward, or
        with a batched ``g`` (``torch.func``, ``jacobian(..., vectorize=True)``), it runs in
        plain out-of-place torch ops.
        """
        if grad_loss is None:
            return (None,) * 7
        input, weight, bias, target, dx, dw, db = ctx.saved_tensors
        reduction, loss_dtype, rows, scale, unscaled = ctx.head
        needs = ctx.needs_input_grad
        if not _mode.in_place_ok(grad_loss):
            return _differentiable_backward(ctx, grad_loss, input, weight, bias, target)
        if unscaled:
            factor = grad_loss / scale if scale != 1.0 else grad_loss
            if _mode.compiling():
                grads = [None if t is None else t * factor for t in (dx, dw, db)]
            else:
                # In place (through .data: the saved tensors' versions stay as saved), once.
                ctx.head[4] = False
                grads = [None if t is None else t.data.mul_(factor) for t in (dx, dw, db)]
            dx, dw, db = grads
        else:
            _, dx, dw, db, _ = _chunked(input, weight, bias, target, reduction, loss_dtype, rows,
                                        needs[:3], grad_loss, ctx.choice)  # fmt: skip
        return (dx if needs[0] else None,
                dw.to(weight.dtype) if needs[1] else None,
                db.to(bias.dtype) if needs[2] else None, None, None, None, None)  # fmt: skip


def _residual_tangent(rows, input, weight, input_t, weight_t, bias_t, target_t, loss_dtype):
    """``Ḋ = Ẋ W^T + X Ẇ^T + ḃ - ṫ`` for ``rows`` (zero tangents left out), in the loss
    dtype; ``ŷ``'s part is summed in the input dtype first, as native forward AD does."""
    x_t = None if input_t is None else F.linear(input_t[rows], weight)
    y_t = sum_present(x_t, None if weight_t is None else F.linear(input[rows], weight_t), bias_t)
    d_t = torch.zeros((), dtype=loss_dtype, device=input.device) if y_t is None else y_t
    d_t = d_t.to(loss_dtype)
    return d_t if target_t is None else d_t - target_t[rows].to(loss_dtype)


def _differentiable_backward(ctx, grad_loss, input, weight, bias, target):
    """The same gradients in plain differentiable ops, for double backward."""
    reduction, loss_dtype = ctx.head[:2]
    d = F.linear(input, weight, bias).to(loss_dtype) - target.to(loss_dtype)
    g = (grad_loss * norm_of(reduction, d.numel()) * d).to(input.dtype)
    needs = ctx.needs_input_grad
    return (g @ weight if needs[0] else None, g.mT @ input if needs[1] else None,
            g.sum(0) if needs[2] else None, None, None, None, None)  # fmt: skip


HEAD = _mode.Applier(LinearMSELossFunction)


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------
@_mode.entry_point
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
    ``chunk_rows`` rows at a time and never kept (how: the module docstring). Without a graph
    to record (``no_grad``, ``inference_mode``) it computes the loss alone.

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
        chunk_rows: rows of ``ŷ`` per chunk; default: :func:`default_chunk_rows`.
    """
    out_shape, shape = _check_head_args(input, weight, bias, target, reduction, chunk_rows)
    cast = _mode.autocast_dtype(input)
    input, weight, bias = _mode.cast(cast, input, weight, bias)
    check_linear_dtypes(input, weight, bias)
    # Autocast computes the loss in float32 (float64 stays float64), as for F.mse_loss.
    loss_dtype = torch.float32 if cast is not None and input.dtype != torch.float64 else None
    with _mode.autocast_off(input) if cast is not None else contextlib.nullcontext():
        if _head_unfused(input, weight, bias, target, out_shape, shape, loss_dtype):
            y = linear_unchecked(input, weight, bias, None, 0.01)
            y = y if loss_dtype is None else y.float()
            return mse_loss_unchecked(y, target, reduction)
        x, t = as_rows(input), as_rows(target.expand(out_shape))
        bias = bias if bias is None or bias.shape == weight.shape[:1] else (
            bias.reshape(-1).expand(weight.shape[0]))  # fmt: skip
        rows = chunk_rows or default_chunk_rows(x.shape[0], weight.shape[1], weight.shape[0])
        args = (x, weight, bias, t, reduction, loss_dtype or input.dtype, rows)
        if _mode.route(input, weight, bias) == "nograd":  # the loss alone, no gradient buffer
            loss = _chunked(*args, (False, False, False))[0]
        else:
            loss = HEAD(*args)[0]
    return loss.view(out_shape) if reduction == "none" else loss


def _head_unfused(input, weight, bias, target, out_shape, shape, loss_dtype) -> bool:
    """Whether the head runs as ``mse_loss(linear(...))`` (same result, no memory saving)."""
    return (
        shape != out_shape  # the target broadcasts the prediction: not a per-row op
        or target.requires_grad
        # a target dtype the loss promotes to (no autocast: any other; autocast: float64)
        or (target.dtype != input.dtype and (loss_dtype is None or target.dtype == torch.float64))
        or not is_vector_bias(bias, weight.shape[0])  # F.linear's own broadcasting
        or _mode.captured()
        or _mode.transforms_active()  # vmap, jacfwd: their batching rules
        or library.any_dtensor(input, weight, bias, target)  # per-chunk accumulators: plain
    )


def _check_head_args(input, weight, bias, target, reduction, chunk_rows):
    """Checks as :func:`linear` and :func:`mse_loss` make them; ``(out_shape, shape)``: the
    prediction's shape and its broadcast shape with ``target``."""
    check_linear_args(input, weight, bias)
    require_tensor("target", target, "linear_mse_loss")
    check_reduction(reduction)
    if chunk_rows is not None and (
        not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1
    ):
        raise ValueError(f"linear_mse_loss: chunk_rows must be a positive int, got {chunk_rows!r}")
    out_shape = torch.Size((*input.shape[:-1], weight.shape[0]))
    warn_if_sizes_differ(out_shape, target.size(), stacklevel=4)
    shape = broadcast("linear_mse_loss", "output", out_shape, target.shape)
    same_device("linear_mse_loss", input=input, weight=weight, bias=bias, target=target)
    return out_shape, shape
