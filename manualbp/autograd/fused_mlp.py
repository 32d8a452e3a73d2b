"""``FusedMLPFunction``: a whole narrow MLP as one autograd node with a hand-written backward.

``y = act_o(... act_h(act_h(x W_0^T + b_0) W_1^T + b_1) ... W_{L-1}^T + b_{L-1})``: every
hidden layer shares one activation (``act_h``), the last layer has its own (``act_o``, often
none). On the Triton backend the forward is one kernel launch and the backward two or three
(``triton_kernels/fused_mlp.py``); on the reference backend each is a loop of the Linear ops.
:func:`fused_mlp` is the validated entry point, used by :class:`manualbp.FusedMLP` and by
:class:`manualbp.Sequential` for runs of Linear (+ activation) modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from manualbp import _autocast as autocast
from manualbp.activations import Activation, get_activation
from manualbp.autograd._eager import Forms
from manualbp.autograd.linear import as_rows
from manualbp.backends.reference import REFERENCE
from manualbp.dispatch import backend_for, get_backend, resolve
from manualbp.errors import ShapeError

__all__ = ["MAX_WIDTH", "FusedMLPFunction", "fused_mlp", "kernel_supports"]

MAX_WIDTH = 128  # the widest layer the fused kernels take (triton_kernels.fused_mlp.MAX_WIDTH)

Spec = tuple[str | None, str | None, float, float]  # hidden act, output act, their slopes


def _acts(spec: Spec) -> tuple[tuple[Activation | None, Activation | None], tuple[float, float]]:
    hidden, out, hidden_slope, out_slope = spec
    return (get_activation(hidden), get_activation(out)), (hidden_slope, out_slope)


def _kind(act: Activation | None, slope: float) -> str:
    return "none" if act is None else act.saved_for(slope)


class FusedMLPFunction(Function):
    """``FusedMLPFunction.apply(input, spec, w_0, b_0, w_1, b_1, ...)`` returns ``(y, saved)``.

    ``spec = (hidden_activation, output_activation, hidden_slope, output_slope)``; each ``b_l``
    may be ``None``. ``saved`` (a tuple, not differentiable) is what the backward reads: per
    hidden layer the activation's output or pre-activation (``Activation.saved_for``), and the
    last layer's pre-activation or ``None``. Inputs are not validated: use :func:`fused_mlp`.
    """

    @staticmethod
    def forward(input: Tensor, spec: Spec, *params: Tensor | None) -> tuple[Tensor, tuple]:
        acts, slopes = _acts(spec)
        weights, biases = params[0::2], params[1::2]
        y, saved = backend_for(input, *weights).mlp_forward(
            input, list(weights), list(biases), acts, slopes, store=True
        )
        return y, tuple(saved)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, spec, *params = inputs
        y, saved = output
        acts, slopes = _acts(spec)
        out_reads_y = _kind(acts[1], slopes[1]) == "output"
        ctx.save_for_backward(input, y if out_reads_y else None, *params)
        ctx.save_for_forward(input, y if out_reads_y else None, *params)  # for jvp
        # Internal tensors, not outputs (no one else holds them; keeping them on ctx makes no
        # reference cycle, which keeping y there would: y is saved through save_for_backward).
        ctx.saved_hidden = saved
        ctx.spec = spec
        ctx.backend_choice = get_backend()  # backward may run on autograd's device thread
        ctx.has_bias = tuple(b is not None for b in params[1::2])
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx: Any, input_t: Tensor | None, _spec_t: None, *params_t: Tensor | None) -> tuple:
        """Forward mode, layer by layer: ``Ż_l = Ḣ_{l-1} W_l^T + H_{l-1} Ẇ_l^T + ḃ_l`` and
        ``Ḣ_l = act'(Z_l) ⊙ Ż_l`` (the elementwise map of the backward's ``dZ = act' ⊙ dY``)."""
        input, y, *params = ctx.saved_tensors
        saved = ctx.saved_hidden
        (act_h, act_o), (slope_h, slope_o) = _acts(ctx.spec)
        L = len(params) // 2
        h, h_t = input, input_t
        for i in range(L):
            w, w_t, b_t = params[2 * i], params_t[2 * i], params_t[2 * i + 1]
            terms = (
                None if h_t is None else F.linear(h_t, w),
                None if w_t is None else F.linear(h, w_t),
                b_t,
            )
            h_t = None
            for term in terms:
                if term is not None:
                    h_t = term if h_t is None else h_t + term
            act, slope = (act_o, slope_o) if i == L - 1 else (act_h, slope_h)
            if i < L - 1:
                s = saved[i]
                if h_t is not None and act is not None:
                    h_t = act.grad(h_t, s, slope)
                h = act.forward(s, slope) if _kind(act, slope) == "preact" else s
            elif h_t is not None and act is not None:
                h_t = act.grad(h_t, saved[i] if _kind(act, slope) == "preact" else y, slope)
        return h_t, None

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor | None, _grad_saved: None) -> tuple:
        """Layers in reverse, ``dY_{L-1} = dL/dy``:

        dZ_l = dY_l * act'(Z_l)   (act' read off the saved y or z, see activations.py)
        dW_l = dZ_l^T H_{l-1},  db_l = sum_rows dZ_l,  dY_{l-1} = dZ_l W_l   (H_{-1} = X)

        When the backward is itself recorded (``create_graph=True``) the forward is recomputed
        in differentiable torch ops and the reference backward runs on it. Derivation:
        docs/derivations.md ("A fused MLP").
        """
        L = len(ctx.has_bias)
        if grad_output is None:
            return (None,) * (2 + 2 * L)
        input, y, *params = ctx.saved_tensors
        weights, biases = params[0::2], params[1::2]
        acts, slopes = _acts(ctx.spec)
        saved = ctx.saved_hidden
        differentiable = torch.is_grad_enabled()
        if differentiable:
            y, saved = REFERENCE.mlp_forward(input, weights, biases, acts, slopes, store=True)
        needs = ctx.needs_input_grad
        rows = [None if t is None else as_rows(t) for t in (grad_output, input, y, *saved)]
        grad_y, x, y2, saved2 = rows[0], rows[1], rows[2], rows[3:]
        backend = backend_for(
            grad_y, x, *weights, differentiable=differentiable, choice=ctx.backend_choice
        )
        dx, dws, dbs = backend.mlp_backward(
            grad_y, x, list(weights), y2, saved2, acts, slopes, ctx.has_bias,
            (needs[0], any(needs[2:])),
        )  # fmt: skip
        grads: list[Tensor | None] = [None if dx is None else dx.view(input.shape), None]
        for i in range(L):
            grads.append(dws[i] if needs[2 + 2 * i] else None)
            grads.append(dbs[i] if needs[3 + 2 * i] else None)
        return tuple(grads)


FUSED_MLP = Forms.of(FusedMLPFunction)
FusedMLPFunctionEager = FUSED_MLP.eager


# --------------------------------------------------------------------------------------------
# The validated entry point
# --------------------------------------------------------------------------------------------
def _check(input: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None]) -> None:
    if not weights or len(biases) != len(weights):
        raise ValueError("fused_mlp: expected one or more weights and one bias (or None) each")
    width = input.shape[-1] if input.dim() else None
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if w.dim() != 2 or w.shape[1] != width:
            raise ShapeError(
                f"fused_mlp: weight {i} has shape {tuple(w.shape)}, expected (out, {width})"
            )
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ShapeError(f"fused_mlp: bias {i} has shape {tuple(b.shape)}, expected "
                             f"({w.shape[0]},)")  # fmt: skip
        width = w.shape[0]
    tensors = [input, *weights, *(b for b in biases if b is not None)]
    if len({t.dtype for t in tensors}) > 1 or not input.dtype.is_floating_point:
        raise TypeError("fused_mlp: expected floating-point tensors of one dtype")
    if len({t.device for t in tensors}) > 1:
        raise RuntimeError("fused_mlp: expected all tensors on the same device")


def kernel_supports(input: Tensor, weights: Sequence[Tensor]) -> bool:
    """Whether the fused kernels take this MLP (widths <= 128, a bounded depth, a dtype they
    compile spill-free for; IEEE fp32 wider than 64 runs layer by layer on a GPU, see
    fused_mlp.supports)."""
    from manualbp.kernels import fused_mlp as kernels

    dims = (weights[0].shape[1], *(w.shape[0] for w in weights))
    return kernels.supports(dims, input.dtype, input.device)


def _layerwise(input, weights, biases, spec: Spec) -> Tensor:
    """The same MLP one :func:`manualbp.functional.linear` call per layer."""
    from manualbp import functional

    hidden, out, hidden_slope, out_slope = spec
    h = input
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        last = i == len(weights) - 1
        act, slope = (out, out_slope) if last else (hidden, hidden_slope)
        h = functional.linear(h, w, b, act, negative_slope=slope)
    return h


def _autocast(input, weights, biases):
    """The tensors as autocast casts them for ``F.linear``, and the context that switches
    autocast off (see :mod:`manualbp._autocast`)."""
    dtype = autocast.dtype_for(input.device.type)
    input, *params = autocast.cast(dtype, input, *weights, *biases)
    n = len(weights)
    return input, params[:n], params[n:], autocast.off(input.device.type, dtype)


def fused_mlp(
    input: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activation: str | None = "relu",
    output_activation: str | None = None,
    *,
    negative_slope: float = 0.01,
    output_negative_slope: float | None = None,
) -> Tensor:
    """``act_o(... act(act(input W_0^T + b_0) W_1^T + b_1) ... W_{L-1}^T + b_{L-1})``.

    ``weights[i]`` is (out_l, in_l) in the ``nn.Linear`` layout with ``in_0 =
    input.shape[-1]``, ``in_l = out_{l-1}``; ``biases[l]`` is (out_l,) or ``None``. The hidden
    layers apply ``activation`` (slope ``negative_slope`` for leaky_relu), the last layer
    ``output_activation`` (slope ``output_negative_slope``, default ``negative_slope``).

    On the Triton backend, widths up to 128 run as one fused forward kernel (under
    ``torch.compile`` too: the kernels are custom ops there); otherwise (wider layers,
    ``torch.func`` transforms, ``torch.export`` / ``torch.jit.trace``) each layer is one
    :func:`manualbp.functional.linear` call. Under autocast it computes in the autocast dtype.
    """
    get_activation(activation)
    get_activation(output_activation)
    out_slope = negative_slope if output_negative_slope is None else output_negative_slope
    spec: Spec = (activation, output_activation, float(negative_slope), float(out_slope))
    input, weights, biases, autocast_off = _autocast(input, list(weights), list(biases))
    _check(input, weights, biases)
    with autocast_off:
        return _fused_mlp(input, weights, biases, spec)


def _fused_mlp(input: Tensor, weights: list, biases: list, spec: Spec) -> Tensor:
    from manualbp.functional import _captured

    # torch.func transforms, torch.export, torch.jit.trace: plain ops they can record.
    transforms = torch._C._are_functorch_transforms_active() or _captured()
    on_kernels = resolve(input, *weights) == "triton"
    if transforms or (on_kernels and not kernel_supports(input, weights)):
        return _layerwise(input, weights, biases, spec)
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in [input, *params]):
        # Under torch.compile the jvp-less form (Dynamo traces it; the kernels are custom ops).
        return FUSED_MLP.pick().apply(input, spec, *params)[0]
    # No graph to record: the forward alone, keeping nothing for a backward.
    acts, slopes = _acts(spec)
    y, _ = backend_for(input, *weights).mlp_forward(
        input, weights, biases, acts, slopes, store=False
    )
    return y
