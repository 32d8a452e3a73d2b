"""``LinearMSELossFunction``: the last Linear layer and the MSE loss as one memory-lean op.

``loss = mse(x W^T + b, target)``. For ``"mean"``/``"sum"`` the gradients for x, W
and b are computed during the forward pass, a chunk of rows at a time, so the
prediction ``ŷ`` (and the full-size ``dL/dŷ``) never exists whole; backward only
scales the stored gradients by the upstream gradient. For ``"none"`` the upstream
gradient is per element and unknown at forward time, so backward recomputes each
chunk of ``ŷ`` and applies it. Without a graph to record, :func:`head_loss` computes the
loss alone, the same way, without any gradient buffer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from manualbp.activations import in_place_ok
from manualbp.autograd._eager import Forms
from manualbp.backends import Backend
from manualbp.dispatch import backend_for, get_backend
from manualbp.kernels._host import acc_dtype

__all__ = ["LinearMSELossFunction", "LinearMSELossFunctionEager", "default_chunk_rows", "head_loss"]

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


def _chunk_residual(
    backend: Backend,
    x_c: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    t_c: Tensor,
    loss_dtype: torch.dtype,
) -> Tensor:
    """``D = ŷ - t`` for one chunk of rows, in the loss dtype, in a buffer of its own (the
    chunk's ŷ, reused), which the caller may overwrite with the chunk's gradient."""
    y_c, _ = backend.linear_forward(x_c, weight, bias, None, 0.0, store_preact=False)
    return y_c.to(loss_dtype).sub_(t_c.to(loss_dtype))


def _grad_buffers(
    input: Tensor, weight: Tensor, acc: torch.dtype, needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``dx`` (input's dtype) and the fp32/fp64 accumulators ``dW``, ``db``, where needed."""
    dx = torch.empty_like(input) if needs[0] else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
    db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if needs[2] else None
    return dx, dw, db


def _accumulate_chunk_grads(
    backend: Backend,
    g: Tensor,
    x_c: Tensor,
    weight: Tensor,
    r0: int,
    dx: Tensor | None,
    dw: Tensor | None,
    db: Tensor | None,
) -> None:
    """Chain one chunk's ``dL/dŷ`` through ``ŷ = x W^T + b`` (the backend's Linear backward)
    into the full ``dx`` rows and the fp32/fp64 ``dw``/``db`` accumulators."""
    dx_rows = None if dx is None else dx[r0 : r0 + x_c.shape[0]]
    backend.linear_grad_accumulate(g, x_c, weight, dx_rows, dw, db)


def _fused_forward(input, weight, bias, target, reduction, loss_dtype, chunk_rows, needs):
    """``(loss, dx, dW, db)``: the loss, and for a scalar reduction in float32/float64 the
    gradients ``needs`` asks for (upstream gradient 1), made chunk by chunk with the loss."""
    M, N = input.shape[0], weight.shape[0]
    backend = backend_for(input, weight, bias, target)
    acc = acc_dtype(loss_dtype)
    precompute = _precomputes(reduction, input.dtype)
    dx, dw, db = _grad_buffers(input, weight, acc, tuple(precompute and n for n in needs))
    wants_grad = any(t is not None for t in (dx, dw, db))
    if reduction == "none":
        loss = torch.empty(M, N, dtype=loss_dtype, device=input.device)
    total = torch.zeros((), dtype=acc, device=input.device)
    norm = _norm(reduction, M * N)
    for r0 in range(0, M, chunk_rows):
        x_c, t_c = input[r0 : r0 + chunk_rows], target[r0 : r0 + chunk_rows]
        d = _chunk_residual(backend, x_c, weight, bias, t_c, loss_dtype)
        if reduction == "none":
            torch.mul(d, d, out=loss[r0 : r0 + chunk_rows])
            continue
        total += (d * d).sum(dtype=acc)
        if wants_grad:
            # Chain dL/dŷ = 2D/N through ŷ = x W^T + b now; D's buffer becomes dL/dŷ.
            g = d.mul_(norm).to(input.dtype)
            _accumulate_chunk_grads(backend, g, x_c, weight, r0, dx, dw, db)
    if reduction == "none":
        return loss, None, None, None
    if reduction == "mean":
        total = total / (M * N) if M * N else total.new_tensor(float("nan"))
    return total.to(loss_dtype), dx, dw, db


def head_loss(input, weight, bias, target, reduction, loss_dtype, chunk_rows) -> Tensor:
    """The loss of :class:`LinearMSELossFunction` alone (same arguments), for calls that
    record no graph (``no_grad``, ``inference_mode``): no dx, dW or db buffer is made."""
    args = (input, weight, bias, target, reduction, loss_dtype, chunk_rows)
    return _fused_forward(*args, (False, False, False))[0]


class LinearMSELossFunction(Function):
    """``loss = mse(input @ weight.T + bias, target)`` with gradients made during forward.

    ``apply(input, weight, bias, target, reduction, loss_dtype, chunk_rows)`` on 2-D
    ``input`` (M, K), ``weight`` (N, K), ``bias`` (N,) or None and ``target`` (M, N)
    (any strides, stride-0 broadcast views included) returns ``(loss, dx, dW, db)``;
    the last three are the gradients of the loss itself (upstream gradient 1; ``None``
    unless a scalar reduction needs them), dW and db kept in the fp32/fp64 accumulator
    until backward, and are not differentiable. ``loss_dtype`` is the dtype
    the loss is computed in (float32 under autocast, as for ``F.mse_loss``).
    """

    @staticmethod
    def forward(input, weight, bias, target, reduction, loss_dtype, chunk_rows):
        needs = (input.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        args = (input, weight, bias, target, reduction, loss_dtype, chunk_rows)
        return _fused_forward(*args, needs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, weight, bias, target, reduction, loss_dtype, chunk_rows = inputs
        _, dx, dw, db = output
        # The inputs are kept for the recomputing backward and for double backward (they
        # live anyway: they are the caller's); never ŷ.
        ctx.save_for_backward(input, weight, bias, target)
        # Not saved_tensors: backward scales them in place (a saved tensor's version is
        # checked); they are no view of anything and nothing else holds them.
        ctx.grads = (dx, dw, db)
        ctx.mark_non_differentiable(*(t for t in (dx, dw, db) if t is not None))
        ctx.set_materialize_grads(False)
        ctx.reduction, ctx.loss_dtype, ctx.chunk_rows = reduction, loss_dtype, chunk_rows
        ctx.precomputed = _precomputes(reduction, input.dtype)
        ctx.consumed = False
        ctx.forward_saved = (input, weight, bias, target)
        ctx.backend_choice = get_backend()  # backward may run on another thread

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
        input, weight, bias, target = ctx.forward_saved
        tangents = (input_t, weight_t, bias_t, target_t)
        M, N, step = input.shape[0], weight.shape[0], ctx.chunk_rows
        acc = acc_dtype(ctx.loss_dtype)
        parts, total = [], torch.zeros((), dtype=acc, device=input.device)
        for r0 in range(0, M, step):
            rows = slice(r0, r0 + step)
            d = F.linear(input[rows], weight, bias).to(ctx.loss_dtype)
            d = d - target[rows].to(ctx.loss_dtype)
            part = 2 * d * _residual_tangent(rows, input, weight, *tangents, ctx.loss_dtype)
            if ctx.reduction == "none":
                parts.append(part.expand_as(d))
            else:
                total = total + part.sum(dtype=acc)
        if ctx.reduction == "none":
            if not parts:
                return input.new_zeros((0, N), dtype=ctx.loss_dtype), None, None, None
            return torch.cat(parts), None, None, None
        if ctx.reduction == "mean":
            total = total / (M * N) if M * N else total.new_tensor(float("nan"))
        return total.to(ctx.loss_dtype), None, None, None

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, *_: None) -> tuple:
        """With ``ŷ = x W^T + b``, ``D = ŷ - t`` and upstream ``g``:

        dL/dŷ = g * 2D / N (mean), g * 2D (sum), g_mn * 2D_mn (none);
        dx = dL/dŷ W,  dW = (dL/dŷ)^T x,  db = sum_m dL/dŷ,  dt = -dL/dŷ.
        For mean/sum in float32/float64 the forward pass already made dx, dW, db for g = 1,
        so this only scales them by g. Otherwise (reduction none, or float16/bfloat16) it
        recomputes ŷ chunk by chunk and applies g before rounding, as native autograd does.
        Recorded for double backward, or with a batched ``g`` (``torch.func`` transforms,
        ``jacobian(..., vectorize=True)``), it runs in plain out-of-place torch ops.
        """
        none = (None,) * 7
        if grad_loss is None:
            return none
        input, weight, bias, target = ctx.saved_tensors
        dx, dw, db = ctx.grads or (None, None, None)  # None once consumed
        needs = ctx.needs_input_grad
        if not in_place_ok(grad_loss):
            return _differentiable_backward(ctx, grad_loss, input, weight, bias, target)
        if ctx.precomputed and not ctx.consumed:
            # Scale the stored gradients in place (no second copy of dx and dW); a second
            # backward through the same graph (retain_graph) recomputes instead. Dropping
            # ctx's references lets AccumulateGrad take them as .grad rather than copy them.
            ctx.consumed = True
            ctx.grads = None
            return (
                dx.mul_(grad_loss) if needs[0] else None,
                dw.mul_(grad_loss).to(weight.dtype) if needs[1] else None,
                db.mul_(grad_loss).to(bias.dtype) if needs[2] else None,
                None, None, None, None,
            )  # fmt: skip
        return _recomputing_backward(ctx, grad_loss, input, weight, bias, target, needs)


def _residual_tangent(rows, input, weight, input_t, weight_t, bias_t, target_t, loss_dtype):
    """``Ḋ = Ẋ W^T + X Ẇ^T + ḃ - ṫ`` for ``rows`` (zero tangents left out), in the loss
    dtype; ``ŷ``'s part is summed in the input dtype first, as native forward AD does."""
    y_t = None
    for term in (
        None if input_t is None else F.linear(input_t[rows], weight),
        None if weight_t is None else F.linear(input[rows], weight_t),
        bias_t,
    ):
        if term is not None:
            y_t = term if y_t is None else y_t + term
    d_t = torch.zeros((), dtype=loss_dtype, device=input.device) if y_t is None else y_t
    d_t = d_t.to(loss_dtype)
    return d_t if target_t is None else d_t - target_t[rows].to(loss_dtype)


def _precomputes(reduction: str, dtype: torch.dtype) -> bool:
    """Whether forward makes the gradients (for upstream gradient 1) for backward to scale.

    Not for "none" (the upstream gradient is per element), and not in float16/bfloat16:
    there dL/dŷ = g * 2D/N must be formed before rounding, since g (a GradScaler's 2^16, say)
    is what keeps 2D/N from underflowing; backward recomputes ŷ instead, one chunk at a time.
    """
    return reduction != "none" and dtype in (torch.float32, torch.float64)


def _norm(reduction: str, numel: int) -> float:
    # dL/dŷ = norm * D * g; max(., 1): with no elements the gradients are zeros, as natively.
    return 2.0 / max(numel, 1) if reduction == "mean" else 2.0


def _recomputing_backward(ctx, grad_loss, input, weight, bias, target, needs):
    backend = backend_for(input, weight, bias, target, choice=ctx.backend_choice)
    dx, dw, db = _grad_buffers(input, weight, acc_dtype(ctx.loss_dtype), needs[:3])
    step = ctx.chunk_rows
    norm = _norm(ctx.reduction, input.shape[0] * weight.shape[0])
    scalar = grad_loss.dim() == 0
    for r0 in range(0, input.shape[0], step):
        x_c, t_c = input[r0 : r0 + step], target[r0 : r0 + step]
        g_c = grad_loss if scalar else grad_loss[r0 : r0 + step]
        d = _chunk_residual(backend, x_c, weight, bias, t_c, ctx.loss_dtype)
        # g * 2D/N formed before rounding to the input dtype, as native autograd does.
        g = d.mul_(norm).mul_(g_c.to(d.dtype)).to(input.dtype)
        _accumulate_chunk_grads(backend, g, x_c, weight, r0, dx, dw, db)
    dw = None if dw is None else dw.to(weight.dtype)
    db = None if db is None else db.to(bias.dtype)
    return dx, dw, db, None, None, None, None


def _differentiable_backward(ctx, grad_loss, input, weight, bias, target):
    """The same gradients in plain differentiable ops, for double backward."""
    y = F.linear(input, weight, bias).to(ctx.loss_dtype)
    d = y - target.to(ctx.loss_dtype)
    g = grad_loss * _norm(ctx.reduction, d.numel()) * d
    g = g.to(input.dtype)
    needs = ctx.needs_input_grad
    return (
        g @ weight if needs[0] else None,
        g.mT @ input if needs[1] else None,
        g.sum(0) if needs[2] else None,
        None, None, None, None,
    )  # fmt: skip


HEAD = Forms.of(LinearMSELossFunction)
LinearMSELossFunctionEager = HEAD.eager
