"""The Triton launchers registered as ``torch.library`` custom ops (namespace ``manualbp``).

Registering them makes each kernel call one opaque node that ``torch.compile`` can put
in a graph (with the fake implementations below giving shapes and dtypes) instead of
tracing into Triton's launch machinery. The autograd Functions call these ops only on
the Triton path; the reference path is plain torch ops, which the compiler sees whole.
Optional outputs come back as empty tensors (custom ops return tensors only).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

NO_ACTIVATION = "none"


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _on_device(t: Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU the current one for the launch (Triton launches on the current one)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("manualbp::linear_forward", mutates_args=())
def linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: str,
    negative_slope: float,
    store_preact: bool,
) -> tuple[Tensor, Tensor]:
    """``(act(x W^T + b), x W^T + b or empty)`` for 2-D ``x``; see triton_kernels.linear_forward."""
    from manualbp.kernels.linear_forward import linear_forward as launch

    name = None if activation == NO_ACTIVATION else activation
    with _on_device(x):
        y, z = launch(x, weight, bias, name, negative_slope, store_preact=store_preact)
    return y, (_empty(y) if z is None else z)


@linear_forward.register_fake
def _(x, weight, bias, activation, negative_slope, store_preact):
    y = x.new_empty(x.shape[0], weight.shape[0])
    return y, (x.new_empty(x.shape[0], weight.shape[0]) if store_preact else _empty(x))


@torch.library.custom_op("manualbp::linear_backward", mutates_args=())
def linear_backward(
    grad_y: Tensor,
    x: Tensor | None,
    weight: Tensor | None,
    saved: Tensor | None,
    activation: str,
    negative_slope: float,
    saved_is_output: bool,
    needs_grad: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dW, db)`` (empty where not needed); see triton_kernels.linear_backward."""
    from manualbp.kernels.linear_backward import linear_backward as launch

    name = None if activation == NO_ACTIVATION else activation
    with _on_device(grad_y):
        grads = launch(
            grad_y, x, weight, saved, name, negative_slope,
            saved_is_output=saved_is_output, needs_grad=tuple(needs_grad),
        )  # fmt: skip
    return tuple(_empty(grad_y) if g is None else g for g in grads)  # type: ignore[return-value]


@linear_backward.register_fake
def _(grad_y, x, weight, saved, activation, negative_slope, saved_is_output, needs_grad):
    M, N = grad_y.shape
    dx = grad_y.new_empty(M, weight.shape[1]) if needs_grad[0] else _empty(grad_y)
    dw = grad_y.new_empty(N, x.shape[1]) if needs_grad[1] else _empty(grad_y)
    db = grad_y.new_empty(N) if needs_grad[2] else _empty(grad_y)
    return dx, dw, db


@torch.library.custom_op("manualbp::mse_forward", mutates_args=())
def mse_forward(
    input: Tensor, target: Tensor, reduction: str, compute_grad: bool
) -> tuple[Tensor, Tensor]:
    """``(loss, dloss/dinput for g = 1 or empty)``; see triton_kernels.mse.mse_forward."""
    from manualbp.kernels.mse import mse_forward as launch

    with _on_device(input):
        loss, grad = launch(input, target, reduction, compute_grad=compute_grad)
    return loss, (_empty(loss) if grad is None else grad)


@mse_forward.register_fake
def _(input, target, reduction, compute_grad):
    loss = input.new_empty(input.shape if reduction == "none" else ())
    with_grad = compute_grad and reduction != "none"
    return loss, (input.new_empty(input.shape) if with_grad else _empty(input))


@torch.library.custom_op("manualbp::mse_backward", mutates_args=())
def mse_backward(grad_output: Tensor, input: Tensor, target: Tensor, reduction: str) -> Tensor:
    """``g * 2 (input - target) [/ N]``; see triton_kernels.mse.mse_backward."""
    from manualbp.kernels.mse import mse_backward as launch

    with _on_device(input):
        return launch(grad_output, input, target, reduction)


@mse_backward.register_fake
def _(grad_output, input, target, reduction):
    return input.new_empty(input.shape)
