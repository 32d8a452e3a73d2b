"""``LinearChainFunction``: two Linear layers, ``Linear -> act_1 -> Linear (-> act_2)``, as one
autograd node whose backward fuses the first layer's activation gradient into the second
layer's dX GEMM (cross-layer activation-gradient fusion, cuBLASLt's ``DGELU_BGRAD`` idea).

Unfused, the backward of the pair writes the second layer's ``dX`` (= the first layer's
``dY``, M x n_1), then reads it back with the first layer's saved tensor to form ``dZ_1 = dY_1
* act_1'(.)`` and its bias gradient, then writes ``dZ_1``. Fused, the GEMM that makes ``dY_1``
applies ``act_1'`` and sums the bias-gradient partials in its epilogue and writes ``dZ_1``
once: ``dY_1`` never exists in memory (:func:`manualbp.kernels.linear_backward
.linear_backward_chain`). The forward is the two Linear forwards, unchanged.

:func:`linear_chain` is the entry point a container calls for such a pair: it runs the fused
node where it pays (the Triton backend, autograd recording) and the two
:func:`manualbp.functional.linear` calls otherwise, with the same results either way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.autograd import Function

from manualbp import _autocast as autocast
from manualbp.activations import Activation, get_activation
from manualbp.autograd._eager import eager_twin
from manualbp.autograd.linear import as_rows
from manualbp.backends.reference import REFERENCE
from manualbp.dispatch import backend_for, get_backend, resolve

__all__ = ["LinearChainFunction", "linear_chain"]

Spec = tuple[str | None, str | None, float, float]  # act_1, act_2 and their slopes


def _acts(spec: Spec) -> tuple[Activation | None, Activation | None, float, float]:
    act1, act2, slope1, slope2 = spec
    return get_activation(act1), get_activation(act2), slope1, slope2


def _reads_preact(act: Activation | None, slope: float) -> bool:
    return act is not None and act.saved_for(slope) == "preact"


class LinearChainFunction(Function):
    """``LinearChainFunction.apply(input, w1, b1, w2, b2, spec)`` returns ``(y, h, z1, z2)``:

    ``h = act_1(input W_1^T + b_1)``, ``y = act_2(h W_2^T + b_2)``; ``z1`` / ``z2`` are the
    pre-activations when the activation's derivative reads them, else ``None``. ``h``, ``z1``
    and ``z2`` are what the backward reads, not differentiable. ``spec = (act_1, act_2,
    slope_1, slope_2)``; ``b1`` / ``b2`` are (n,) or ``None``. Inputs are not validated: use
    :func:`linear_chain`.
    """

    @staticmethod
    def forward(
        input: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, spec: Spec
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        act1, act2, slope1, slope2 = _acts(spec)
        backend = backend_for(input, w1, b1, w2, b2)
        h, z1 = backend.linear_forward(
            input, w1, b1, act1, slope1, store_preact=_reads_preact(act1, slope1)
        )
        y, z2 = backend.linear_forward(
            h, w2, b2, act2, slope2, store_preact=_reads_preact(act2, slope2)
        )
        return y, h, z1, z2

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, w1, b1, w2, b2, spec = inputs
        y, h, z1, z2 = output
        _, act2, _, slope2 = _acts(spec)
        # What each layer's backward reads (as native Linear + activation modules keep): X and
        # W_1, H (dW_2) and W_2, the tensor act_1' reads (H or Z_1) and the one act_2' reads
        # (Y or Z_2); b_1, b_2 for double backward, which recomputes the forward.
        s2 = z2 if _reads_preact(act2, slope2) else (y if act2 is not None else None)
        ctx.save_for_backward(input, w1, b1, w2, b2, h, z1, s2)
        ctx.mark_non_differentiable(*(t for t in (h, z1, z2) if t is not None))
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        ctx.backend_choice = get_backend()  # backward may run on autograd's device thread

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor | None, *_: Any) -> tuple:
        """Chain rule through both layers, given ``dY = dL/dY``:

        dZ_2 = dY * act_2'(.),   dW_2 = dZ_2^T H,   db_2 = sum_m dZ_2       (upper layer)
        dZ_1 = (dZ_2 W_2) * act_1'(.),   db_1 = sum_m dZ_1                   (one fused GEMM)
        dW_1 = dZ_1^T X,   dX = dZ_1 W_1                                     (lower layer)

        (``dZ_2 W_2`` is ``dH = dL/dH``, the lower layer's ``dY``; act' is read off the saved
        output or pre-activation, see activations.py). When the backward is itself recorded
        (``create_graph=True``) the forward is recomputed in differentiable torch ops and the
        reference ops run on it. Derivation: docs/derivations.md ("Cross-layer fusion").
        """
        if grad_y is None:
            return (None,) * 6
        input, w1, b1, w2, b2, h, z1, s2 = ctx.saved_tensors
        act1, act2, slope1, slope2 = _acts(ctx.spec)
        differentiable = torch.is_grad_enabled()
        if differentiable:  # recompute with a graph, so that act' has one (double backward)
            h, z1 = REFERENCE.linear_forward(input, w1, b1, act1, slope1, store_preact=True)
            y, z2 = REFERENCE.linear_forward(h, w2, b2, act2, slope2, store_preact=True)
            s2 = z2 if _reads_preact(act2, slope2) else y
        s1 = z1 if _reads_preact(act1, slope1) else h
        g, x, h2 = as_rows(grad_y), as_rows(input), as_rows(h)
        s1 = None if act1 is None else as_rows(s1)
        s2 = None if act2 is None else as_rows(s2)
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        need_lower = need_x or need_w1
        backend = backend_for(
            g, x, w1, w2, differentiable=differentiable, choice=ctx.backend_choice
        )
        dz1, dw2, db2, db1 = backend.linear_chain_backward(
            g, h2, w2, s2, act2, slope2, s1, act1, slope1,
            (need_lower, need_w2, need_b2, need_b1),
        )  # fmt: skip
        dx = dw1 = None
        if need_lower:
            dx, dw1, _ = backend.linear_backward(
                dz1, x, w1, None, None, 0.0, (need_x, need_w1, False)
            )
        if dx is not None:
            dx = dx.view(input.shape)
        return dx, dw1, db1, dw2, db2, None


LinearChainFunctionEager = eager_twin(LinearChainFunction)


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------
def _autocast(input: Tensor, params: list[Tensor | None]) -> tuple[Tensor, list, Any]:
    """The tensors as autocast casts them for ``F.linear``, and the context that switches
    autocast off, ``None`` without autocast (see :mod:`manualbp._autocast`)."""
    dtype = autocast.dtype_for(input.device.type)
    if dtype is None:
        return input, params, None
    input, *params = autocast.cast(dtype, input, *params)
    return input, params, autocast.off(input.device.type, dtype)


def _fusable(input: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> bool:
    """Whether the pair runs as :class:`LinearChainFunction`: well-formed tensors of one
    floating dtype and device, vector biases, an autograd graph to record, the Triton
    backend, and none of the settings where the layers must run one by one (torch.compile,
    export, jit.trace, torch.func transforms, forward-mode AD)."""
    tensors = [input, w1, w2, *(b for b in (b1, b2) if b is not None)]
    if not all(isinstance(t, Tensor) for t in tensors):
        return False
    if (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
        or fwAD._current_level >= 0
    ):
        return False
    if w1.dim() != 2 or w2.dim() != 2 or input.dim() < 1:
        return False
    if input.shape[-1] != w1.shape[1] or w2.shape[1] != w1.shape[0]:
        return False
    for b, w in ((b1, w1), (b2, w2)):
        if b is not None and b.shape != w.shape[:1]:
            return False
    if len({t.dtype for t in tensors}) > 1 or not input.dtype.is_floating_point:
        return False
    if len({t.device for t in tensors}) > 1:
        return False
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return False
    return resolve(*tensors) == "triton"


def _layerwise(input, w1, b1, act1, w2, b2, act2, slope1: float, slope2: float) -> Tensor:
    from manualbp import functional

    h = functional.linear(input, w1, b1, act1, negative_slope=slope1)
    return functional.linear(h, w2, b2, act2, negative_slope=slope2)


def linear_chain(
    input: Tensor,
    weight1: Tensor,
    bias1: Tensor | None,
    activation1: str | None,
    weight2: Tensor,
    bias2: Tensor | None,
    activation2: str | None = None,
    *,
    negative_slope: float = 0.01,
    negative_slope2: float | None = None,
) -> Tensor:
    """``act_2(act_1(input W_1^T + b_1) W_2^T + b_2)``: two :func:`manualbp.functional.linear`
    calls, with the first layer's activation gradient fused into the second layer's backward
    GEMM (module docstring).

    ``weight1`` (n_1, k), ``weight2`` (n_2, n_1) in the ``nn.Linear`` layout; ``bias1`` /
    ``bias2`` (n,) or ``None``; ``negative_slope`` is ``activation1``'s slope (leaky_relu),
    ``negative_slope2`` ``activation2``'s (default: ``negative_slope``). The fused node runs on
    the Triton backend when autograd records the call; otherwise (reference backend, no
    graph, torch.compile / export / jit.trace, torch.func transforms, forward-mode AD, other
    bias shapes or mixed dtypes) the two layers run one by one, which also validates the
    arguments as :func:`manualbp.functional.linear` does. Under autocast both compute in the
    autocast dtype, as ``F.linear`` does.
    """
    get_activation(activation1)
    get_activation(activation2)
    slope1 = float(negative_slope)
    slope2 = slope1 if negative_slope2 is None else float(negative_slope2)
    args = (input, weight1, bias1, activation1, weight2, bias2, activation2, slope1, slope2)
    if not isinstance(input, Tensor):
        return _layerwise(*args)
    input_c, (w1, b1, w2, b2), autocast_off = _autocast(input, [weight1, bias1, weight2, bias2])
    if not _fusable(input_c, w1, b1, w2, b2):
        return _layerwise(*args)
    spec: Spec = (activation1, activation2, slope1, slope2)
    if autocast_off is None:
        return LinearChainFunctionEager.apply(input_c, w1, b1, w2, b2, spec)[0]
    with autocast_off:
        return LinearChainFunctionEager.apply(input_c, w1, b1, w2, b2, spec)[0]
