"""A whole narrow MLP as one op, and the MSE loss folded into its last layer: the reference math,
the two autograd Functions and the entry points :func:`fused_mlp` and :func:`fused_mlp_mse_loss`.

``y = act_o(... act_h(act_h(x W_0^T + b_0) W_1^T + b_1) ... W_{L-1}^T + b_{L-1})``: every hidden
layer shares one activation (``act_h``), the last layer has its own (``act_o``, often none). On
the Triton path the forward is one kernel launch and the backward two or three
(``triton_kernels/fused_mlp.py``); on the reference path each is a loop of the Linear ops.

Folded loss: ``loss = mse(mlp(x), target)`` (``"mean"`` / ``"sum"``): the forward is the fused
MLP's launch with the loss in the last layer's epilogue (each row tile's sum of squares) plus a
one-program launch summing those partials in a fixed order; the backward the MLP's, forming its
first ``dY = g norm (y - t)`` from the stored y, the target and ``g``, rounded once, as natively.
What it cannot fold (``reduction="none"``, a target that broadcasts, requires grad or promotes
the loss past the MLP's dtype, torch.func, forward AD, export / jit.trace, DTensors) runs as
:func:`fused_mlp` then :func:`~manualbp.ops.mse.mse_loss`, with the same result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from manualbp import _mode
from manualbp.activations import Act, bind, resolve_param
from manualbp.errors import ShapeError
from manualbp.kernels import library
from manualbp.ops import linear as _linear
from manualbp.ops._checks import check_reduction, require_tensor
from manualbp.ops.linear import act_grad, as_rows, linear
from manualbp.ops.mse import mse_loss, norm_of

__all__ = [
    "MAX_WIDTH",
    "FusedMLPFunction",
    "FusedMLPMSELossFunction",
    "fused_mlp",
    "fused_mlp_mse_loss",
    "reference_backward",
    "reference_forward",
]

MAX_WIDTH = 128  # the widest layer the fused kernels take (triton_kernels.fused_mlp.MAX_WIDTH)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _stores_z(act: Act | None) -> bool:
    return act is not None and act.reads_preact


def _name(act: Act | None) -> str | None:
    return None if act is None else act.name


def _slopes(hidden: Act | None, out: Act | None) -> tuple[float, float]:
    return (0.01 if hidden is None else hidden.slope), (0.01 if out is None else out.slope)


# --------------------------------------------------------------------------------------------
# The reference math
# --------------------------------------------------------------------------------------------
def reference_forward(
    x: Tensor, weights, biases, hidden: Act | None, out: Act | None, *, store: bool
) -> tuple[Tensor, list[Tensor | None]]:
    """The MLP layer by layer, ``H_l = act_l(H_{l-1} W_l^T + b_l)``, ``H_{-1} = x``. With
    ``store``, per layer what its activation's derivative reads: for a hidden layer z or y
    (y also without an activation), for the last its z if the output activation reads z."""
    h, saved, last = x, [], len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        act = out if i == last else hidden
        h, z = _linear.reference_forward(h, w, b, act, store_preact=store and _stores_z(act))
        if store:
            saved.append(z if _stores_z(act) else (None if i == last else h))
    return h, saved


def reference_backward(
    grad_y: Tensor | None,
    x: Tensor,
    weights: Sequence[Tensor],
    y: Tensor | None,
    saved: Sequence[Tensor | None],
    hidden: Act | None,
    out: Act | None,
    has_bias: Sequence[bool],
    needs: tuple[bool, bool],
    extra: Sequence[Tensor | None] = (),
    dzs: list | None = None,
) -> tuple[Tensor | None, list | None, list | None]:
    """Layers in reverse, each the Linear backward at its input ``H_{l-1}`` (x, the saved y,
    or the activation of the saved z recomputed) and its saved ``s_l``:

    dZ_l = dY_l * act'(s_l),  dW_l = dZ_l^T H_{l-1},  db_l = sum dZ_l,  dY_{l-1} = dZ_l W_l

    ``extra[l]``: a gradient reaching layer l's saved tensor itself (a double backward): it
    adds to dY_l where that tensor is y, to dZ_l where it is z. ``dzs``: a list of L entries
    that receives each dZ_l (for the second order)."""
    need_dx, need_params = needs
    last = len(weights) - 1
    dws: list = [None] * len(weights)
    dbs: list = [None] * len(weights)
    g = grad_y if grad_y is not None else x.new_zeros(x.shape[0], weights[-1].shape[0])
    for i in range(last, -1, -1):
        act = out if i == last else hidden
        s = saved[i] if i < last or _stores_z(act) else y
        inject = extra[i] if i < len(extra) else None
        if inject is not None and not _stores_z(act):
            g = g + inject
        dz = act_grad(g, s, act)
        if inject is not None and _stores_z(act):
            dz = dz + inject
        if dzs is not None:
            dzs[i] = dz
        h = x if i == 0 else saved[i - 1]
        if i > 0 and _stores_z(hidden) and need_params:  # H_{l-1} is read by dW_l alone
            h = hidden.forward(h)
        needs_l = (i > 0 or need_dx, need_params, need_params and has_bias[i])
        g, dws[i], dbs[i] = _linear.reference_backward(dz, h, weights[i], None, None, needs_l)
    return (g if need_dx else None), (dws if need_params else None), (dbs if need_params else None)


def reference_second_order(
    ddx: Tensor,
    v: Tensor,
    weights: Sequence[Tensor],
    y: Tensor | None,
    saved: Sequence[Tensor | None],
    dzs: Sequence[Tensor],
    hidden: Act | None,
    out: Act | None,
) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
    """The backward of the first-order backward (:func:`reference_backward`, ``dx`` of the
    upstream gradient ``v``), given ``ddx = dL/d(dx)``: ``(dL/dv, [dL/dW_l], [dL/ds_l])`` with
    the saved tensors held fixed (what reaches x, W and b through them is the first-order
    backward's, fed ``dL/ds_l``). With ``a_{-1} = ddx``, layers forward (the R-op: ``a`` is the
    tangent of h along x + eps ddx):

        dL/dW_l = dZ_l^T a_{l-1}              (dY_{l-1} = dZ_l W_l)
        zdot_l  = a_{l-1} W_l^T,   a_l = act'(s_l) * zdot_l
        dL/ds_l = zdot_l * dY_l * d act'/d s_l   (dZ_l = dY_l * act'(s_l); dY_{L-1} = v)
        dL/dv   = a_{L-1}

    ``s_l`` is the layer's saved tensor (the last layer's: its z, or y where the output
    activation reads y; ``None`` without activation). Derivation: docs/derivations.md, 10."""
    last = len(weights) - 1
    a, grad_w, grad_s = ddx, [], []
    for i in range(last + 1):
        act = out if i == last else hidden
        grad_w.append(dzs[i].mT @ a)
        zdot = a @ weights[i].mT
        if act is None:
            grad_s.append(None)
            a = zdot
            continue
        s = saved[i] if i < last or act.reads_preact else y
        g = v if i == last else dzs[i + 1] @ weights[i + 1]
        grad_s.append(act.grad2(zdot * g, s))
        a = act.grad(zdot, s)
    return a, grad_w, grad_s


def _kernel_supports(x: Tensor, weights: Sequence[Tensor]) -> bool:
    """Whether the fused kernels take this MLP (see ``triton_kernels.fused_mlp.supports``)."""
    dims = (weights[0].shape[1], *(w.shape[0] for w in weights))
    return library.load("fused_mlp").supports(dims, x.dtype, x.device)


def _kernels(x: Tensor, weights: Sequence[Tensor], choice: str | None = None) -> Any:
    """The fused-MLP launchers (their custom ops while torch.compile traces), or ``None``: the
    reference ops (reference backend, torch.func transforms, DTensor operands)."""
    if _mode.transforms_active() or library.any_dtensor(x, *weights):
        return None
    if not _mode.kernels_for(x, *weights, choice=choice):
        return None
    return library if _mode.compiling() else library.load("fused_mlp")


def _contiguous(tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    return [None if t is None else t.contiguous() for t in tensors]


def _as_native_saves(ctx: Any, weights: Sequence[Tensor]) -> tuple[Tensor | None, ...]:
    """The weights a backward reads, as native Linear layers save them: W_0 only where the
    input needs a gradient (dX = dZ_0 W_0; nothing else reads it), so that an in-place change
    of W_0 between forward and backward is an error exactly where it is natively."""
    ctx.first_weight_shape = weights[0].shape
    return (weights[0] if ctx.needs_input_grad[0] else None, *weights[1:])


def _kernel_weights(ctx: Any, weights: Sequence[Tensor | None], like: Tensor) -> list[Tensor]:
    """The backward kernels' weights, contiguous; an unsaved W_0 (never read: no dX) as a
    one-element stand-in of its shape."""
    first = weights[0]
    if first is None:
        first = like.new_empty(()).expand(ctx.first_weight_shape)
    return [first, *_contiguous(weights[1:])]


# --------------------------------------------------------------------------------------------
# The autograd Functions
# --------------------------------------------------------------------------------------------
class FusedMLPFunction(Function):
    """``apply(input, hidden, out, hidden_slope, out_slope, w_0, b_0, w_1, b_1, ...)`` returns
    ``(y, *saved)`` for 2-D ``input`` (M, k_0).

    ``hidden`` / ``out``: the hidden layers' and the last layer's activation (registry names or
    ``None``) with their slopes; each ``b_l`` may be ``None``. ``saved`` is what the backward
    reads: per hidden layer the activation's output or pre-activation, and the last layer's
    pre-activation or ``None``; differentiable (a double backward differentiates through them).
    It saves x, the weights and those: no bias. Inputs are not validated: use
    :func:`fused_mlp`.
    """

    @staticmethod
    def forward(input, hidden, out, hidden_slope, out_slope, *params) -> tuple:
        acts = bind(hidden, hidden_slope), bind(out, out_slope)
        weights, biases = list(params[0::2]), list(params[1::2])
        y, saved = _forward(input, weights, biases, *acts, store=True)
        return y, *saved

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, hidden, out, hidden_slope, out_slope, *params = inputs
        y, *saved = output
        ctx.acts = bind(hidden, hidden_slope), bind(out, out_slope)
        out_reads_y = ctx.acts[1] is not None and not ctx.acts[1].reads_preact
        weights = params[0::2]
        ctx.save_for_backward(input, y if out_reads_y else None,
                              *_as_native_saves(ctx, weights), *saved)  # fmt: skip
        if _mode.setup(ctx, *saved):
            ctx.save_for_forward(input, y if out_reads_y else None, *weights, *saved)
        ctx.has_bias = tuple(b is not None for b in params[1::2])

    @staticmethod
    def jvp(ctx: Any, input_t, _h, _o, _hs, _os, *params_t) -> tuple:
        """Forward mode, layer by layer: ``Ż_l = Ḣ_{l-1} W_l^T + H_{l-1} Ẇ_l^T + ḃ_l`` and
        ``Ḣ_l = act'(Z_l) ⊙ Ż_l`` (the elementwise map of the backward's ``dZ = act' ⊙ dY``)."""
        L = len(ctx.has_bias)
        input, y, *rest = ctx.saved_tensors
        weights, saved = rest[:L], rest[L:]
        hidden, out = ctx.acts
        h, h_t, tangents = input, input_t, []
        for i in range(L):
            w, w_t, b_t = weights[i], params_t[2 * i], params_t[2 * i + 1]
            z_t = None
            for term in (None if h_t is None else F.linear(h_t, w),
                         None if w_t is None else F.linear(h, w_t), b_t):  # fmt: skip
                if term is not None:
                    z_t = term if z_t is None else z_t + term
            act = out if i == L - 1 else hidden
            s = saved[i] if i < L - 1 or _stores_z(act) else y
            h_t = z_t if z_t is None or act is None else act.grad(z_t, s)
            tangents.append(z_t if _stores_z(act) else (h_t if i < L - 1 else None))
            if i < L - 1:
                h = hidden.forward(s) if _stores_z(hidden) else s
        return h_t, *tangents

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor | None, *grad_saved: Tensor | None) -> tuple:
        """Layers in reverse, ``dY_{L-1} = dL/dy``:

        dZ_l = dY_l * act'(Z_l)   (act' read off the saved y or z, see activations.py)
        dW_l = dZ_l^T H_{l-1},  db_l = sum_rows dZ_l,  dY_{l-1} = dZ_l W_l   (H_{-1} = X)

        Gradients reaching the saved tensors themselves (a double backward) add where they
        meet the chain; then, and when the backward is itself recorded, the reference ops
        run. Derivation: docs/derivations.md ("A fused MLP").
        """
        L = len(ctx.has_bias)
        grad_saved = _mode.internal_grads(*grad_saved)
        if grad_output is None and all(g is None for g in grad_saved):
            return (None,) * (5 + 2 * L)
        input, y, *rest = ctx.saved_tensors
        weights, saved = rest[:L], rest[L:]
        # Only what this backward pass reaches (an input gradient alone: no weight gradients).
        tensor_args = (True, False, False, False, False,
                       *(t for has in ctx.has_bias for t in (True, has)))  # fmt: skip
        needs = _mode.reached(ctx, tensor_args)
        want = (needs[0], any(needs[5:]))
        kernels = None
        plain = grad_output is not None and all(g is None for g in grad_saved)
        if plain and _mode.second_order_op() and weights[0] is not None:
            # Recorded for a double backward: the backward as an op of its own (its backward
            # hand-derived: FusedMLPGradFunction), not a graph of reference ops.
            hidden, out = ctx.acts
            slopes = _slopes(hidden, out)
            grads = FUSED_MLP_GRAD(grad_output, input, y, _name(hidden), _name(out), *slopes,
                                   ctx.has_bias, want, ctx.choice, *weights, *saved)  # fmt: skip
            return _input_grads(grads[0], grads[1 : 1 + L], grads[1 + L : 1 + 2 * L], needs, L, 5)
        if _mode.backward_kernels(grad_output, input, *weights, choice=ctx.choice):
            kernels = _kernels(input, weights, ctx.choice)
        hidden, out = ctx.acts
        if kernels is None:
            dx, dws, dbs = reference_backward(grad_output, input, weights, y, saved, hidden, out,
                                              ctx.has_bias, want, grad_saved)  # fmt: skip
        else:
            out_saved = None if out is None else (saved[-1] if out.reads_preact else y)
            injected = any(g is not None for g in grad_saved)  # a second order's
            extra = {"inject": _contiguous(grad_saved)} if injected else {}
            dx, dws, dbs = kernels.mlp_backward(
                grad_output, input, _kernel_weights(ctx, weights, input), _contiguous(saved[:-1]),
                None if out_saved is None else out_saved.contiguous(), _name(hidden),
                _name(out), _slopes(hidden, out), has_bias=ctx.has_bias,
                hidden_preact=_stores_z(hidden), need_dx=want[0], need_params=want[1], **extra,
            )  # fmt: skip
        return _input_grads(dx, dws, dbs, needs, L, 5)


class FusedMLPGradFunction(Function):
    """The fused MLP's first-order backward as an op of its own, so that a double backward
    (``create_graph=True``: an input gradient inside the loss) runs hand-derived, fused code.

    ``apply(v, input, y, hidden, out, hidden_slope, out_slope, has_bias, needs, choice, w_0, ...,
    w_{L-1}, s_0, ..., s_{L-1})`` returns ``(dx, dW_0.., db_0.., dZ_0..)``: the gradients of
    :class:`FusedMLPFunction` for upstream ``v`` (``None`` where ``needs`` says not needed), and
    each layer's dZ (not differentiable: what the second order reads). ``y`` and ``s_l`` are the
    forward's saved tensors; through them (and so through z_l's dependence on x, W and b) the
    second order reaches the forward's inputs, as native autograd does through what it saves.
    """

    @staticmethod
    def forward(v, input, y, hidden, out, hidden_slope, out_slope, has_bias, needs, choice,
                *rest) -> tuple:  # fmt: skip
        L = len(has_bias)
        weights, saved = rest[:L], rest[L:]
        acts = bind(hidden, hidden_slope), bind(out, out_slope)
        dzs: list = [None] * L
        kernels = _kernels(input, weights, choice)
        if kernels is None:
            dx, dws, dbs = reference_backward(v, input, weights, y, saved, *acts, has_bias, needs,
                                              dzs=dzs)  # fmt: skip
        else:
            out_saved = None if acts[1] is None else (saved[-1] if acts[1].reads_preact else y)
            dx, dws, dbs, dzs = kernels.mlp_backward(
                v, input, _contiguous(weights), _contiguous(saved[:-1]),
                None if out_saved is None else out_saved.contiguous(), hidden, out,
                _slopes(*acts), has_bias=has_bias, hidden_preact=_stores_z(acts[0]),
                need_dx=needs[0], need_params=needs[1], return_dz=True,
            )  # fmt: skip
        # The last layer's dZ is v itself without an output activation: a view, as a Function
        # must return (and save) an input it gives back.
        dzs = [d.view_as(d) if d is v else d for d in dzs]
        return dx, *(dws or [None] * L), *(dbs or [None] * L), *dzs

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        v, input, y, hidden, out, hidden_slope, out_slope, has_bias, needs, choice, *rest = inputs
        L = len(has_bias)
        dzs = output[1 + 2 * L :]
        ctx.mark_non_differentiable(*dzs)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(v, input, y, *rest, *dzs)
        ctx.acts = bind(hidden, hidden_slope), bind(out, out_slope)
        ctx.spec = (has_bias, needs, choice)

    @staticmethod
    def backward(ctx: Any, ddx: Tensor | None, *dd: Tensor | None) -> tuple:
        """The second order (:func:`reference_second_order`): with only ``dL/d(dx)`` given (an
        input gradient in the loss), the hand-derived R-op, fused on the kernels; otherwise
        (``dL/dW`` or ``dL/db`` given too, or recorded for a third order) the first-order
        reference ops differentiated by autograd."""
        has_bias, _, choice = ctx.spec
        L = len(has_bias)
        v, input, y, *rest = ctx.saved_tensors
        weights, saved, dzs = rest[:L], rest[L : 2 * L], rest[2 * L :]
        hidden, out = ctx.acts
        none = (None,) * 10
        if ddx is None and all(d is None for d in dd[: 2 * L]):
            return (*none, *(None,) * (2 * L))
        if any(d is not None for d in dd[: 2 * L]) or not _mode.in_place_ok(v):
            return _autograd_second_order(ctx, ddx, dd[: 2 * L], v, input, y, weights, saved)
        kernels = _kernels(input, weights, choice)
        dims = (weights[0].shape[1], *(w.shape[0] for w in weights))
        if kernels is not None and not kernels.second_order_supports(dims):
            kernels = None  # too wide for the fused R-op: torch ops
        if kernels is None:
            grad_v, grad_w, grad_s = reference_second_order(ddx, v, weights, y, saved, dzs, hidden,
                                                            out)  # fmt: skip
        else:
            out_saved = None if out is None else (saved[-1] if out.reads_preact else y)
            grad_v, grad_w, grad_s = kernels.mlp_second_order(
                ddx.contiguous(), v, _contiguous(weights), _contiguous(saved[:-1]),
                None if out_saved is None else out_saved.contiguous(), dzs, _name(hidden),
                _name(out), _slopes(hidden, out), hidden_preact=_stores_z(hidden),
            )  # fmt: skip
        out_reads_y = out is not None and not out.reads_preact
        grad_y, last = (grad_s[-1], None) if out_reads_y else (None, grad_s[-1])
        needs_in = ctx.needs_input_grad
        return (grad_v if needs_in[0] else None, None, grad_y, *none[3:],
                *(g if needs_in[10 + i] else None for i, g in enumerate(grad_w)),
                *grad_s[:-1], last)  # fmt: skip


def _autograd_second_order(ctx, ddx, dd, v, input, y, weights, saved) -> tuple:
    """The general second order: the first-order reference backward recomputed from the saved
    tensors and differentiated by autograd (differentiable itself when recorded: a third order
    through the reference ops)."""
    has_bias, needs, _ = ctx.spec
    L = len(has_bias)
    hidden, out = ctx.acts
    needs_in = ctx.needs_input_grad
    inputs = [v, input, y, *weights, *saved]
    wants = [needs_in[0], needs_in[1], needs_in[2], *needs_in[10:]]
    with torch.enable_grad():
        # A view of a tensor in the graph keeps a third order connected to it.
        leaves = [t if t is None or not want else
                  t.view_as(t) if t.requires_grad else t.detach().requires_grad_()
                  for t, want in zip(inputs, wants, strict=True)]  # fmt: skip
        lv, lx, ly, *lrest = leaves
        dx, dws, dbs = reference_backward(lv, lx, lrest[:L], ly, lrest[L:], hidden, out, has_bias,
                                          needs)  # fmt: skip
        outs = [dx, *(dws or [None] * L), *(dbs or [None] * L)]
        pairs = [(o, g) for o, g in zip(outs, (ddx, *dd), strict=True)
                 if o is not None and g is not None and o.requires_grad]  # fmt: skip
        targets = [t for t in leaves if t is not None and t.requires_grad]
        grads = torch.autograd.grad(
            [o for o, _ in pairs],
            targets,
            [g for _, g in pairs],
            allow_unused=True,
            create_graph=torch.is_grad_enabled(),
        )
    found = iter(grads)
    result = [next(found) if t is not None and t.requires_grad else None for t in leaves]
    v_g, x_g, y_g, *rest_g = result
    return (v_g, x_g, y_g, *(None,) * 7, *rest_g)


FUSED_MLP_GRAD = _mode.Applier(FusedMLPGradFunction)


def _input_grads(dx, dws, dbs, needs, L: int, first_param: int) -> tuple:
    """The gradients in the Functions' argument order: input, the non-tensor arguments, then
    ``w_0, b_0, w_1, b_1, ...``."""
    grads: list[Tensor | None] = [dx if needs[0] else None, *(None,) * (first_param - 1)]
    for i in range(L):
        grads.append(dws[i] if needs[first_param + 2 * i] else None)
        grads.append(dbs[i] if needs[first_param + 1 + 2 * i] else None)
    return tuple(grads)


def _forward(x, weights, biases, hidden: Act | None, out: Act | None, *, store: bool):
    """``(y, saved)`` on the path the call takes (``saved`` empty without ``store``)."""
    kernels = _kernels(x, weights)
    if kernels is None:
        return reference_forward(x, weights, biases, hidden, out, store=store)
    flags = (store, _stores_z(hidden), store and _stores_z(out))
    return kernels.mlp_forward(x, _contiguous(weights), _contiguous(biases), _name(hidden),
                               _name(out), _slopes(hidden, out), store=flags)  # fmt: skip


class FusedMLPMSELossFunction(Function):
    """``apply(input, target, reduction, loss_dtype, hidden, out, hidden_slope, out_slope, w_0,
    b_0, ...)`` returns ``(loss, y, *saved)``.

    ``input`` (M, k_0) and ``target`` (M, n_{L-1}) are 2-D (``target`` of any float dtype, not
    requiring grad); ``reduction`` ``"mean"`` or ``"sum"``; ``loss_dtype`` the loss's dtype;
    the MLP's arguments as :class:`FusedMLPFunction`'s. ``y`` and ``saved`` are what backward
    reads (differentiable: a double backward differentiates through them); it saves them, x,
    the weights and the target, no bias. Inputs are not validated: use
    :func:`fused_mlp_mse_loss`.
    """

    @staticmethod
    def forward(input, target, reduction, loss_dtype, hidden, out, hidden_slope, out_slope,
                *params) -> tuple:  # fmt: skip
        h, o = bind(hidden, hidden_slope), bind(out, out_slope)
        weights, biases = list(params[0::2]), list(params[1::2])
        return _loss_forward(input, target, weights, biases, h, o, reduction, loss_dtype, True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, target, reduction, _, hidden, out, hidden_slope, out_slope, *params = inputs
        _, y, *saved = output
        ctx.save_for_backward(input, target, y, *_as_native_saves(ctx, params[0::2]), *saved)
        ctx.acts = bind(hidden, hidden_slope), bind(out, out_slope)
        ctx.reduction = reduction
        ctx.has_bias = tuple(b is not None for b in params[1::2])
        _mode.setup(ctx, y, *saved)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, grad_y: Tensor | None, *grad_saved) -> tuple:
        """With ``y`` the MLP's output, ``D = y - t`` over its N elements and upstream ``g``:

        dY = g * 2D / N (mean; g * 2D for sum), formed in the loss dtype and rounded once, as
        native autograd forms it; then the fused MLP's chain (:class:`FusedMLPFunction`).
        A gradient reaching y or the saved tensors themselves (a double backward) adds where
        it meets the chain; then, and when the backward is recorded, the reference ops run.
        """
        L = len(ctx.has_bias)
        grad_y, *grad_saved = _mode.internal_grads(grad_y, *grad_saved)
        if grad_loss is None and grad_y is None and all(g is None for g in grad_saved):
            return (None,) * (8 + 2 * L)
        input, target, y, *rest = ctx.saved_tensors
        weights, saved = rest[:L], rest[L:]
        hidden, out = ctx.acts
        needs = ctx.needs_input_grad
        want = (needs[0], any(needs[8:]))
        plain = grad_y is None and all(g is None for g in grad_saved) and grad_loss is not None
        kernels = None
        if plain and _mode.backward_kernels(grad_loss, input, *weights, choice=ctx.choice):
            kernels = _kernels(input, weights, ctx.choice)
        if kernels is None:
            dy = None
            if grad_loss is not None:  # in the loss dtype, rounded once to the MLP's dtype
                dtype = torch.promote_types(grad_loss.dtype, torch.float32)
                d = y.to(dtype) - target.to(dtype)
                dy = (d * norm_of(ctx.reduction, d.numel()) * grad_loss.to(dtype)).to(y.dtype)
            if grad_y is not None:
                dy = grad_y if dy is None else dy + grad_y
            dx, dws, dbs = reference_backward(dy, input, weights, y, saved, hidden, out,
                                              ctx.has_bias, want, grad_saved)  # fmt: skip
        else:
            out_saved = None if out is None else (saved[-1] if out.reads_preact else y)
            dx, dws, dbs = kernels.mlp_backward(
                y, input, _kernel_weights(ctx, weights, input), _contiguous(saved[:-1]),
                None if out_saved is None else out_saved.contiguous(), _name(hidden),
                _name(out), _slopes(hidden, out), has_bias=ctx.has_bias,
                hidden_preact=_stores_z(hidden), need_dx=want[0], need_params=want[1],
                loss=(grad_loss, target, ctx.reduction),
            )  # fmt: skip
        return _input_grads(dx, dws, dbs, needs, L, 8)


def _loss_forward(x, target, weights, biases, hidden, out, reduction, loss_dtype, store):
    """``(loss, y, *saved)`` (``(loss,)`` without ``store``) on the path the call takes."""
    kernels = _kernels(x, weights)
    if kernels is None:
        y, saved = reference_forward(x, weights, biases, hidden, out, store=store)
        loss = F.mse_loss(y.to(loss_dtype), target.to(loss_dtype), reduction=reduction)
        return (loss, y, *saved) if store else (loss,)
    loss, y, saved = kernels.mlp_mse_forward(
        x, target, _contiguous(weights), _contiguous(biases), _name(hidden), _name(out),
        _slopes(hidden, out), reduction=reduction, loss_dtype=loss_dtype,
        mode="y" if store else "value", hidden_preact=_stores_z(hidden),
        out_preact=_stores_z(out),
    )  # fmt: skip
    return (loss, y, *saved) if store else (loss,)


FUSED_MLP = _mode.Applier(FusedMLPFunction)
FUSED_MLP_MSE = _mode.Applier(FusedMLPMSELossFunction)


# --------------------------------------------------------------------------------------------
# The entry points
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


def _acts(activation, output_activation, negative_slope, output_negative_slope):
    """The two activations and their parameters (``None``: each activation's default),
    validated."""
    out_slope = negative_slope if output_negative_slope is None else output_negative_slope
    bind(activation)  # unknown names raise here
    bind(output_activation)
    return (activation, output_activation, resolve_param(activation, negative_slope),
            resolve_param(output_activation, out_slope))  # fmt: skip


def _runs_fused(x: Tensor, weights: Sequence[Tensor]) -> bool:
    """Whether the MLP runs as one fused op: not where the layers must run one by one
    (torch.func transforms, export / jit.trace, a width or dtype the kernels do not take)."""
    if _mode.transforms_active() or _mode.captured():
        return False
    return not _mode.kernels_for(x, *weights) or _kernel_supports(x, weights)


def fused_mlp(
    input: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activation: str | None = "relu",
    output_activation: str | None = None,
    *,
    negative_slope: float | None = None,
    output_negative_slope: float | None = None,
) -> Tensor:
    """``act_o(... act(act(input W_0^T + b_0) W_1^T + b_1) ... W_{L-1}^T + b_{L-1})``.

    ``weights[i]`` is (out_l, in_l) in the ``nn.Linear`` layout with ``in_0 =
    input.shape[-1]``, ``in_l = out_{l-1}``; ``biases[l]`` is (out_l,) or ``None``. The hidden
    layers apply ``activation`` at parameter ``negative_slope`` (leaky_relu's slope, softplus's
    beta, sin's omega; ``None``: its default), the last layer ``output_activation`` at
    ``output_negative_slope`` (default: ``negative_slope``, or the activation's default).

    On the Triton backend, widths up to 128 run as one fused forward kernel (under
    ``torch.compile`` too: the kernels are custom ops there); otherwise (wider layers,
    ``torch.func`` transforms, ``torch.export`` / ``torch.jit.trace``) each layer is one
    :func:`~manualbp.ops.linear.linear` call. Under autocast it computes in the autocast dtype.
    """
    hidden, out, h_slope, o_slope = _acts(activation, output_activation, negative_slope,
                                          output_negative_slope)  # fmt: skip
    cast = _mode.autocast_dtype(input)
    input, *params = _mode.cast(cast, input, *weights, *biases)
    weights, biases = params[: len(weights)], params[len(weights) :]
    _check(input, weights, biases)
    with _mode.autocast_off(input) if cast is not None else contextlib.nullcontext():
        if not _runs_fused(input, weights):
            h = input
            for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
                last = i == len(weights) - 1
                h = linear(h, w, b, out if last else hidden,
                           negative_slope=o_slope if last else h_slope)  # fmt: skip
            return h
        x = as_rows(input)
        shape = (*input.shape[:-1], weights[-1].shape[0])
        params = [t for pair in zip(weights, biases, strict=True) for t in pair]
        if _mode.route(input, *params) == "nograd":  # the forward alone, keeping nothing
            y = _forward(x, weights, biases, bind(hidden, h_slope), bind(out, o_slope),
                         store=False)[0]  # fmt: skip
        else:
            y = FUSED_MLP(x, hidden, out, h_slope, o_slope, *params)[0]
        return y.view(shape)


def _loss_dtype(pred: torch.dtype, target: torch.dtype, autocast: bool) -> torch.dtype:
    """The dtype ``F.mse_loss`` computes in: the promoted one; under autocast float16/bfloat16
    operands are widened to float32 first (mse_loss runs in float32 there)."""
    if autocast:
        pred, target = (torch.float32 if d in _LOW_PRECISION else d for d in (pred, target))
    return torch.promote_types(pred, target)


def _folds(input: Tensor, target: Tensor, weights: list, reduction: str, loss_dtype) -> bool:
    """Whether the loss folds into the fused MLP (module docstring: what does not)."""
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
        and not _mode.forward_ad_on()  # forward-mode AD: the unfused ops' jvps
        and not library.any_dtensor(input, target, *weights)
        and _runs_fused(input, weights)
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
    negative_slope: float | None = None,
    output_negative_slope: float | None = None,
) -> Tensor:
    """``mse_loss(fused_mlp(input, weights, biases, ...), target, reduction)`` with the loss
    folded into the fused MLP's last layer.

    The MLP's arguments are :func:`fused_mlp`'s, the loss's ``F.mse_loss``'s (its size
    warning, broadcasting and shape errors, dtype promotion and autocast behaviour, a target
    gradient). For ``"mean"`` / ``"sum"`` with a target of the prediction's shape the loss is
    computed in the last layer's epilogue: on the Triton backend the forward is two launches
    (the MLP with the loss in its epilogue, then a fixed-order sum of the row tiles' partials)
    and the backward the fused MLP's, starting from the folded loss's gradient. Anything else
    (module docstring) runs unfused, with the same result.
    """
    require_tensor("input", input, "fused_mlp_mse_loss")
    require_tensor("target", target, "fused_mlp_mse_loss")
    check_reduction(reduction)
    hidden, out, h_slope, o_slope = _acts(activation, output_activation, negative_slope,
                                          output_negative_slope)  # fmt: skip
    cast = _mode.autocast_dtype(input)
    x, *params = _mode.cast(cast, input, *weights, *biases)
    ws, bs = params[: len(weights)], params[len(weights) :]
    _check(x, ws, bs)
    loss_dtype = _loss_dtype(x.dtype, target.dtype, cast is not None)
    if not _folds(x, target, ws, reduction, loss_dtype):
        y = fused_mlp(input, weights, biases, hidden, out, negative_slope=h_slope,
                      output_negative_slope=o_slope)  # fmt: skip
        return mse_loss(y, target, reduction)
    with _mode.autocast_off(x) if cast is not None else contextlib.nullcontext():
        params = [t for pair in zip(ws, bs, strict=True) for t in pair]
        rows, t = as_rows(x), as_rows(target).contiguous()  # the kernels read it contiguous
        if _mode.route(x, *params) == "nograd":  # the loss alone, nothing kept for a backward
            return _loss_forward(rows, t, ws, bs, bind(hidden, h_slope), bind(out, o_slope),
                                 reduction, loss_dtype, False)[0]  # fmt: skip
        return FUSED_MLP_MSE(rows, t, reduction, loss_dtype, hidden, out, h_slope, o_slope,
                             *params)[0]  # fmt: skip
