"""``MSELossFunction``: mean squared error with a hand-written backward."""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.autograd import Function

from manualbp.activations import in_place_ok
from manualbp.autograd._eager import Forms, grad_enabled, transforms_active
from manualbp.backends import Backend
from manualbp.dispatch import backend_for, eager_backend_for, get_backend


def broadcast_promoted(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``input`` and ``target`` as same-shape views (stride 0 where broadcast) in their
    promoted dtype, as ``F.mse_loss`` computes them."""
    if input.shape == target.shape and input.dtype == target.dtype:
        return input, target
    dtype = torch.promote_types(input.dtype, target.dtype)
    input, target = torch.broadcast_tensors(input, target)
    return input.to(dtype), target.to(dtype)


class MSELossFunction(Function):
    """``L = reduce((input - target)^2)`` as a ``torch.autograd.Function``.

    ``MSELossFunction.apply(input, target, reduction)`` with ``reduction`` one of
    ``"mean"``, ``"sum"``, ``"none"`` returns ``(loss, grad)``; ``input`` and ``target``
    broadcast against each other and promote to a common dtype, as in ``F.mse_loss``.
    On the Triton path with a scalar reduction, ``grad`` is ``dL/d input`` for an upstream
    gradient of 1, written by the same kernel pass that reads ``input`` and ``target`` for
    the loss, so backward only scales it; otherwise ``grad`` is ``None`` and backward
    computes it. ``grad`` is not differentiable. Inputs are not validated here: use
    :func:`manualbp.functional.mse_loss`, which returns ``loss`` alone.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor, target: Tensor, reduction: str) -> tuple[Tensor, Tensor | None]:
        x, t = broadcast_promoted(input, target)
        wants_grad = input.requires_grad or target.requires_grad
        return backend_for(x, t).mse_forward(x, t, reduction, compute_grad=wants_grad)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, target, reduction = inputs
        grad = output[1]
        if grad is not None:
            ctx.mark_non_differentiable(grad)
        ctx.set_materialize_grads(False)  # backward gets None, not zeros, for ``grad``
        same = input.shape == target.shape and input.dtype == target.dtype
        _setup_context(ctx, input, target, reduction, grad, None, same)

    @staticmethod
    def forward_with_ctx(ctx: Any, input: Tensor, target: Tensor, reduction: str) -> Tensor:
        """``forward`` then ``setup_context`` in one, the eager twin's forward (see
        ``manualbp/autograd/_eager.py``): the backend is resolved once for both passes, and
        the loss is returned alone (a gradient computed beside it stays on ``ctx``)."""
        same = input.dtype is target.dtype and input.shape == target.shape
        x, t = (input, target) if same else broadcast_promoted(input, target)
        backend = eager_backend_for(x, t)
        loss, grad = backend.mse_forward(
            x, t, reduction, compute_grad=input.requires_grad or target.requires_grad
        )
        # _setup_context, inline; forward_saved only where a jvp can run (forward-mode AD
        # on; no torch.func transform is, or the canonical form would run).
        ctx.save_for_backward(input, target)
        ctx.grad, ctx.spec = grad, (reduction, backend, same, None)
        if fwAD._current_level >= 0:
            ctx.forward_saved = (input, target)
        return loss

    @staticmethod
    def jvp(ctx: Any, input_t: Tensor | None, target_t: Tensor | None, _reduction_t: None):
        """Forward mode, with ``D = input - target`` (broadcast, promoted) and tangents ẋ, ṫ:

        Ḋ = ẋ - ṫ,   L̇ = mean(2 D ⊙ Ḋ)  (sum: sum(2 D ⊙ Ḋ); none: 2 D ⊙ Ḋ elementwise)
        """
        input, target = ctx.forward_saved
        if input_t is None and target_t is None:
            return None, None
        x, t = broadcast_promoted(input, target)
        zeros = torch.zeros((), dtype=x.dtype, device=x.device)
        d_t = (zeros if input_t is None else input_t.to(x.dtype)) - (
            zeros if target_t is None else target_t.to(x.dtype)
        )
        loss_t = 2 * (x - t) * d_t
        reduction = ctx.spec[0]
        if reduction == "mean":
            loss_t = loss_t.mean()
        elif reduction == "sum":
            loss_t = loss_t.sum()
        return loss_t, None

    @staticmethod
    def backward(
        ctx: Any, grad_output: Tensor | None, _grad_grad: None = None
    ) -> tuple[Tensor | None, Tensor | None, None]:
        """With ``D = input - target`` over the N broadcast elements and ``g = dL_out``:

        L = (1/N) sum D^2  =>  dL/d input = g * 2D/N     (mean; g * 2D for sum;
                                                          g_i * 2D_i elementwise for none)
        dL/d target = -dL/d input; where an operand was broadcast, its gradient is summed
        over the broadcast dimensions (the chain rule through the expand).
        """
        if grad_output is None:
            return None, None, None
        input, target = ctx.saved_tensors
        reduction, backend, same, backend_choice = ctx.spec
        precomputed = ctx.grad
        if precomputed is not None and in_place_ok(grad_output):
            # 2D/N (or 2D) from the forward pass, times g; the backend may scale it in place,
            # so it is used once: a second backward (retain_graph) recomputes. Dropped from
            # ctx, so that AccumulateGrad may also take the result rather than copy it.
            ctx.grad = None
            backend = backend or backend_for(precomputed, grad_output, choice=backend_choice)
            grad = backend.mse_grad_scale(precomputed, grad_output)
        else:
            x, t = (input, target) if same else broadcast_promoted(input, target)
            if backend is None or grad_enabled() or transforms_active():
                backend = backend_for(
                    grad_output, x, t, differentiable=grad_enabled(),
                    choice=backend_choice,
                )  # fmt: skip
            grad = backend.mse_backward(grad_output, x, t, reduction)
        needs_input, needs_target, _ = ctx.needs_input_grad
        if same:  # no broadcast dimension to sum over, no promotion to undo
            return (grad if needs_input else None), (-grad if needs_target else None), None
        grad_input = None if not needs_input else _reduce_to(grad, input)
        grad_target = None if not needs_target else _reduce_to(-grad, target)
        return grad_input, grad_target, None


def _setup_context(
    ctx: Any,
    input: Tensor,
    target: Tensor,
    reduction: str,
    grad: Tensor | None,
    backend: Backend | None,
    same: bool,
) -> None:
    """What backward (and jvp) read: ``input`` and ``target`` (saved), ``ctx.grad`` (the
    gradient the forward pass computed, if any) and ``ctx.spec`` = ``(reduction, backend,
    same, backend_choice)``, one attribute for the per-call cost: ``backend`` is the one
    forward ran on, which backward reuses (``None``: backward resolves ``backend_choice``,
    the forward thread's setting); ``same``: whether ``input`` and ``target`` have one shape
    and dtype (nothing broadcast or promoted). The eager form's forward sets the same."""
    ctx.save_for_backward(input, target)
    ctx.grad = grad  # not saved_tensors: backward may scale it in place, once
    # Backward may run on another thread (CUDA's autograd thread): keep this one's choice.
    ctx.spec = (reduction, backend, same, get_backend() if backend is None else None)
    ctx.forward_saved = (input, target)


def _reduce_to(grad: Tensor, operand: Tensor) -> Tensor:
    """``grad`` summed over the dimensions ``operand`` was broadcast along, in its dtype."""
    if grad.shape != operand.shape:
        grad = grad.sum_to_size(operand.shape)
    return grad if grad.dtype == operand.dtype else grad.to(operand.dtype)


MSE = Forms.of(MSELossFunction)
MSELossFunctionEager = MSE.eager
