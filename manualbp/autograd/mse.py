"""``MSELossFunction``: mean squared error with a hand-written backward."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from manualbp import reference
from manualbp._backends import pick


def broadcast_promoted(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``input`` and ``target`` as same-shape views (stride 0 where broadcast) in their
    promoted dtype, as ``F.mse_loss`` computes them."""
    dtype = torch.promote_types(input.dtype, target.dtype)
    input, target = torch.broadcast_tensors(input, target)
    return input.to(dtype), target.to(dtype)


class MSELossFunction(Function):
    """``L = reduce((input - target)^2)`` as a ``torch.autograd.Function``.

    ``MSELossFunction.apply(input, target, reduction)`` with ``reduction`` one of
    ``"mean"``, ``"sum"``, ``"none"``; ``input`` and ``target`` broadcast against each
    other and promote to a common dtype, as in ``F.mse_loss``. Inputs are not validated
    here: use :func:`manualbp.functional.mse_loss`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor, target: Tensor, reduction: str) -> Tensor:
        x, t = broadcast_promoted(input, target)
        backend = pick(x, t)
        if backend == "triton":
            from triton_kernels.mse import mse_forward

            return mse_forward(x, t, reduction, compute_grad=False)[0]
        return reference.mse_forward(x, t, reduction)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        input, target, reduction = inputs
        ctx.save_for_backward(input, target)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        """With ``D = input - target`` over the N broadcast elements and ``g = dL_out``:

        L = (1/N) sum D^2  =>  dL/d input = g * 2D/N     (mean; g * 2D for sum;
                                                          g_i * 2D_i elementwise for none)
        dL/d target = -dL/d input; where an operand was broadcast, its gradient is summed
        over the broadcast dimensions (the chain rule through the expand).
        """
        input, target = ctx.saved_tensors
        needs_input, needs_target = ctx.needs_input_grad[:2]
        x, t = broadcast_promoted(input, target)
        backend = pick(grad_output, x, t, differentiable=torch.is_grad_enabled())
        if backend == "triton":
            from triton_kernels.mse import mse_backward

            grad = mse_backward(grad_output, x, t, ctx.reduction)
        else:
            grad = reference.mse_backward(grad_output, x, t, ctx.reduction)
        grad_input = grad_target = None
        if needs_input:
            grad_input = grad.sum_to_size(input.shape).to(input.dtype)
        if needs_target:
            grad_target = (-grad).sum_to_size(target.shape).to(target.dtype)
        return grad_input, grad_target, None
