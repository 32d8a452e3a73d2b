"""The Triton backend: the kernels of ``triton_kernels/`` (``manualbp.kernels``) behind the
:class:`~manualbp.backends.Backend` interface.

In eager mode each op calls its launcher directly (no per-call dispatcher cost). While
``torch.compile`` traces, the same launchers are reached through the ``torch.library`` custom
ops registered below (namespace ``manualbp``), so each kernel call is one opaque graph node
whose fake implementation gives shapes and dtypes. Custom ops return tensors only: optional
outputs come back as empty tensors. ``triton`` is imported only when a kernel first runs, so
``import manualbp`` never needs a GPU (and ``TRITON_INTERPRET`` may still be set before).
"""

from __future__ import annotations

import functools
import importlib
import math
from types import ModuleType

import torch
from torch import Tensor

from manualbp.activations import Activation
from manualbp.backends import linear_choice, sharding
from manualbp.backends.sharding import routed

__all__ = ["TritonBackend", "TRITON"]

NO_ACTIVATION = "none"


@functools.cache
def _kernels(name: str) -> ModuleType:
    """The launcher module ``manualbp.kernels.<name>`` (imported on first use)."""
    return importlib.import_module(f"manualbp.kernels.{name}")


def _name(act: Activation | None) -> str:
    return NO_ACTIVATION if act is None else act.name


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


# ---------------------------------------------------------------------------------------------
# Eager launches (the kernels' own launchers, on the tensors' GPU).
# ---------------------------------------------------------------------------------------------
def _launch_linear_forward(x, weight, bias, activation, negative_slope, store_preact):
    """``(y, z)`` of shape (*, N) for ``x`` (*, K): fresh tensors, not views of 2-D ones."""
    shape = (*x.shape[:-1], weight.shape[0])
    y = x.new_empty(shape)
    z = x.new_empty(shape) if store_preact else None
    rows = math.prod(shape[:-1])
    with _kernels("_runtime").on_device(x.device):
        linear_choice.linear_forward(  # the Triton kernel or cuBLAS + a Triton pass, per shape
            x if x.dim() == 2 else x.reshape(rows, x.shape[-1]), weight, bias,
            None if activation == NO_ACTIVATION else activation, negative_slope,
            store_preact=store_preact,
            out=y.view(rows, shape[-1]), preact_out=None if z is None else z.view(rows, shape[-1]),
        )  # fmt: skip
    return y, z


def _launch_linear_backward(grad_y, x, weight, saved, activation, negative_slope, needs_grad):
    with _kernels("_runtime").on_device(grad_y.device):
        return linear_choice.linear_backward(  # each GEMM: Triton or cuBLAS, per shape
            grad_y, x, weight, saved, None if activation == NO_ACTIVATION else activation,
            negative_slope, needs_grad=tuple(needs_grad),
        )  # fmt: skip


def _launch_mse_forward(input, target, reduction, compute_grad):
    with _kernels("_runtime").on_device(input.device):
        return _kernels("mse").mse_forward(input, target, reduction, compute_grad=compute_grad)


def _launch_mse_backward(grad_output, input, target, reduction):
    with _kernels("_runtime").on_device(input.device):
        return _kernels("mse").mse_backward(grad_output, input, target, reduction)


# ---------------------------------------------------------------------------------------------
# The same launches as custom ops, for torch.compile.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("manualbp::linear_forward", mutates_args=())
def linear_forward_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: str,
    negative_slope: float,
    store_preact: bool,
) -> tuple[Tensor, Tensor]:
    """``(act(x W^T + b), x W^T + b or empty)`` for ``x`` (*, K)."""
    y, z = _launch_linear_forward(x, weight, bias, activation, negative_slope, store_preact)
    return y, (_empty(y) if z is None else z)


@linear_forward_op.register_fake
def _(x, weight, bias, activation, negative_slope, store_preact):
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), (x.new_empty(shape) if store_preact else _empty(x))


@torch.library.custom_op("manualbp::linear_backward", mutates_args=())
def linear_backward_op(
    grad_y: Tensor,
    x: Tensor | None,
    weight: Tensor | None,
    saved: Tensor | None,
    activation: str,
    negative_slope: float,
    needs_grad: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dW, db)``, empty where not needed."""
    grads = _launch_linear_backward(
        grad_y, x, weight, saved, activation, negative_slope, needs_grad
    )
    return tuple(_empty(grad_y) if g is None else g for g in grads)  # type: ignore[return-value]


@linear_backward_op.register_fake
def _(grad_y, x, weight, saved, activation, negative_slope, needs_grad):
    M, N = grad_y.shape
    dx = grad_y.new_empty(M, weight.shape[1]) if needs_grad[0] else _empty(grad_y)
    dw = grad_y.new_empty(N, x.shape[1]) if needs_grad[1] else _empty(grad_y)
    db = grad_y.new_empty(N) if needs_grad[2] else _empty(grad_y)
    return dx, dw, db


@torch.library.custom_op("manualbp::mse_forward", mutates_args=())
def mse_forward_op(
    input: Tensor, target: Tensor, reduction: str, compute_grad: bool
) -> tuple[Tensor, Tensor]:
    """``(loss, dloss/dinput for g = 1 or empty)``."""
    loss, grad = _launch_mse_forward(input, target, reduction, compute_grad)
    return loss, (_empty(loss) if grad is None else grad)


@mse_forward_op.register_fake
def _(input, target, reduction, compute_grad):
    loss = input.new_empty(input.shape if reduction == "none" else ())
    with_grad = compute_grad and reduction != "none"
    return loss, (input.new_empty(input.shape) if with_grad else _empty(input))


@torch.library.custom_op("manualbp::mse_backward", mutates_args=())
def mse_backward_op(grad_output: Tensor, input: Tensor, target: Tensor, reduction: str) -> Tensor:
    """``g * 2 (input - target) [/ N]``."""
    return _launch_mse_backward(grad_output, input, target, reduction)


@mse_backward_op.register_fake
def _(grad_output, input, target, reduction):
    return input.new_empty(input.shape)


# ---------------------------------------------------------------------------------------------
# The backend.
# ---------------------------------------------------------------------------------------------
def _compiling() -> bool:
    return torch.compiler.is_compiling()


class TritonBackend:
    """The Triton kernels behind the :class:`~manualbp.backends.Backend` interface."""

    name = "triton"

    @staticmethod
    def linear_forward(x, weight, bias, act, negative_slope, *, store_preact):
        if routed(x, weight, bias):  # DTensor operands: see manualbp.backends.sharding
            return sharding.linear_forward(
                x, weight, bias, act, negative_slope, store_preact=store_preact
            )
        if _compiling():
            y, z = linear_forward_op(
                x, weight, bias, _name(act), float(negative_slope), store_preact
            )
            return y, (z if store_preact else None)
        return _launch_linear_forward(
            x, weight, bias, _name(act), float(negative_slope), store_preact
        )

    @staticmethod
    def linear_backward(grad_y, x, weight, saved, act, negative_slope, needs_grad):
        if routed(grad_y, x, weight, saved):
            return sharding.linear_backward(
                grad_y, x, weight, saved, act, negative_slope, needs_grad
            )
        if _compiling():
            grads = linear_backward_op(
                grad_y, x, weight, saved, _name(act), float(negative_slope), list(needs_grad)
            )
            return tuple(g if need else None for g, need in zip(grads, needs_grad, strict=True))
        return _launch_linear_backward(
            grad_y, x, weight, saved, _name(act), float(negative_slope), needs_grad
        )

    @staticmethod
    def linear_chain_backward(
        grad_y, x, weight, saved, act, negative_slope, prev_saved, prev_act, prev_slope, needs
    ):
        # Cross-layer fusion (triton_kernels/linear_backward.py: linear_backward_chain). While
        # torch.compile traces, and for DTensor operands, the reference ops run.
        if _compiling() or routed(grad_y, x, weight, saved, prev_saved):
            from manualbp.backends.reference import REFERENCE

            return REFERENCE.linear_chain_backward(
                grad_y, x, weight, saved, act, negative_slope, prev_saved, prev_act,
                prev_slope, needs,
            )  # fmt: skip
        with _kernels("_runtime").on_device(grad_y.device):
            return _kernels("linear_backward").linear_backward_chain(
                grad_y, x, weight, saved, None if act is None else act.name,
                float(negative_slope), prev_saved, None if prev_act is None else prev_act.name,
                float(prev_slope), needs_grad=tuple(needs),
            )  # fmt: skip

    @staticmethod
    def linear_grad_accumulate(grad_y, x, weight, dx_out, dw_acc, db_acc):
        needs = (dx_out is not None, dw_acc is not None, db_acc is not None)
        dx, dw, db = TritonBackend.linear_backward(grad_y, x, weight, None, None, 0.0, needs)
        if dx_out is not None:
            dx_out.copy_(dx)
        if dw_acc is not None:
            dw_acc += dw
        if db_acc is not None:
            db_acc += db

    @staticmethod
    def mse_forward(input, target, reduction, *, compute_grad):
        if routed(input, target):
            return sharding.mse_forward(input, target, reduction, compute_grad=compute_grad)
        wants_grad = compute_grad and reduction != "none"
        if _compiling():
            loss, grad = mse_forward_op(input, target, reduction, wants_grad)
            return loss, (grad if wants_grad else None)
        return _launch_mse_forward(input, target, reduction, wants_grad)

    @staticmethod
    def mse_backward(grad_output, input, target, reduction):
        if routed(grad_output, input, target):
            return sharding.mse_backward(grad_output, input, target, reduction)
        if _compiling():
            return mse_backward_op(grad_output, input, target, reduction)
        return _launch_mse_backward(grad_output, input, target, reduction)

    @staticmethod
    def mse_grad_scale(grad, grad_output):
        if routed(grad, grad_output):
            return sharding.mse_grad_scale(grad, grad_output)
        if _compiling():
            return grad * grad_output  # one elementwise node: Inductor fuses it
        with _kernels("_runtime").on_device(grad.device):
            return _kernels("mse").mse_grad_scale_(grad, grad_output)

    @staticmethod
    def sgd_step(params, grads, momentum_buffers, **hyper):
        if routed(*params):  # the same step on each rank's local shards
            sharding.sgd_step(TritonBackend.sgd_step, params, grads, momentum_buffers, **hyper)
            return
        sgd = _kernels("sgd")
        # A step captured in a CUDA graph runs the reference ops: the kernel's device table of
        # addresses is uploaded from the host and cached, which a capture cannot make safe.
        capturing = params[0].is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing or not sgd.supports(params, grads, momentum_buffers):
            from manualbp.backends.reference import REFERENCE

            REFERENCE.sgd_step(params, grads, momentum_buffers, **hyper)
            return
        with _kernels("_runtime").on_device(params[0].device):
            sgd.sgd_step_(params, grads, momentum_buffers, **hyper)

    # The fused MLP (triton_kernels/fused_mlp.py; launches and custom ops below the class).
    # DTensor operands run the reference ops (manualbp.autograd.fused_mlp runs them layer by
    # layer). While torch.compile traces, the kernels are reached through the custom ops.
    @staticmethod
    def mlp_forward(x, weights, biases, acts, slopes, *, store):
        if routed(x, *weights):
            return _reference().mlp_forward(x, weights, biases, acts, slopes, store=store)
        args = (x, list(weights), list(biases), _name(acts[0]), _name(acts[1]),
                [float(s) for s in slopes], store)  # fmt: skip
        if _compiling():
            y, *saved = mlp_forward_op(*args)
            return y, _mlp_saved(saved, store and _preacts(acts, slopes)[1])
        return _launch_mlp_forward(*args)

    @staticmethod
    def mlp_backward(grad_y, x, weights, y, saved, acts, slopes, has_bias, needs_grad):
        if routed(grad_y, x, *weights):
            return _reference().mlp_backward(
                grad_y, x, weights, y, saved, acts, slopes, has_bias, needs_grad
            )
        args = (grad_y, x, list(weights), y, list(saved), _name(acts[0]), _name(acts[1]),
                [float(s) for s in slopes], list(has_bias), list(needs_grad))  # fmt: skip
        if _compiling():
            return _mlp_grads(mlp_backward_op(*args, None, None, "mean"), has_bias, needs_grad)
        return _launch_mlp_backward(*args)

    @staticmethod
    def mlp_mse_forward(x, target, weights, biases, acts, slopes, reduction, loss_dtype, *, store):
        if routed(x, target, *weights):
            return _reference().mlp_mse_forward(
                x, target, weights, biases, acts, slopes, reduction, loss_dtype, store=store
            )
        args = (x, target, list(weights), list(biases), _name(acts[0]), _name(acts[1]),
                [float(s) for s in slopes], reduction, loss_dtype, store)  # fmt: skip
        if _compiling():
            loss, head, *saved = mlp_mse_forward_op(*args)
            if not store:
                return loss, None, []
            keeps_z = x.dtype in _LOW_PRECISION and _preacts(acts, slopes)[1]
            return loss, head, _mlp_saved(saved, keeps_z)
        return _launch_mlp_mse_forward(*args)

    @staticmethod
    def mlp_mse_backward(
        grad_loss, x, target, weights, head, saved, acts, slopes, reduction, has_bias, needs_grad
    ):
        if routed(grad_loss, x, target, *weights):
            return _reference().mlp_mse_backward(
                grad_loss, x, target, weights, head, saved, acts, slopes, reduction, has_bias,
                needs_grad,
            )  # fmt: skip
        # float32/float64: head is dZ for an upstream gradient of 1 (no target needed).
        target = target if x.dtype in _LOW_PRECISION else None
        args = (head, x, list(weights), head, list(saved), _name(acts[0]), _name(acts[1]),
                [float(s) for s in slopes], list(has_bias), list(needs_grad))  # fmt: skip
        if _compiling():
            grads = mlp_backward_op(*args, grad_loss, target, reduction)
            return _mlp_grads(grads, has_bias, needs_grad)
        return _launch_mlp_backward(*args, loss=(grad_loss, target, reduction))


# ---------------------------------------------------------------------------------------------
# The fused MLP: its launches, and the same as custom ops for torch.compile (so a compiled
# model keeps the fused kernels). Activations travel as registry names ("none": without),
# slopes as [hidden, output]; a custom op returns a list of tensors, empty ones for None.
# ---------------------------------------------------------------------------------------------
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _reference():
    from manualbp.backends.reference import REFERENCE

    return REFERENCE


def _preacts(acts, slopes) -> tuple[bool, bool]:
    """Whether the hidden / output activation's derivative reads z (else y)."""
    hidden, out = (a is not None and a.saved_for(s) == "preact"
                   for a, s in zip(acts, slopes, strict=True))  # fmt: skip
    return hidden, out


def _preact_names(hidden: str, out: str, slopes: list[float]) -> tuple[bool, bool]:
    from manualbp.activations import get_activation

    acts = tuple(get_activation(None if a == NO_ACTIVATION else a) for a in (hidden, out))
    return _preacts(acts, slopes)


def _mlp_saved(saved: list[Tensor], last_kept: bool) -> list[Tensor | None]:
    """A custom op's saved tensors with ``None`` back for an unkept last layer's z."""
    return [*saved[:-1], saved[-1] if last_kept else None] if saved else []


def _mlp_grads(grads: list[Tensor], has_bias, needs_grad) -> tuple:
    """``(dx, dWs, dbs)`` from a custom op's ``[dx, *dWs, *dbs]``."""
    L = len(has_bias)
    dx, dws, dbs = grads[0], grads[1 : 1 + L], grads[1 + L :]
    if not needs_grad[1]:
        return (dx if needs_grad[0] else None), None, None
    dbs = [db if b else None for db, b in zip(dbs, has_bias, strict=True)]
    return (dx if needs_grad[0] else None), dws, dbs


def _contiguous(weights: list[Tensor], biases: list[Tensor | None]) -> tuple[list, list]:
    biases = [None if b is None else b.contiguous() for b in biases]
    return [w.contiguous() for w in weights], biases


def _act_arg(name: str) -> str | None:
    return None if name == NO_ACTIVATION else name


def _launch_mlp_forward(x, weights, biases, hidden, out, slopes, store, separate=False):
    """``(y, saved)`` for ``x`` (*, k_0): y a fresh (*, n_{L-1}) tensor."""
    shape = (*x.shape[:-1], weights[-1].shape[0])
    y = x.new_empty(shape)
    rows = math.prod(shape[:-1])
    hidden_pre, out_pre = _preact_names(hidden, out, slopes)
    ws, bs = _contiguous(weights, biases)
    with _kernels("_runtime").on_device(x.device):
        _, saved = _kernels("fused_mlp").mlp_forward(
            x.reshape(rows, x.shape[-1]), ws, bs, _act_arg(hidden), _act_arg(out), tuple(slopes),
            store=(store, hidden_pre, store and out_pre), out=y.view(rows, shape[-1]),
            separate=separate,
        )  # fmt: skip
    return y, saved


def _launch_mlp_mse_forward(x, target, weights, biases, hidden, out, slopes, reduction,
                            loss_dtype, store, separate=False):  # fmt: skip
    """``(loss, head, saved)`` for 2-D ``x`` and ``target`` (see Backend.mlp_mse_forward)."""
    mode = "value" if not store else ("y" if x.dtype in _LOW_PRECISION else "dz")
    hidden_pre, out_pre = _preact_names(hidden, out, slopes)
    ws, bs = _contiguous(weights, biases)
    with _kernels("_runtime").on_device(x.device):
        return _kernels("fused_mlp").mlp_mse_forward(
            x, target, ws, bs, _act_arg(hidden), _act_arg(out), tuple(slopes),
            reduction=reduction, loss_dtype=loss_dtype, mode=mode, hidden_preact=hidden_pre,
            out_preact=out_pre, separate=separate,
        )  # fmt: skip


def _launch_mlp_backward(grad_y, x, weights, y, saved, hidden, out, slopes, has_bias, needs,
                         loss=None):  # fmt: skip
    """``(dx, dWs, dbs)``; ``loss``: ``(grad_loss, target or None, reduction)`` when ``grad_y``
    is the head of a folded loss (see triton_kernels.fused_mlp.mlp_backward)."""
    hidden_pre, out_pre = _preact_names(hidden, out, slopes)
    scaled = loss is not None and loss[1] is None  # dZ for g = 1: no output activation left
    out_saved = None if out == NO_ACTIVATION or scaled else (saved[-1] if out_pre else y)
    with _kernels("_runtime").on_device(grad_y.device):
        return _kernels("fused_mlp").mlp_backward(
            grad_y, x, [w.contiguous() for w in weights], [s.contiguous() for s in saved[:-1]],
            None if out_saved is None else out_saved.contiguous(), _act_arg(hidden),
            _act_arg(out), tuple(slopes), has_bias=tuple(has_bias), hidden_preact=hidden_pre,
            need_dx=needs[0], need_params=needs[1], loss=loss,
        )  # fmt: skip


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return _empty(like) if t is None else t


@torch.library.custom_op("manualbp::mlp_forward", mutates_args=())
def mlp_forward_op(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor | None],
    hidden: str,
    out: str,
    slopes: list[float],
    store: bool,
) -> list[Tensor]:
    """``[y, *saved]`` of the fused MLP forward (one launch)."""
    y, saved = _launch_mlp_forward(x, weights, biases, hidden, out, slopes, store, True)
    return [y, *(_or_empty(s, y) for s in saved)]


def _fake_saved(x: Tensor, rows, weights: list[Tensor], last: bool) -> list[Tensor]:
    hidden = [x.new_empty((rows, w.shape[0])) for w in weights[:-1]]
    return [*hidden, x.new_empty((rows, weights[-1].shape[0])) if last else _empty(x)]


@mlp_forward_op.register_fake
def _(x, weights, biases, hidden, out, slopes, store):
    y = x.new_empty((*x.shape[:-1], weights[-1].shape[0]))
    if not store:
        return [y]
    last = _preact_names(hidden, out, slopes)[1]
    return [y, *_fake_saved(x, math.prod(x.shape[:-1]), weights, last)]


@torch.library.custom_op("manualbp::mlp_mse_forward", mutates_args=())
def mlp_mse_forward_op(
    x: Tensor,
    target: Tensor,
    weights: list[Tensor],
    biases: list[Tensor | None],
    hidden: str,
    out: str,
    slopes: list[float],
    reduction: str,
    loss_dtype: torch.dtype,
    store: bool,
) -> list[Tensor]:
    """``[loss, head, *saved]`` of the fused MLP with the MSE folded in (two launches)."""
    loss, head, saved = _launch_mlp_mse_forward(
        x, target, weights, biases, hidden, out, slopes, reduction, loss_dtype, store, True
    )
    return [loss, _or_empty(head, x), *(_or_empty(s, x) for s in saved)]


@mlp_mse_forward_op.register_fake
def _(x, target, weights, biases, hidden, out, slopes, reduction, loss_dtype, store):
    loss = x.new_empty((), dtype=loss_dtype)
    if not store:
        return [loss, _empty(x)]
    head = x.new_empty((x.shape[0], weights[-1].shape[0]))
    last = x.dtype in _LOW_PRECISION and _preact_names(hidden, out, slopes)[1]
    return [loss, head, *_fake_saved(x, x.shape[0], weights, last)]


@torch.library.custom_op("manualbp::mlp_backward", mutates_args=())
def mlp_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weights: list[Tensor],
    y: Tensor | None,
    saved: list[Tensor | None],
    hidden: str,
    out: str,
    slopes: list[float],
    has_bias: list[bool],
    needs_grad: list[bool],
    grad_loss: Tensor | None,
    target: Tensor | None,
    reduction: str,
) -> list[Tensor]:
    """``[dx, *dWs, *dbs]`` of the fused MLP (empty where not needed); with ``grad_loss``, of
    the folded loss (``grad_y`` is its head, see triton_kernels.fused_mlp.mlp_backward)."""
    loss = None if grad_loss is None else (grad_loss, target, reduction)
    dx, dws, dbs = _launch_mlp_backward(
        grad_y, x, weights, y, saved, hidden, out, slopes, has_bias, needs_grad, loss
    )
    L = len(weights)
    grads = [dx, *(dws or [None] * L), *(dbs or [None] * L)]
    return [_or_empty(t, grad_y) for t in grads]


@mlp_backward_op.register_fake
def _(grad_y, x, weights, y, saved, hidden, out, slopes, has_bias, needs_grad, grad_loss, target,
      reduction):  # fmt: skip
    M = grad_y.shape[0]
    dx = grad_y.new_empty((M, x.shape[1])) if needs_grad[0] else _empty(grad_y)
    dws = [grad_y.new_empty(w.shape) if needs_grad[1] else _empty(grad_y) for w in weights]
    dbs = [grad_y.new_empty(w.shape[0]) if needs_grad[1] and b else _empty(grad_y)
           for w, b in zip(weights, has_bias, strict=True)]  # fmt: skip
    return [dx, *dws, *dbs]


TRITON = TritonBackend()
