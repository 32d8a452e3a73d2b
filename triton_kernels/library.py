"""The ``torch.library`` boundary of the kernels: one custom op per kernel entry (namespace
``manualbp``), its fake implementation, and its DTensor sharding strategies. Importable without
triton: each op's body imports its launcher module when it first runs (:func:`load`).

Eager calls reach the launchers directly (a custom op costs 10-36 us per eager call). The custom
ops are what ``torch.compile`` traces (one opaque node whose fake gives shapes and dtypes) and
what ``DTensor`` operands go through: its dispatcher picks one of the strategies below
(redistributing operands only where none matches them as they are), runs the op on the local
shards and wraps the results. They are the strategies native ``F.linear`` and ``F.mse_loss``
resolve to, so the collectives are native's (given for one mesh dimension):

=======================  ===========================================  ========================
op                       operands                                     results
=======================  ===========================================  ========================
linear_forward           x R, W R, b R                                y R, z R
(``y = act(x W^T+b)``)   x R, W S(0), b S(0)    (column-parallel)     y S(-1), z S(-1)
                         x S(-1), W S(1), b P   (row, no activation)  y P
                         x S(d), W R, b R       (d a batch dim)       y S(d), z S(d)
linear_backward          dy R, x R, W R, s R                          dx R, dW R, db R
(``s``: saved y or z)    dy S(1), x R, W S(0), s S(1)   (column)      dx P, dW S(0), db S(0)
                         dy R, x S(1), W S(1), s R      (row)         dx S(1), dW S(1), db R
                         dy S(0), x S(0), W R, s S(0)   (rows)        dx S(0), dW P, db P
                         dy P, x R, W R, s R                          dx P, dW P, db P
mse_forward              input, target R                              loss R, grad R
                         input, target S(d), ``none``                 loss S(d)
                         input, target S(d), ``sum``                  loss P, grad S(d)
mse_backward             g R, input, target R                         R
                         g S(d), input, target S(d), ``none``         S(d)
                         g R, input, target S(d), ``sum``             S(d)
=======================  ===========================================  ========================

(R Replicate, S(d) Shard(d), P Partial sum; empty results, as unneeded gradients are, are
replicated.) What needs the registry (a row-parallel Linear's activation after the all-reduce,
the ``"mean"`` of sharded MSE operands) is composed by the ops (``manualbp/ops``).

A custom op returns tensors only: an absent output comes back as an empty tensor; the wrappers
(:func:`linear_forward`, ...) give ``None`` back, as the launchers do.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

__all__ = ["any_dtensor", "linear_backward", "linear_forward", "load", "mlp_backward",
           "mlp_forward", "mlp_mse_forward", "mse_backward", "mse_forward", "reduce_partial",
           "routed", "sharded"]  # fmt: skip


def load(name: str) -> ModuleType:
    """The launcher module ``manualbp.kernels.<name>`` (``linear``, ``mse``, ``fused_mlp``,
    ``sgd``), imported on first use: importing triton must wait until a kernel runs (it fixes
    ``TRITON_INTERPRET`` for the process). Plain import statements, which torch.compile can
    trace (it cannot trace ``importlib``)."""
    if name == "linear":
        from . import linear as module
    elif name == "mse":
        from . import mse as module
    elif name == "fused_mlp":
        from . import fused_mlp as module
    elif name == "sgd":
        from . import sgd as module
    else:
        raise KeyError(f"no launcher module {name!r}")
    return module


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return _empty(like) if t is None else t


# --------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("manualbp::linear_forward", mutates_args=())
def linear_forward_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
    negative_slope: float, store_preact: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(act(x W^T + b), x W^T + b or empty)`` for ``x`` (*, K)."""
    y, z = load("linear").forward(x, weight, bias, activation, negative_slope,
                                  store_preact=store_preact)  # fmt: skip
    return y, _or_empty(z, y)


@linear_forward_op.register_fake
def _(x, weight, bias, activation, negative_slope, store_preact):
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), (x.new_empty(shape) if store_preact else _empty(x))


def linear_forward(x, weight, bias, activation, negative_slope, *, store_preact):
    """:func:`linear_forward_op`, ``None`` for an unkept pre-activation."""
    y, z = linear_forward_op(x, weight, bias, activation, float(negative_slope), store_preact)
    return y, (z if store_preact else None)


@torch.library.custom_op("manualbp::linear_backward", mutates_args=())
def linear_backward_op(grad_y: Tensor, x: Tensor | None, weight: Tensor | None,
                       saved: Tensor | None, activation: str | None, negative_slope: float,
                       needs_grad: list[bool]) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(dx, dW, db)``, empty where not needed."""
    grads = load("linear").backward(grad_y, x, weight, saved, activation, negative_slope,
                                    needs_grad=tuple(needs_grad))  # fmt: skip
    return tuple(_or_empty(g, grad_y) for g in grads)  # type: ignore[return-value]


@linear_backward_op.register_fake
def _(grad_y, x, weight, saved, activation, negative_slope, needs_grad):
    M, N = grad_y.shape
    return (grad_y.new_empty(M, weight.shape[1]) if needs_grad[0] else _empty(grad_y),
            grad_y.new_empty(N, x.shape[1]) if needs_grad[1] else _empty(grad_y),
            grad_y.new_empty(N) if needs_grad[2] else _empty(grad_y))  # fmt: skip


def linear_backward(grad_y, x, weight, saved, activation, negative_slope, *, needs_grad):
    """:func:`linear_backward_op`, ``None`` where not needed."""
    grads = linear_backward_op(grad_y, x, weight, saved, activation, float(negative_slope),
                               list(needs_grad))  # fmt: skip
    return tuple(g if need else None for g, need in zip(grads, needs_grad, strict=True))


# --------------------------------------------------------------------------------------------
# MSE
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("manualbp::mse_forward", mutates_args=())
def mse_forward_op(input: Tensor, target: Tensor, reduction: str,
                   compute_grad: bool) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(loss, dloss/dinput for g = 1 or empty)``."""
    loss, grad = load("mse").mse_forward(input, target, reduction, compute_grad=compute_grad)
    return loss, _or_empty(grad, loss)


@mse_forward_op.register_fake
def _(input, target, reduction, compute_grad):
    loss = input.new_empty(input.shape if reduction == "none" else ())
    with_grad = compute_grad and reduction != "none"
    return loss, (input.new_empty(input.shape) if with_grad else _empty(input))


def mse_forward(input, target, reduction, *, compute_grad):
    wants = compute_grad and reduction != "none"
    loss, grad = mse_forward_op(input, target, reduction, wants)
    return loss, (grad if wants else None)


@torch.library.custom_op("manualbp::mse_backward", mutates_args=())
def mse_backward_op(grad_output: Tensor, input: Tensor, target: Tensor, reduction: str) -> Tensor:
    """``g * 2 (input - target) [/ N]``."""
    return load("mse").mse_backward(grad_output, input, target, reduction)


mse_backward = mse_backward_op  # no absent output to give back as None


@mse_backward_op.register_fake
def _(grad_output, input, target, reduction):
    return input.new_empty(input.shape)


# --------------------------------------------------------------------------------------------
# The fused MLP (compile only: DTensor operands run the layer-by-layer ops)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("manualbp::mlp_forward", mutates_args=())
def mlp_forward_op(x: Tensor, weights: list[Tensor], biases: list[Tensor | None],
                   hidden: str | None, out: str | None, slopes: list[float],
                   store: list[bool]) -> list[Tensor]:  # fmt: skip
    """``[y, *saved]`` of the fused MLP forward (one launch) on 2-D ``x``."""
    y, saved = load("fused_mlp").mlp_forward(x, weights, biases, hidden, out, tuple(slopes),
                                             store=tuple(store))  # fmt: skip
    return [y, *(_or_empty(s, y) for s in saved)]


def _fake_saved(x: Tensor, weights: list[Tensor], last: bool) -> list[Tensor]:
    rows = x.shape[0]
    hidden = [x.new_empty((rows, w.shape[0])) for w in weights[:-1]]
    return [*hidden, x.new_empty((rows, weights[-1].shape[0])) if last else _empty(x)]


@mlp_forward_op.register_fake
def _(x, weights, biases, hidden, out, slopes, store):
    y = x.new_empty((x.shape[0], weights[-1].shape[0]))
    return [y, *_fake_saved(x, weights, store[2])] if store[0] else [y]


def mlp_forward(x, weights, biases, hidden, out, slopes, *, store):
    """:func:`mlp_forward_op` as the launcher returns it: ``(y, saved)``, ``None`` for an
    unkept last-layer pre-activation."""
    y, *saved = mlp_forward_op(x, weights, biases, hidden, out, [float(s) for s in slopes],
                               list(store))  # fmt: skip
    return y, ([*saved[:-1], saved[-1] if store[2] else None] if saved else [])


@torch.library.custom_op("manualbp::mlp_mse_forward", mutates_args=())
def mlp_mse_forward_op(x: Tensor, target: Tensor, weights: list[Tensor],
                       biases: list[Tensor | None], hidden: str | None, out: str | None,
                       slopes: list[float], reduction: str, loss_dtype: torch.dtype, mode: str,
                       preacts: list[bool]) -> list[Tensor]:  # fmt: skip
    """``[loss, head, *saved]`` of the fused MLP with the MSE folded in (two launches)."""
    loss, head, saved = load("fused_mlp").mlp_mse_forward(
        x, target, weights, biases, hidden, out, tuple(slopes), reduction=reduction,
        loss_dtype=loss_dtype, mode=mode, hidden_preact=preacts[0], out_preact=preacts[1],
    )  # fmt: skip
    return [loss, _or_empty(head, x), *(_or_empty(s, x) for s in saved)]


@mlp_mse_forward_op.register_fake
def _(x, target, weights, biases, hidden, out, slopes, reduction, loss_dtype, mode, preacts):
    loss = x.new_empty((), dtype=loss_dtype)
    if mode == "value":
        return [loss, _empty(x)]
    head = x.new_empty((x.shape[0], weights[-1].shape[0]))
    return [loss, head, *_fake_saved(x, weights, mode == "y" and preacts[1])]


def mlp_mse_forward(x, target, weights, biases, hidden, out, slopes, *, reduction, loss_dtype,
                    mode, hidden_preact, out_preact):  # fmt: skip
    """:func:`mlp_mse_forward_op` as the launcher returns it: ``(loss, head, saved)``."""
    loss, head, *saved = mlp_mse_forward_op(
        x, target, weights, biases, hidden, out, [float(s) for s in slopes], reduction,
        loss_dtype, mode, [hidden_preact, out_preact],
    )  # fmt: skip
    if mode == "value":
        return loss, None, []
    keeps_z = mode == "y" and out_preact
    return loss, head, [*saved[:-1], saved[-1] if keeps_z else None]


@torch.library.custom_op("manualbp::mlp_backward", mutates_args=())
def mlp_backward_op(grad_y: Tensor, x: Tensor, weights: list[Tensor], saved: list[Tensor],
                    out_saved: Tensor | None, hidden: str | None, out: str | None,
                    slopes: list[float], has_bias: list[bool], hidden_preact: bool,
                    needs: list[bool], grad_loss: Tensor | None, target: Tensor | None,
                    reduction: str) -> list[Tensor]:  # fmt: skip
    """``[dx, *dWs, *dbs]`` of the fused MLP (empty where not needed); with ``grad_loss``, of
    the folded loss (see ``fused_mlp.mlp_backward``)."""
    loss = None if grad_loss is None else (grad_loss, target, reduction)
    dx, dws, dbs = load("fused_mlp").mlp_backward(
        grad_y, x, weights, saved, out_saved, hidden, out, tuple(slopes),
        has_bias=tuple(has_bias), hidden_preact=hidden_preact, need_dx=needs[0],
        need_params=needs[1], loss=loss,
    )  # fmt: skip
    L = len(weights)
    return [_or_empty(t, grad_y) for t in (dx, *(dws or [None] * L), *(dbs or [None] * L))]


@mlp_backward_op.register_fake
def _(grad_y, x, weights, saved, out_saved, hidden, out, slopes, has_bias, hidden_preact,
      needs, grad_loss, target, reduction):  # fmt: skip
    dx = grad_y.new_empty((grad_y.shape[0], x.shape[1])) if needs[0] else _empty(grad_y)
    dws = [grad_y.new_empty(w.shape) if needs[1] else _empty(grad_y) for w in weights]
    dbs = [grad_y.new_empty(w.shape[0]) if needs[1] and b else _empty(grad_y)
           for w, b in zip(weights, has_bias, strict=True)]  # fmt: skip
    return [dx, *dws, *dbs]


def mlp_backward(grad_y, x, weights, saved, out_saved, hidden, out, slopes, *, has_bias,
                 hidden_preact, need_dx, need_params, loss=None):  # fmt: skip
    """:func:`mlp_backward_op` as the launcher returns it: ``(dx, dWs, dbs)``."""
    grad_loss, target, reduction = loss if loss is not None else (None, None, "mean")
    grads = mlp_backward_op(grad_y, x, weights, saved, out_saved, hidden, out,
                            [float(s) for s in slopes], list(has_bias), hidden_preact,
                            [need_dx, need_params], grad_loss, target, reduction)  # fmt: skip
    L = len(weights)
    dx, dws, dbs = (grads[0] if need_dx else None), grads[1 : 1 + L], grads[1 + L :]
    if not need_params:
        return dx, None, None
    return dx, dws, [d if b else None for d, b in zip(dbs, has_bias, strict=True)]


# --------------------------------------------------------------------------------------------
# DTensor: which operands go through the custom ops, and the strategies
# --------------------------------------------------------------------------------------------
_DTENSOR_MODULE = "torch.distributed.tensor"
_FUNCOL_MODULE = "torch.distributed._functional_collectives"
# The DTensor class once torch.distributed.tensor is imported (and the strategies registered),
# and the tensor subclasses routed through the custom ops once both it and the functional
# collectives are: plain module globals, so that torch.compile can guard on them.
_dtensor: type | None = None
_routed_types: tuple[type, ...] = ()
_PLAIN = frozenset({Tensor, torch.nn.Parameter, type(None)})  # the common case, checked first


def _lookup() -> tuple[type, ...]:
    """The routed types loaded so far; once ``torch.distributed.tensor`` is, the strategies
    are registered (outside any torch.compile trace) and the globals set."""
    global _dtensor, _routed_types
    funcol = sys.modules.get(_FUNCOL_MODULE)
    found: tuple[type, ...] = () if funcol is None else (funcol.AsyncCollectiveTensor,)
    module = sys.modules.get(_DTENSOR_MODULE)
    if module is None:
        return found
    _register_untraced()
    _dtensor = module.DTensor
    _routed_types = (*found, _dtensor)
    return _routed_types


def _register_untraced() -> bool:
    """:func:`register`, which torch.compile runs as a constant (a registration is no graph)."""
    register()
    return True


# What ``torch.compiler.assume_constant_result`` does, without importing torch._dynamo (which
# ``import manualbp`` must not: it doubles the import time of torch).
_register_untraced._dynamo_marked_constant = True  # type: ignore[attr-defined]


def routed(*tensors: Tensor | None) -> bool:
    """Whether an op on ``tensors`` goes through its custom op rather than a launcher: when one
    is a ``DTensor`` or an ``AsyncCollectiveTensor`` (a collective's result not yet waited for,
    which parallel styles return as local outputs), subclasses whose data the launchers cannot
    read. Until a program imports ``torch.distributed.tensor`` (or the functional collectives)
    neither can exist, and this costs a look-up."""
    types = _routed_types or _lookup()
    if types:
        for t in tensors:
            cls = type(t)
            if cls not in _PLAIN and issubclass(cls, types):
                return True
    return False


def any_dtensor(*tensors: object) -> bool:
    """Whether any of ``tensors`` is a ``DTensor``."""
    if all(type(t) in _PLAIN for t in tensors):
        return False  # the common case: plain tensors (or None) only
    if _dtensor is None:
        _lookup()
    return _dtensor is not None and any(isinstance(t, _dtensor) for t in tensors)


def sharded(*tensors: Any) -> bool:
    """Whether any of ``tensors`` is a DTensor split (``Shard``) on some mesh dimension."""
    return any_dtensor(*tensors) and any(
        isinstance(t, _dtensor) and any(p.is_shard() for p in t.placements) for t in tensors
    )


def shards(t: Any, dim: int) -> bool:
    """Whether ``t`` is a DTensor split along ``dim`` on some mesh dimension."""
    if _dtensor is None or not isinstance(t, _dtensor):
        return False
    dim %= max(t.ndim, 1)
    return any(p.is_shard() and p.dim % max(t.ndim, 1) == dim for p in t.placements)


def reduce_partial(t: Any) -> Any:
    """``t`` with its partial sums reduced (an all-reduce per partial mesh dimension); ``t``
    itself when it is no DTensor or has none."""
    if _dtensor is None or not isinstance(t, _dtensor):
        return t
    if not any(p.is_partial() for p in t.placements):
        return t
    from torch.distributed.tensor import Replicate

    placements = [Replicate() if p.is_partial() else p for p in t.placements]
    return t.redistribute(t.device_mesh, placements)


def _placements() -> tuple[Any, Any, Callable[[int], Any]]:
    from torch.distributed.tensor import Partial, Replicate, Shard

    return Partial(), Replicate(), Shard


def _linear_forward_strategies(x, weight, bias, activation, negative_slope, store_preact):
    P, R, S = _placements()
    last = x.ndim - 1

    def pair(y, z, x_p, w_p, b_p):
        # The pre-activation is an empty tensor unless kept: replicated, whatever y is.
        outs = [y, z if store_preact else R]
        return outs, [x_p, w_p, None if bias is None else b_p, None, None, None]

    strategies = [
        pair(R, R, R, R, R),
        pair(S(last), S(last), R, S(0), S(0)),  # column-parallel: W's rows are y's columns
    ]
    if activation is None:
        # row-parallel: each rank's x_k W_k^T is a partial sum; the bias joins one share of it
        strategies.append(pair(P, R, S(last), S(1), P))
    for d in range(last):  # rows (batch, sequence) split: every rank its own rows
        strategies.append(pair(S(d), S(d), S(d), R, R))
    return strategies


def _linear_backward_strategies(grad_y, x, weight, saved, activation, negative_slope, needs):
    P, R, S = _placements()

    def pair(dx, dw, db, g_p, x_p, w_p, s_p):
        outs = [p if need else R for p, need in zip((dx, dw, db), needs, strict=True)]
        ins = [g_p, None if x is None else x_p, None if weight is None else w_p]
        return outs, [*ins, None if saved is None else s_p, None, None, None]

    return [
        pair(R, R, R, R, R, R, R),
        # column-parallel: dZ's columns meet W's rows; dX sums over all columns (partial)
        pair(P, S(0), S(0), S(1), R, S(0), S(1)),
        # row-parallel: dZ whole, W's and x's columns split alike
        pair(S(1), S(1), R, R, S(1), S(1), R),
        # rows split: dW and db sum over every row (partial)
        pair(S(0), P, P, S(0), S(0), R, S(0)),
        # dZ = dY * act'(s) is linear in dY: a partial dY gives partial gradients
        pair(P, P, P, P, R, R, R),
    ]


def _mse_forward_strategies(input, target, reduction, compute_grad):
    P, R, S = _placements()
    strategies = [([R, R], [R, R, None, None])]
    for d in range(input.ndim):
        if reduction == "none":
            strategies.append(([S(d), R], [S(d), S(d), None, None]))
        elif reduction == "sum":  # each shard's sum of squares and its own 2D
            grad = S(d) if compute_grad else R
            strategies.append(([P, grad], [S(d), S(d), None, None]))
        # "mean": a shard's mean divides by the shard's size; see mse_forward below.
    return strategies


def _mse_backward_strategies(grad_output, input, target, reduction):
    _, R, S = _placements()
    strategies = [([R], [R, R, R, None])]
    for d in range(input.ndim):
        if reduction == "none":
            strategies.append(([S(d)], [S(d), S(d), S(d), None]))
        elif reduction == "sum":
            strategies.append(([S(d)], [R, S(d), S(d), None]))
    return strategies


_STRATEGIES = {
    # op name: (strategy function, index of the first non-tensor argument)
    "linear_forward": (_linear_forward_strategies, 3),
    "linear_backward": (_linear_backward_strategies, 4),
    "mse_forward": (_mse_forward_strategies, 2),
    "mse_backward": (_mse_backward_strategies, 3),
}
_registered = False


def register() -> None:
    """Register the strategies with DTensor (once; a no-op where the API is missing)."""
    global _registered
    if _registered:
        return
    _registered = True
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
        from torch.distributed.tensor.experimental import register_sharding
    except ImportError:  # DTensor then reports the op as unsupported
        return
    schema_info = DTensor._op_dispatcher.sharding_propagator.op_to_schema_info
    for name, (strategies, static_argnum) in _STRATEGIES.items():
        op = getattr(torch.ops.manualbp, name).default
        register_sharding(op)(strategies)
        # register_sharding keys DTensor's sharding cache on int arguments only; here the
        # activation, the flags and the reduction change the strategies (and store_preact the
        # shapes): key on every argument from the first non-tensor one.
        schema_info[op] = RuntimeSchemaInfo(static_argnum, needs_pytree=True)
