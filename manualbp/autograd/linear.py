"""``LinearFunction``: ``y = act(x W^T + b)`` with a hand-written backward."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from manualbp.activations import get_activation
from manualbp.dispatch import backend_for


def as_rows(t: Tensor) -> Tensor:
    """``t`` (*, F) as a matrix (rows, F), a view where possible. ``reshape(-1, F)`` cannot
    infer the row count when F == 0, so the rows are counted explicitly."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


class LinearFunction(Function):
    """Fused linear layer ``Y = act(X W^T + b)`` as a ``torch.autograd.Function``.

    ``LinearFunction.apply(input, weight, bias, activation, negative_slope)`` returns
    ``(output, preact)``: ``preact`` is the pre-activation ``Z = X W^T + b`` when the
    activation's derivative needs it (GELU, SiLU, leaky ReLU with a negative slope) and
    ``None`` otherwise; it is not differentiable. Inputs are not validated here: use
    :func:`manualbp.functional.linear`, which checks them and returns ``output`` alone.

    Shapes: ``input`` (*, K) with rank >= 1, ``weight`` (N, K), ``bias`` (N,) or None,
    ``output`` (*, N).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        activation: str | None,
        negative_slope: float,
    ) -> tuple[Tensor, Tensor | None]:
        act = get_activation(activation)
        x = as_rows(input)
        y, z = backend_for(input, weight, bias).linear_forward(
            x, weight, bias, act, negative_slope,
            store_preact=act is not None and act.saved_for(negative_slope) == "preact",
        )  # fmt: skip
        shape = (*input.shape[:-1], weight.shape[0])
        # detach(): a view made in here would make in-place ops on the output (an
        # nn.ReLU(inplace=True) after the layer, ``y += residual``) an error, as they
        # are not for F.linear. The detached tensor shares the storage but is no view.
        return y.view(shape).detach(), (None if z is None else z.view(shape).detach())

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, weight, bias, activation, negative_slope = inputs
        y, z = output
        act = get_activation(activation)
        kind = "nothing" if act is None else act.saved_for(negative_slope)
        needs_x, needs_w, _ = ctx.needs_input_grad[:3]
        # Keep only what backward reads: X for dW, W for dX, and Y or Z for act'.
        # For act'(Z), also X, W, b: double backward recomputes Z with a graph from them.
        recompute = kind == "preact"
        ctx.save_for_backward(
            input if needs_w or recompute else None,
            weight if needs_x or recompute else None,
            bias if recompute else None,
            y if kind == "output" else z,
        )
        if z is not None:
            ctx.mark_non_differentiable(z)
        ctx.set_materialize_grads(False)
        ctx.act, ctx.negative_slope, ctx.kind = act, negative_slope, kind

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor | None, _grad_preact: None) -> tuple:
        """Chain rule through ``Z = X W^T + b`` and ``Y = act(Z)``, given ``dY = dL/dY``:

        dZ = dY * act'(Z)            (elementwise; act' read off Y or Z, see activations.py)
        dX = dZ W                    (dL/dX_mk = sum_n dZ_mn W_nk)
        dW = dZ^T X,  db = sum_m dZ  (summed over every leading batch index m)

        When this backward is itself recorded (``create_graph=True``) it runs in
        differentiable torch ops, recomputing Z from X, W, b so that act'(Z) has a graph.
        Full derivation: docs/derivations.md.
        """
        if grad_output is None:
            return None, None, None, None, None
        input, weight, bias, saved = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        grad_y = as_rows(grad_output)
        x = None if input is None else as_rows(input)
        differentiable = torch.is_grad_enabled()
        if saved is not None:
            if differentiable and ctx.kind == "preact":
                saved = F.linear(input, weight, bias)
            saved = as_rows(saved)
        backend = backend_for(grad_y, x, weight, saved, differentiable=differentiable)
        dx, dw, db = backend.linear_backward(
            grad_y, x, weight, saved, ctx.act, ctx.negative_slope, needs
        )
        if dx is not None:
            dx = dx.view(_input_shape(input, grad_output, weight))
        return dx, dw, db, None, None


def _input_shape(input: Tensor | None, grad_output: Tensor, weight: Tensor) -> tuple[int, ...]:
    if input is not None:
        return tuple(input.shape)
    return (*grad_output.shape[:-1], weight.shape[1])
