"""``FusedMLPMSELossFunction``: a fused narrow MLP with the MSE loss folded into its last layer.

``loss = mse(mlp(x), target)`` for ``"mean"`` / ``"sum"``. On the Triton backend the forward
is the fused MLP's one launch with the loss in the last layer's epilogue (each row tile's sum
of squares into a partials buffer), plus a one-program launch summing those partials in a
fixed order: the prediction is never written. What the epilogue writes instead, for
backward, depends on the dtype, as for the fused head (``manualbp.autograd.linear_mse``):

* float32/float64: ``dZ_{L-1}`` for an upstream gradient of 1, ``act_o'(norm (y - t))``
  (``norm`` = 2/numel or 2); every gradient is linear in the upstream scalar ``g``, so
  backward's chain starts from ``g * dZ_{L-1}``, scaled in its first step;
* float16/bfloat16 (autocast included): y itself, since ``dY = g * norm (y - t)`` must be
  formed before rounding (a GradScaler's ``g`` is what keeps ``norm (y - t)`` from
  underflowing); backward's chain forms it in its first step from y, the target and ``g``.

Either way the backward is the fused MLP's (``triton_kernels/fused_mlp.py``) with its first
step reading those. :func:`fused_mlp_mse_loss` is the validated entry point; what it cannot
fold (``reduction="none"``, a target that broadcasts, requires grad or promotes the loss past
the MLP's dtype, ``torch.func`` transforms, forward-mode AD, export / jit.trace, DTensors)
runs as :func:`~manualbp.autograd.fused_mlp.fused_mlp` then :func:`manualbp.functional.mse_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.autograd import Function

from manualbp import _autocast as autocast
from manualbp.activations import get_activation, in_place_ok
from manualbp.autograd._eager import Forms
from manualbp.autograd.fused_mlp import (
    Spec,
    _acts,
    _autocast,
    _check,
    fused_mlp,
    kernel_supports,
)
from manualbp.autograd.linear import as_rows
from manualbp.backends.reference import REFERENCE
from manualbp.backends.sharding import any_dtensor
from manualbp.dispatch import backend_for, get_backend, resolve

__all__ = ["FusedMLPMSELossFunction", "fused_mlp_mse_loss"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class FusedMLPMSELossFunction(Function):
    """``apply(input, target, spec, reduction, loss_dtype, w_0, b_0, w_1, b_1, ...)`` returns
    ``(loss, state)``.

    ``input`` (M, k_0) and ``target`` (M, n_{L-1}) are 2-D (``target`` any float dtype, not
    requiring grad); ``spec`` as for :class:`~manualbp.autograd.fused_mlp.FusedMLPFunction`;
    ``reduction`` ``"mean"`` or ``"sum"``; ``loss_dtype`` the loss's dtype. ``state`` (a
    tuple, not differentiable) is what backward reads: ``dZ_{L-1}`` for an upstream gradient
    of 1 (float32/float64) or y (float16/bfloat16), then the hidden layers' saved tensors.
    Inputs are not validated: use :func:`fused_mlp_mse_loss`.
    """

    @staticmethod
    def forward(
        input: Tensor, target: Tensor, spec: Spec, reduction: str, loss_dtype: torch.dtype,
        *params: Tensor | None,
    ) -> tuple[Tensor, tuple]:  # fmt: skip
        acts, slopes = _acts(spec)
        weights, biases = list(params[0::2]), list(params[1::2])
        loss, head, saved = backend_for(input, target, *weights).mlp_mse_forward(
            input, target, weights, biases, acts, slopes, reduction, loss_dtype, store=True
        )
        return loss, (head, *saved)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, target, spec, reduction, _loss_dtype, *params = inputs
        ctx.save_for_backward(input, target, *params)
        # Internal tensors, not outputs: kept on ctx (nothing else holds them; no cycle).
        ctx.state = output[1]
        ctx.spec, ctx.reduction = spec, reduction
        ctx.has_bias = tuple(b is not None for b in params[1::2])
        ctx.backend_choice = get_backend()  # backward may run on another thread
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, _grad_state: None) -> tuple:
        """With ``y`` the MLP's output, ``D = y - t`` over its N elements and upstream ``g``:

        dY = g * 2D / N (mean; g * 2D for sum),  then the fused MLP's chain (section 8):
        dZ_l = dY_l * act'(.),  dW_l = dZ_l^T H_{l-1},  db_l = sum_rows dZ_l,  dY_{l-1} = dZ_l W_l

        float32/float64: forward stored ``dZ_{L-1}`` for g = 1; every gradient is linear in g,
        so the chain starts from ``g * dZ_{L-1}``. float16/bfloat16: forward stored y, and
        ``dY`` is formed from y, t and g before rounding, as native autograd forms it.
        Recorded for double backward, or with a batched ``g``, it recomputes the forward in
        plain differentiable ops and runs the reference backward on it. Derivation:
        docs/derivations.md ("A fused MLP", the folded loss).
        """
        L = len(ctx.has_bias)
        if grad_loss is None:
            return (None,) * (5 + 2 * L)
        input, target, *params = ctx.saved_tensors
        weights, biases = list(params[0::2]), list(params[1::2])
        acts, slopes = _acts(ctx.spec)
        needs = ctx.needs_input_grad
        want = (needs[0], any(needs[5:]))
        if in_place_ok(grad_loss):
            head, *saved = ctx.state
            backend = backend_for(input, target, *weights, choice=ctx.backend_choice)
        else:  # double backward, or a batched g: plain ops that autograd records
            backend = REFERENCE
            _, head, saved = REFERENCE.mlp_mse_forward(
                input, target, weights, biases, acts, slopes, ctx.reduction, grad_loss.dtype,
                store=True,
            )  # fmt: skip
        dx, dws, dbs = backend.mlp_mse_backward(
            grad_loss, input, target, weights, head, list(saved), acts, slopes, ctx.reduction,
            ctx.has_bias, want,
        )  # fmt: skip
        grads: list[Tensor | None] = [dx if needs[0] else None, None, None, None, None]
        for i in range(L):
            grads.append(dws[i] if needs[5 + 2 * i] else None)
            grads.append(dbs[i] if needs[6 + 2 * i] else None)
        return tuple(grads)


FUSED_MLP_MSE = Forms.of(FusedMLPMSELossFunction)


# --------------------------------------------------------------------------------------------
# The validated entry point
# --------------------------------------------------------------------------------------------
def _loss_dtype(pred: torch.dtype, target: torch.dtype, autocast: bool) -> torch.dtype:
    """The dtype ``F.mse_loss`` computes in: the promoted one; under autocast float16/bfloat16
    operands are widened to float32 first (mse_loss runs in float32 there)."""
    if autocast:
        pred, target = (torch.float32 if d in _LOW_PRECISION else d for d in (pred, target))
    return torch.promote_types(pred, target)


def _folds(input: Tensor, target: Tensor, weights: list, reduction: str, loss_dtype) -> bool:
    """Whether the loss folds into the fused MLP (see the module docstring for what does not)."""
    from manualbp.functional import _captured

    out_shape = (*input.shape[:-1], weights[-1].shape[0])
    dtype = input.dtype
    return (
        reduction != "none"
        and tuple(target.shape) == out_shape
        and target.dtype.is_floating_point
        and not target.requires_grad
        and target.device == input.device
        # The loss in the MLP's dtype, or float32 for a float16/bfloat16 MLP.
        and (loss_dtype == dtype or (loss_dtype == torch.float32 and dtype in _LOW_PRECISION))
        and not _captured()
        and not torch._C._are_functorch_transforms_active()
        and fwAD._current_level < 0  # forward-mode AD: the unfused ops' jvps
        and not any_dtensor(input, target, *weights)
        and (resolve(input, *weights) != "triton" or kernel_supports(input, weights))
    )


def fused_mlp_mse_loss(
    input: Tensor,
    target: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activation: str | None = "relu",
    output_activation: str | None = None,
    reduction: str = "mean",
    *,
    negative_slope: float = 0.01,
    output_negative_slope: float | None = None,
) -> Tensor:
    """``mse_loss(fused_mlp(input, weights, biases, ...), target, reduction)`` with the loss
    folded into the fused MLP's last layer.

    The MLP's arguments are :func:`~manualbp.autograd.fused_mlp.fused_mlp`'s, the loss's
    ``F.mse_loss``'s (its size warning, broadcasting and shape errors, dtype promotion and
    autocast behaviour, a target gradient). For ``"mean"`` / ``"sum"`` with a target of the
    prediction's shape the prediction is never stored: on the Triton backend the forward is
    two launches (the MLP with the loss in its epilogue, then a fixed-order sum of the row
    tiles' partials) and the backward the fused MLP's, starting from the folded loss's
    gradient. Anything else (see the module docstring) runs unfused, with the same result.
    """
    from manualbp.functional import _check_reduction, _require_tensor

    _require_tensor("input", input, "fused_mlp_mse_loss")
    _require_tensor("target", target, "fused_mlp_mse_loss")
    _check_reduction(reduction)
    get_activation(activation)
    get_activation(output_activation)
    out_slope = negative_slope if output_negative_slope is None else output_negative_slope
    spec: Spec = (activation, output_activation, float(negative_slope), float(out_slope))
    x, ws, bs, autocast_off = _autocast(input, list(weights), list(biases))
    _check(x, ws, bs)
    loss_dtype = _loss_dtype(x.dtype, target.dtype, _autocast_on(input))
    if not _folds(x, target, ws, reduction, loss_dtype):
        return _unfused(input, target, weights, biases, spec, reduction)
    with autocast_off:
        params = [t for pair in zip(ws, bs, strict=True) for t in pair]
        rows, t = as_rows(x), as_rows(target).contiguous()  # the kernels read it contiguous
        if torch.is_grad_enabled() and any(p is not None and p.requires_grad
                                           for p in [x, *params]):  # fmt: skip
            return FUSED_MLP_MSE.pick().apply(rows, t, spec, reduction, loss_dtype, *params)[0]
        # No graph to record: the loss alone, nothing kept for a backward.
        acts, slopes = _acts(spec)
        return backend_for(rows, t, *ws).mlp_mse_forward(
            rows, t, ws, bs, acts, slopes, reduction, loss_dtype, store=False
        )[0]


def _autocast_on(input: Tensor) -> bool:
    return autocast.dtype_for(input.device.type) is not None


def _unfused(input, target, weights, biases, spec: Spec, reduction: str) -> Tensor:
    from manualbp import functional

    hidden, out, hidden_slope, out_slope = spec
    y = fused_mlp(input, weights, biases, hidden, out, negative_slope=hidden_slope,
                  output_negative_slope=out_slope)  # fmt: skip
    return functional.mse_loss(y, target, reduction)
