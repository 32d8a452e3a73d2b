"""Linear + activation in plain torch ops: ``y = act(x W^T + b)`` and its hand-derived backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from manualbp.activations import Activation


def linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    act: Activation | None,
    negative_slope: float,
    *,
    store_preact: bool,
) -> tuple[Tensor, Tensor | None]:
    """``(y, z)`` with ``z = x W^T + b`` and ``y = act(z)``; ``z`` only when ``store_preact``."""
    z = F.linear(x, weight, bias)
    if act is None:
        return z, None
    return act.forward(z, negative_slope), (z if store_preact else None)


def linear_backward(
    grad_y: Tensor,
    x: Tensor | None,
    weight: Tensor | None,
    saved: Tensor | None,
    act: Activation | None,
    negative_slope: float,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dW, db)`` for 2-D ``x`` (M, K) and ``grad_y`` (M, N), by the chain rule.

    dZ = dY * act'(Z)    (``saved`` is Y or Z, whichever ``act`` derives from)
    dX = dZ W,   dW = dZ^T X,   db = sum_rows dZ
    """
    if act is None:
        grad_z = grad_y
    elif grad_y.dtype in (torch.float16, torch.bfloat16):
        # Evaluate act' in float32 and round once, as aten's kernels do.
        grad_z = act.grad(grad_y.float(), saved.float(), negative_slope).to(grad_y.dtype)
    else:
        grad_z = act.grad(grad_y, saved, negative_slope)
    dx = grad_z @ weight if needs_grad[0] else None
    dw = grad_z.mT @ x if needs_grad[1] else None
    db = grad_z.sum(0) if needs_grad[2] else None
    return dx, dw, db
