"""DTensor operands: sharding strategies for the ``manualbp::`` custom ops, the DTensor branch
of each :class:`~manualbp.backends.triton.TritonBackend` op, and helpers for the reference one.

Tensor parallelism (``torch.distributed.tensor.parallel``: ``ColwiseParallel``,
``RowwiseParallel``, ``SequenceParallel``; FSDP2 x TP on a 2-D mesh) hands the ops ``DTensor``
operands. The Triton launchers only take plain tensors, so a Triton op with a DTensor operand
calls its ``torch.library`` custom op (``manualbp::linear_forward``, ...) instead: DTensor's
dispatcher picks one of the strategies registered here (redistributing operands only where
none matches them as they are), runs the kernel on the local shards and wraps the results.
They are the strategies native ``F.linear`` and ``F.mse_loss`` resolve to, so the collectives
are native's (given for one mesh dimension; DTensor expands them to every dimension):

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

(R Replicate, S(d) Shard(d), P Partial sum; results that are empty, as unneeded gradients and
an unkept pre-activation are, are replicated.) Three cases are composed in the DTensor branch
instead:

* a row-parallel Linear with a fused activation: ``act`` of a sum of partial products is no
  sum of per-rank activations, so the op runs without the activation, the partial sums are
  all-reduced (the one collective of a native ``RowwiseParallel`` Linear, after which the
  activation module runs) and the activation is applied to the reduced pre-activation;
* the ``"mean"`` MSE of sharded operands: a shard's mean divides by the shard's size, so the
  op sums (a partial sum, all-reduced when read, as native's partial mean is) and the sum is
  divided by the global count, exact for uneven shards too; backward scales ``g`` by ``1/N``.
  (Native's DTensor mean averages the shards' means: off for uneven shards, and its gradient
  comes out the world size times too large);
* the MSE's gradient scaling and the SGD step: elementwise, so DTensor's pointwise ops and
  the local shards (each updated in place by the multi-tensor kernel) do.

The Triton backend asks :func:`routed` first; it also sends ``AsyncCollectiveTensor``
operands (what parallel styles return as local outputs) through the custom ops, whose
dispatch waits for them: the launchers cannot read a tensor subclass. The reference backend's
torch ops take both as they are; it needs :func:`reduce_partial` before an activation and
:func:`sharded` for the mean, as above. ``torch.distributed.tensor`` is never imported from
here: the strategies are registered when a DTensor may first exist (:func:`routed`,
:func:`any_dtensor`), at trace time outside the graph under ``torch.compile``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from manualbp.activations import Activation

__all__ = [
    "any_dtensor",
    "linear_backward",
    "linear_forward",
    "mse_backward",
    "mse_forward",
    "mse_grad_scale",
    "reduce_partial",
    "register",
    "routed",
    "sgd_step",
    "sharded",
]

_DTENSOR_MODULE = "torch.distributed.tensor"
_FUNCOL_MODULE = "torch.distributed._functional_collectives"
NO_ACTIVATION = "none"  # as manualbp.backends.triton.NO_ACTIVATION

# The DTensor class once torch.distributed.tensor is imported (and the strategies registered),
# and the tensor subclasses routed through the custom ops once both it and the functional
# collectives are: plain module globals, so that torch.compile can guard on them.
_dtensor: type | None = None
_routed_types: tuple[type, ...] = ()
_PLAIN = frozenset({Tensor, torch.nn.Parameter, type(None)})  # the common case, checked first


def _lookup() -> tuple[type, ...]:
    """The routed types loaded so far; once ``torch.distributed.tensor`` is, the strategies
    are registered and the globals set (for good: it imports the functional collectives)."""
    global _dtensor, _routed_types
    funcol = sys.modules.get(_FUNCOL_MODULE)
    found: tuple[type, ...] = () if funcol is None else (funcol.AsyncCollectiveTensor,)
    module = sys.modules.get(_DTENSOR_MODULE)
    if module is None:
        return found
    if torch.compiler.is_compiling():
        # torch.compile imports torch.distributed.tensor itself: register at trace time, but
        # outside the trace (a registration is no graph).
        _register_untraced()
    else:
        register()
    _dtensor = module.DTensor
    _routed_types = (*found, _dtensor)
    return _routed_types


@torch.compiler.assume_constant_result
def _register_untraced() -> bool:
    register()
    return True


def routed(*tensors: Tensor | None) -> bool:
    """Whether an op on ``tensors`` goes through its custom op rather than a launcher: when one
    is a ``DTensor``, or an ``AsyncCollectiveTensor`` (a collective's result not yet waited
    for, which parallel styles return as local outputs): tensor subclasses whose data the
    launchers cannot read, and whose dispatch (sharding, waiting) the custom op gets.

    Until a program imports ``torch.distributed.tensor`` (or the functional collectives)
    neither can exist, and this costs a dictionary look-up; the strategies are registered on
    the first call after it is imported.
    """
    types = _routed_types or _lookup()
    if types:
        for t in tensors:
            cls = type(t)
            if cls not in _PLAIN and issubclass(cls, types):
                return True
    return False


def any_dtensor(*tensors: object) -> bool:
    """Whether any of ``tensors`` is a ``DTensor``."""
    for t in tensors:
        if type(t) not in _PLAIN:
            break
    else:
        return False  # the common case: plain tensors (or None) only
    if _dtensor is None and not _lookup():
        return False
    if _dtensor is not None:
        for t in tensors:
            if isinstance(t, _dtensor):
                return True
    return False


def _is_dtensor(t: object) -> bool:
    return _dtensor is not None and isinstance(t, _dtensor)


# ---------------------------------------------------------------------------------------------
# Sharding strategies: for each op, the (output placements, input placements) pairs on one
# mesh dimension under which running it on the local shards gives the sharded result. Input
# placements list every argument, None for non-tensors and absent tensors.
# ---------------------------------------------------------------------------------------------
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
    if activation == NO_ACTIVATION:
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
    except ImportError:  # torch < 2.5: DTensor reports the op as unsupported, as before
        return
    import manualbp.backends.triton  # noqa: F401  (defines the custom ops)

    schema_info = DTensor._op_dispatcher.sharding_propagator.op_to_schema_info
    for name, (strategies, static_argnum) in _STRATEGIES.items():
        op = getattr(torch.ops.manualbp, name).default
        register_sharding(op)(strategies)
        # register_sharding keys DTensor's sharding cache on int arguments only; here the
        # activation, the flags and the reduction change the strategies (and store_preact the
        # shapes): key on every argument from the first non-tensor one.
        schema_info[op] = RuntimeSchemaInfo(static_argnum, needs_pytree=True)


# ---------------------------------------------------------------------------------------------
# The DTensor branch of each TritonBackend op.
# ---------------------------------------------------------------------------------------------
def _shards(t: Any, dim: int) -> bool:
    """Whether ``t`` is a DTensor split along ``dim`` on some mesh dimension."""
    if not _is_dtensor(t):
        return False
    dim %= max(t.ndim, 1)
    return any(p.is_shard() and p.dim % max(t.ndim, 1) == dim for p in t.placements)


def sharded(*tensors: Any) -> bool:
    """Whether any of ``tensors`` is a DTensor split (``Shard``) on some mesh dimension."""
    return any_dtensor(*tensors) and any(
        _is_dtensor(t) and any(p.is_shard() for p in t.placements) for t in tensors
    )


def reduce_partial(t: Any) -> Any:
    """``t`` with its partial sums reduced (an all-reduce per partial mesh dimension); ``t``
    itself when it is no DTensor or has none."""
    if not _is_dtensor(t) or not any(p.is_partial() for p in t.placements):
        return t
    from torch.distributed.tensor import Replicate

    placements = [Replicate() if p.is_partial() else p for p in t.placements]
    return t.redistribute(t.device_mesh, placements)


def linear_forward(x, weight, bias, act: Activation | None, negative_slope, *, store_preact):
    op = torch.ops.manualbp.linear_forward.default
    slope = float(negative_slope)
    if act is not None and (_shards(weight, 1) or _shards(x, -1)):
        # Row-parallel: the activation needs the whole sum, so reduce first, then apply it.
        z, _ = op(x, weight, bias, NO_ACTIVATION, slope, False)
        z = reduce_partial(z)
        return act.forward(z, slope), (z if store_preact else None)
    y, z = op(x, weight, bias, NO_ACTIVATION if act is None else act.name, slope, store_preact)
    return y, (z if store_preact else None)


def linear_backward(grad_y, x, weight, saved, act: Activation | None, negative_slope, needs):
    op = torch.ops.manualbp.linear_backward.default
    name = NO_ACTIVATION if act is None else act.name
    grads = op(grad_y, x, weight, saved, name, float(negative_slope), list(needs))
    return tuple(g if need else None for g, need in zip(grads, needs, strict=True))


def mse_forward(input, target, reduction, *, compute_grad):
    op = torch.ops.manualbp.mse_forward.default
    if reduction == "mean" and sharded(input, target):
        # The sum of squares over all shards, over the global count (exact for uneven shards);
        # the gradient is left to mse_backward (a precomputed 2D/N would need N at the shard).
        loss, _ = op(input, target, "sum", False)
        return loss / input.numel(), None
    wants_grad = compute_grad and reduction != "none"
    loss, grad = op(input, target, reduction, wants_grad)
    return loss, (grad if wants_grad else None)


def mse_backward(grad_output, input, target, reduction):
    op = torch.ops.manualbp.mse_backward.default
    if reduction == "mean" and sharded(input, target):
        return op(grad_output / max(input.numel(), 1), input, target, "sum")
    return op(grad_output, input, target, reduction)


def mse_grad_scale(grad, grad_output):
    return grad * grad_output  # DTensor's pointwise rule: the placements of grad


def sgd_step(step: Callable[..., None], params, grads, momentum_buffers, **hyper) -> None:
    """``step`` (the Triton backend's SGD step) on the local shards of DTensor ``params``.

    The update is elementwise, so updating each rank's shard of a param with the same shard
    of its gradient and momentum buffer is the sharded update (a replicated param: the same
    update on every rank, as natively). A gradient or buffer placed otherwise than its param
    (a partial gradient) is redistributed to the param's placements first. New momentum
    buffers are wrapped as DTensors placed like their params, as native SGD keeps them.
    """
    local_params, local_grads, local_bufs = [], [], []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        buf = momentum_buffers[i] if i < len(momentum_buffers) else None
        if _is_dtensor(p):
            if not _is_dtensor(g) or (buf is not None and not _is_dtensor(buf)):
                raise TypeError(
                    "manualbp.optim.SGD: a DTensor parameter needs a DTensor gradient and "
                    f"momentum buffer, got {type(g).__name__} and {type(buf).__name__}"
                )
            g = _placed_like(g, p)
            if buf is not None:
                buf = momentum_buffers[i] = _placed_like(buf, p)  # SGD keeps the list's
                buf = buf.to_local()
            p, g = p.to_local(), g.to_local()
        local_params.append(p)
        local_grads.append(g)
        local_bufs.append(buf)
    if not momentum_buffers:
        local_bufs = []
    step(local_params, local_grads, local_bufs, **hyper)
    for i, p in enumerate(params):
        if i < len(momentum_buffers) and momentum_buffers[i] is None and local_bufs[i] is not None:
            buf = local_bufs[i]
            if _is_dtensor(p):
                buf = _dtensor.from_local(
                    buf, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                    stride=p.stride(),
                )  # fmt: skip
            momentum_buffers[i] = buf


def _placed_like(t: Any, param: Any) -> Any:
    if t.device_mesh == param.device_mesh and t.placements == param.placements:
        return t
    return t.redistribute(param.device_mesh, param.placements)
