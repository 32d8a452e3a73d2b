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
from manualbp.backends import sharding
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
        _kernels("linear_forward").linear_forward(
            x if x.dim() == 2 else x.reshape(rows, x.shape[-1]), weight, bias,
            None if activation == NO_ACTIVATION else activation, negative_slope,
            store_preact=store_preact,
            out=y.view(rows, shape[-1]), preact_out=None if z is None else z.view(rows, shape[-1]),
        )  # fmt: skip
    return y, z


def _launch_linear_backward(grad_y, x, weight, saved, activation, negative_slope, needs_grad):
    with _kernels("_runtime").on_device(grad_y.device):
        return _kernels("linear_backward").linear_backward(
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

    # The fused MLP (triton_kernels/fused_mlp.py). While torch.compile traces, and for DTensor
    # operands, the reference ops run (manualbp.autograd.fused_mlp runs layer by layer there).
    @staticmethod
    def mlp_forward(x, weights, biases, acts, slopes, *, store):
        from manualbp.backends.reference import REFERENCE

        if _compiling() or routed(x, *weights):
            return REFERENCE.mlp_forward(x, weights, biases, acts, slopes, store=store)
        shape = (*x.shape[:-1], weights[-1].shape[0])
        y = x.new_empty(shape)
        rows = math.prod(shape[:-1])
        hidden_pre, out_pre = (a is not None and a.saved_for(s) == "preact"
                               for a, s in zip(acts, slopes, strict=True))  # fmt: skip
        with _kernels("_runtime").on_device(x.device):
            _, saved = _kernels("fused_mlp").mlp_forward(
                x.reshape(rows, x.shape[-1]), [w.contiguous() for w in weights],
                [None if b is None else b.contiguous() for b in biases], _name(acts[0]),
                _name(acts[1]), slopes, store=(store, hidden_pre, store and out_pre),
                out=y.view(rows, shape[-1]),
            )  # fmt: skip
        return y, saved

    @staticmethod
    def mlp_backward(grad_y, x, weights, y, saved, acts, slopes, has_bias, needs_grad):
        from manualbp.backends.reference import REFERENCE

        if _compiling() or routed(grad_y, x, *weights):
            return REFERENCE.mlp_backward(
                grad_y, x, weights, y, saved, acts, slopes, has_bias, needs_grad
            )
        hidden_pre, out_pre = (a is not None and a.saved_for(s) == "preact"
                               for a, s in zip(acts, slopes, strict=True))  # fmt: skip
        out_saved = None if acts[1] is None else (saved[-1] if out_pre else y)
        with _kernels("_runtime").on_device(grad_y.device):
            return _kernels("fused_mlp").mlp_backward(
                grad_y, x, [w.contiguous() for w in weights],
                [s.contiguous() for s in saved[:-1]],
                None if out_saved is None else out_saved.contiguous(), _name(acts[0]),
                _name(acts[1]), slopes, has_bias=tuple(has_bias), hidden_preact=hidden_pre,
                need_dx=needs_grad[0], need_params=needs_grad[1],
            )  # fmt: skip


TRITON = TritonBackend()
