"""Mean squared error in plain torch ops and its hand-derived backward."""

from __future__ import annotations

from torch import Tensor


def mse_forward(input: Tensor, target: Tensor, reduction: str) -> Tensor:
    """``L = reduce((input - target)^2)`` over same-shape (broadcast) operands."""
    diff = input - target
    sq = diff * diff
    if reduction == "mean":
        return sq.mean()
    if reduction == "sum":
        return sq.sum()
    return sq


def mse_backward(grad_output: Tensor, input: Tensor, target: Tensor, reduction: str) -> Tensor:
    """``dL/d input`` for same-shape operands, scaled by the upstream gradient ``g``.

    L = (1/N) sum (x - y)^2  =>  dL/dx = g * 2 (x - y) / N    (mean)
    L = sum (x - y)^2        =>  dL/dx = g * 2 (x - y)        (sum)
    L_i = (x_i - y_i)^2      =>  dL/dx_i = g_i * 2 (x_i - y_i) (none)
    and dL/dy = -dL/dx in every case.
    """
    # max(., 1): an empty mean has an empty gradient, whatever the factor.
    norm = 2.0 / max(input.numel(), 1) if reduction == "mean" else 2.0
    return norm * (input - target) * grad_output
