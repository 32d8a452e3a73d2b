"""``LinearFunction``: ``y = act(x W^T + b)`` with a hand-written backward."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from manualbp.activations import Activation, get_activation
from manualbp.autograd._eager import Forms
from manualbp.backends import Backend
from manualbp.dispatch import backend_for, eager_backend_for, get_backend


def forward_ad_on() -> bool:
    """Whether a Function's jvp may run for this call: inside ``fwAD.dual_level()`` or a
    ``torch.func`` transform (``jvp``, ``jacfwd``)."""
    return fwAD._current_level >= 0 or torch._C._are_functorch_transforms_active()


def as_rows(t: Tensor) -> Tensor:
    """``t`` (*, F) as a matrix (rows, F), a view where possible. ``reshape(-1, F)`` cannot
    infer the row count when F == 0, so the rows are counted explicitly."""
    if t.dim() == 2:
        return t
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
        return _forward(backend_for(input, weight, bias), input, weight, bias, act, negative_slope)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, weight, bias, activation, negative_slope = inputs
        y, z = output
        if z is not None:
            ctx.mark_non_differentiable(z)
        ctx.set_materialize_grads(False)  # backward gets None, not zeros, for ``preact``
        act = get_activation(activation)
        _setup_context(ctx, input, weight, bias, act, negative_slope, y, z, None)

    @staticmethod
    def forward_with_ctx(
        ctx: Any,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        activation: str | None,
        negative_slope: float,
    ) -> Tensor:
        """``forward`` then ``setup_context`` in one, the eager twin's forward (see
        ``manualbp/autograd/_eager.py``): the backend is resolved once for both passes, and
        the output is returned alone (the pre-activation, where kept, is saved on ``ctx``)."""
        act = None if activation is None else get_activation(activation)
        backend = eager_backend_for(input, weight, bias)
        y, z = _forward(backend, input, weight, bias, act, negative_slope)
        _setup_context(ctx, input, weight, bias, act, negative_slope, y, z, backend)
        return y

    @staticmethod
    def jvp(ctx: Any, input_t, weight_t, bias_t, _activation_t, _slope_t) -> tuple:
        """Forward mode, the chain rule with tangents flowing forward:

        Ż = Ẋ W^T + X Ẇ^T + ḃ,    Ẏ = act'(Z) ⊙ Ż
        (act'(Z) ⊙ · is the elementwise map the backward uses for dZ = act'(Z) ⊙ dY).
        """
        input, weight, saved = ctx.forward_saved
        z_t = None
        for term in (
            None if input_t is None else F.linear(input_t, weight),
            None if weight_t is None else F.linear(input, weight_t),
            bias_t,
        ):
            if term is not None:
                z_t = term if z_t is None else z_t + term
        if z_t is None or ctx.act is None:
            return z_t, None
        return ctx.act.grad(z_t, saved, ctx.negative_slope), None

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor | None, _grad_preact: None = None) -> tuple:
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
        needs = ctx.needs_input_grad[:3]
        differentiable = torch.is_grad_enabled()
        if saved is not None and differentiable and ctx.kind == "preact":
            saved = F.linear(input, weight, bias)
        if grad_output.dim() == 2:  # as_rows of each, inline: the common case
            grad_y, x = grad_output, input
        else:
            grad_y = as_rows(grad_output)
            x = None if input is None else as_rows(input)
            saved = None if saved is None else as_rows(saved)
        backend = ctx.backend
        if backend is None or differentiable or torch._C._are_functorch_transforms_active():
            backend = backend_for(
                grad_y, x, weight, saved, differentiable=differentiable, choice=ctx.backend_choice
            )
        dx, dw, db = backend.linear_backward(
            grad_y, x, weight, saved, ctx.act, ctx.negative_slope, needs
        )
        if dx is not None and grad_output.dim() != 2:
            dx = dx.view(_input_shape(input, grad_output, weight))
        return dx, dw, db, None, None


def _forward(
    backend: Backend,
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    act: Activation | None,
    negative_slope: float,
) -> tuple[Tensor, Tensor | None]:
    # The backend returns fresh (*, N) tensors, not views made in here: a view would make
    # in-place ops on the output (nn.ReLU(inplace=True), ``y += residual``) an error.
    return backend.linear_forward(
        input, weight, bias, act, negative_slope,
        store_preact=act is not None and act.saved_for(negative_slope) == "preact",
    )  # fmt: skip


def _setup_context(
    ctx: Any,
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    act: Activation | None,
    negative_slope: float,
    y: Tensor,
    z: Tensor | None,
    backend: Backend | None,
) -> None:
    """What backward (and jvp) read. ``z``: the pre-activation, where the forward kept it.
    ``backend``: the one forward ran on, which backward reuses (``None``: backward resolves
    it from the forward thread's choice)."""
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
    ctx.act, ctx.negative_slope, ctx.kind, ctx.backend = act, negative_slope, kind, backend
    # Backward may run on another thread (CUDA's autograd thread): keep this one's choice.
    ctx.backend_choice = get_backend() if backend is None else None
    # For jvp, which runs only where forward-mode AD is on. Kept otherwise, the output y
    # would make a reference cycle (y -> its grad_fn, this ctx -> y) that holds y until the
    # garbage collector runs, where native autograd frees it at once.
    keep_y = kind == "output" and forward_ad_on()
    ctx.forward_saved = (input, weight, y if keep_y else z)


def _input_shape(input: Tensor | None, grad_output: Tensor, weight: Tensor) -> tuple[int, ...]:
    if input is not None:
        return tuple(input.shape)
    return (*grad_output.shape[:-1], weight.shape[1])


LINEAR = Forms.of(LinearFunction)
LinearFunctionEager = LINEAR.eager
