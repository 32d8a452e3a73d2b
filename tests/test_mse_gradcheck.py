"""gradcheck and gradgradcheck (float64) of the hand-written MSE backward."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from manualbp import functional

TARGET_SHAPES = {
    "same": (4, 3),
    "broadcast_row": (3,),  # broadcast over the batch dim
    "broadcast_col": (4, 1),
    "expanded_view": "expanded",  # a stride-0 view of the same shape
}


def _target(kind: str) -> torch.Tensor:
    shape = TARGET_SHAPES[kind]
    if shape == "expanded":  # the leaf is the (1, 3) base; the loss sees its expand
        return torch.randn(1, 3, dtype=torch.float64)
    return torch.randn(shape, dtype=torch.float64)


@pytest.mark.parametrize("target_grad", [False, True], ids=["target_fixed", "target_grad"])
@pytest.mark.parametrize("target_kind", list(TARGET_SHAPES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_and_gradgradcheck(reduction, target_kind, target_grad):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = _target(target_kind).detach().requires_grad_(target_grad)
    inputs = (x, t) if target_grad else (x,)

    def f(x, t=t):
        if target_kind == "expanded_view":
            t = t.expand(4, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the broadcast warning
            return functional.mse_loss(x, t, reduction)

    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_input_broadcast_against_target(reduction):
    # The input, not the target, is the smaller operand: its gradient sums over the batch.
    x = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def f(x, t):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return functional.mse_loss(x, t, reduction)

    assert gradcheck(f, (x, t))
    assert gradgradcheck(f, (x, t))
