"""Two Linear layers, ``Linear -> act_1 -> Linear (-> act_2)``, as one autograd node whose
backward fuses the first layer's activation gradient into the second layer's dX GEMM
(cross-layer activation-gradient fusion, cuBLASLt's ``DGELU_BGRAD`` idea): its Function and
the entry point :func:`linear_chain`.

Unfused, the backward of the pair writes the second layer's ``dX`` (= the first layer's ``dY``,
M x n_1), then reads it back with the first layer's saved tensor to form ``dZ_1 = dY_1 *
act_1'(.)`` and its bias gradient, then writes ``dZ_1``. Fused, the GEMM that makes ``dY_1``
applies ``act_1'`` and sums the bias-gradient partials in its epilogue and writes ``dZ_1`` once
(``manualbp.kernels.linear.backward_chain``; cuBLAS + an elementwise pass where that is
faster). The forward is the two Linear forwards, unchanged; the reference math is the two
layers' (:mod:`manualbp.ops.linear`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.autograd import Function

from manualbp import _mode
from manualbp.activations import Act, bind, resolve_param
from manualbp.kernels import library
from manualbp.ops.linear import LinearFunction, as_rows, linear, reference_backward

__all__ = ["LinearChainFunction", "linear_chain"]


def _store(act: Act | None) -> bool:
    return act is not None and act.reads_preact


class LinearChainFunction(Function):
    """``apply(input, w1, b1, w2, b2, act1, slope1, act2, slope2)`` returns ``(y, h, z1, z2)``:

    ``h = act_1(input W_1^T + b_1)``, ``y = act_2(h W_2^T + b_2)``; ``z1`` / ``z2`` the
    pre-activations where the activation's derivative reads them, else ``None``; every one
    differentiable (a double backward differentiates through them). ``b1`` / ``b2`` are (n,) or
    ``None``. What it saves is what the two native Linear + activation pairs save. Inputs are
    not validated: use :func:`linear_chain`.
    """

    @staticmethod
    def forward(input, w1, b1, w2, b2, act1, slope1, act2, slope2) -> tuple:
        h, z1 = LinearFunction.forward(input, w1, b1, act1, slope1, None)
        y, z2 = LinearFunction.forward(h, w2, b2, act2, slope2, None)
        return y, h, z1, z2

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, w1, _, w2, _, act1, slope1, act2, slope2 = inputs
        y, h, z1, z2 = output
        ctx.acts = a1, a2 = bind(act1, slope1), bind(act2, slope2)
        need_x, need_w1, need_b1, need_w2 = ctx.needs_input_grad[:4]
        lower = need_x or need_w1 or need_b1
        # As the native pairs keep: X (dW_1), W_1 (dX), what act_1' reads (Z_1; H is kept for
        # dW_2 anyway), H (dW_2), W_2 (dH), what act_2' reads (Z_2 or Y).
        s2 = None if a2 is None else (z2 if a2.reads_preact else y)
        ctx.save_for_backward(input if need_w1 else None, w1 if need_x else None,
                              z1 if _store(a1) else None, h if need_w2 or a1 is not None else None,
                              w2 if lower else None, s2)  # fmt: skip
        _mode.setup(ctx, h, z1, z2)

    @staticmethod
    def backward(ctx: Any, grad_y, grad_h=None, grad_z1=None, grad_z2=None) -> tuple:
        """Chain rule through both layers, given ``dY = dL/dY``:

        dZ_2 = dY * act_2'(.),   dW_2 = dZ_2^T H,   db_2 = sum_m dZ_2       (upper layer)
        dZ_1 = (dZ_2 W_2) * act_1'(.),   db_1 = sum_m dZ_1                   (one fused GEMM)
        dW_1 = dZ_1^T X,   dX = dZ_1 W_1                                     (lower layer)

        (``dZ_2 W_2`` is ``dH``, the lower layer's ``dY``.) Gradients reaching H, Z_1 or Z_2
        themselves (a double backward) add to dH, dZ_1, dZ_2; then, and when the backward is
        itself recorded, the layers run one by one in the reference ops. Derivation:
        docs/derivations.md ("Cross-layer fusion").
        """
        grad_h, grad_z1, grad_z2 = _mode.internal_grads(grad_h, grad_z1, grad_z2)
        if grad_y is None and grad_h is None and grad_z1 is None and grad_z2 is None:
            return (None,) * 9
        x, w1, z1, h, w2, s2 = ctx.saved_tensors
        a1, a2 = ctx.acts
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        lower = need_x or need_w1 or need_b1
        s1 = None if a1 is None else (z1 if a1.reads_preact else h)
        rows = [None if t is None else as_rows(t) for t in (grad_y, grad_h, grad_z1, grad_z2,
                                                            x, h, s1, s2)]  # fmt: skip
        g, gh, gz1, gz2, x2, h2, s1, s2 = rows
        fused = gh is None and gz1 is None and gz2 is None and g is not None
        if fused and _mode.backward_kernels(g, x2, w1, w2, choice=ctx.choice):
            kernels = library.load("linear")
            name1, slope1 = (None, 0.0) if a1 is None else (a1.name, a1.slope)
            name2, slope2 = (None, 0.0) if a2 is None else (a2.name, a2.slope)
            dz1, dw2, db2, db1 = kernels.backward_chain(
                g, h2, w2, s2, name2, slope2, s1, name1, slope1,
                needs_grad=(lower, need_w2, need_b2, need_b1),
            )  # fmt: skip
            dx = dw1 = None
            if need_x or need_w1:
                dx, dw1, _ = kernels.backward(dz1, x2, w1, None, None, 0.0,
                                              needs_grad=(need_x, need_w1, False))  # fmt: skip
        else:
            dx, dw1, db1, dw2, db2 = _layer_by_layer(g, gh, gz1, gz2, x2, w1, h2, s1, w2, s2,
                                                     a1, a2, ctx.needs_input_grad[:5])  # fmt: skip
        if dx is not None:
            dx = dx.view(*(grad_y if grad_y is not None else grad_h).shape[:-1], w1.shape[1])
        return dx, dw1, db1, dw2, db2, None, None, None, None


def _layer_by_layer(g, gh, gz1, gz2, x, w1, h, s1, w2, s2, a1, a2, needs) -> tuple:
    """The two layers' reference backward, one after the other, with the gradients reaching
    H, Z_1, Z_2 added where they meet the chain: dZ_2 = dY act_2' + dL/dZ_2; dH = dZ_2 W_2 +
    dL/dH; dZ_1 = dH act_1' + dL/dZ_1."""
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    dz2 = None if g is None else (g if a2 is None else a2.grad(g, s2))
    if gz2 is not None:
        dz2 = gz2 if dz2 is None else dz2 + gz2
    dh = dw2 = db2 = None
    if dz2 is not None:
        lower = need_x or need_w1 or need_b1
        dh, dw2, db2 = reference_backward(dz2, h, w2, None, None, (lower, need_w2, need_b2))
    if gh is not None:
        dh = gh if dh is None else dh + gh
    dz1 = None if dh is None else (dh if a1 is None else a1.grad(dh, s1))
    if gz1 is not None:
        dz1 = gz1 if dz1 is None else dz1 + gz1
    if dz1 is None:
        return None, None, None, dw2, db2
    dx, dw1, db1 = reference_backward(dz1, x, w1, None, None, (need_x, need_w1, need_b1))
    return dx, dw1, db1, dw2, db2


CHAIN = _mode.Applier(LinearChainFunction)


def _fusable(input: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> bool:
    """Whether the pair runs as :class:`LinearChainFunction`: well-formed tensors of one
    floating dtype and device, vector biases, plain eager autograd recording the call (not
    torch.compile, export, jit.trace, torch.func, forward AD) and the Triton kernels."""
    tensors = [input, w1, w2, *(b for b in (b1, b2) if b is not None)]
    if not all(isinstance(t, Tensor) for t in tensors):
        return False
    if _mode.route(*tensors) != "eager" or _mode.forward_ad_on():
        return False
    if w1.dim() != 2 or w2.dim() != 2 or input.dim() < 1:
        return False
    if input.shape[-1] != w1.shape[1] or w2.shape[1] != w1.shape[0]:
        return False
    if any(b is not None and b.shape != w.shape[:1] for b, w in ((b1, w1), (b2, w2))):
        return False
    if len({t.dtype for t in tensors}) > 1 or not input.dtype.is_floating_point:
        return False
    if len({t.device for t in tensors}) > 1:
        return False
    return _mode.kernels_for(*tensors)


def linear_chain(
    input: Tensor,
    weight1: Tensor,
    bias1: Tensor | None,
    activation1: str | None,
    weight2: Tensor,
    bias2: Tensor | None,
    activation2: str | None = None,
    *,
    negative_slope: float | None = None,
    negative_slope2: float | None = None,
) -> Tensor:
    """``act_2(act_1(input W_1^T + b_1) W_2^T + b_2)``: two :func:`~manualbp.ops.linear.linear`
    calls, with the first layer's activation gradient fused into the second layer's backward
    GEMM (module docstring).

    ``weight1`` (n_1, k), ``weight2`` (n_2, n_1) in the ``nn.Linear`` layout; ``bias1`` /
    ``bias2`` (n,) or ``None``; ``negative_slope`` is ``activation1``'s parameter (leaky_relu's
    slope, softplus's beta, sin's omega; ``None``: its default), ``negative_slope2``
    ``activation2``'s (default: ``negative_slope``, or ``activation2``'s default). The fused
    node runs on the Triton backend when autograd records the call; otherwise (reference backend, no
    graph, torch.compile / export / jit.trace, torch.func transforms, forward-mode AD, other
    bias shapes or mixed dtypes) the two layers run one by one, which also validates the
    arguments as :func:`~manualbp.ops.linear.linear` does. Under autocast both compute in the
    autocast dtype, as ``F.linear`` does.
    """
    bind(activation1)  # unknown names raise here
    bind(activation2)
    slope1 = resolve_param(activation1, negative_slope)
    slope2 = resolve_param(activation2, negative_slope if negative_slope2 is None
                           else negative_slope2)  # fmt: skip
    if isinstance(input, Tensor):
        cast = _mode.autocast_dtype(input)
        x, w1, b1, w2, b2 = _mode.cast(cast, input, weight1, bias1, weight2, bias2)
        if _fusable(x, w1, b1, w2, b2):
            args = (x, w1, b1, w2, b2, activation1, slope1, activation2, slope2)
            if cast is None:
                return CHAIN(*args)[0]
            with _mode.autocast_off(x):
                return CHAIN(*args)[0]
    h = linear(input, weight1, bias1, activation1, negative_slope=slope1)
    return linear(h, weight2, bias2, activation2, negative_slope=slope2)
