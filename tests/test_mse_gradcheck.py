"""gradcheck and gradgradcheck (float64) of the hand-written MSE backward.

The cases (reduction, target layout) are ``manualbp check``'s: :data:`manualbp.testing.MSE_CASES`.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from manualbp import functional
from tests.helpers import MSE_CASES, REDUCTIONS

ROWS, COLS = 4, 3  # the input of the table's cases


@pytest.mark.parametrize("target_grad", [False, True], ids=["target_fixed", "target_grad"])
@pytest.mark.parametrize("case", MSE_CASES, ids=lambda case: case.variant)
def test_gradcheck_and_gradgradcheck(case, target_grad):
    # The targets: same shape, a row (cols,) and a column (rows, 1) broadcast, and a (1, cols)
    # leaf that the loss sees expanded (a stride-0 view).
    x = torch.randn(ROWS, COLS, dtype=torch.float64, requires_grad=True)
    t = torch.randn(case.target_shape(ROWS, COLS), dtype=torch.float64)
    t.requires_grad_(target_grad)
    inputs = (x, t) if target_grad else (x,)

    def f(x, t=t):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the broadcast warning
            return functional.mse_loss(x, case.target_seen(t, ROWS, COLS), case.reduction)

    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
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
