"""gradcheck and gradgradcheck (float64, finite differences) of the hand-written Linear backward.

The cases (activation, slope, bias) are ``manualbp check``'s: :data:`manualbp.testing.LINEAR_CASES`.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from manualbp import functional
from tests.helpers import LINEAR_CASES, leaf, make_layout

RANK_SHAPES = {1: (5,), 2: (3, 5), 3: (2, 3, 5)}  # leading dims of the input; K = 5
OUT = 4


@pytest.mark.parametrize("layout", ["contiguous", "noncontig", "transposed"])
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda case: case.variant)
def test_gradcheck_and_gradgradcheck(case, rank, layout):
    kw = {"dtype": torch.float64}
    x = leaf(make_layout(RANK_SHAPES[rank], layout, **kw))
    w = leaf(make_layout((OUT, 5), layout, **kw))
    b = leaf(torch.randn(OUT, **kw)) if case.bias else None
    inputs = (x, w, b) if case.bias else (x, w)

    def f(x, w, b=None):
        return functional.linear(x, w, b, case.activation, negative_slope=case.negative_slope)

    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("negative_slope", [-0.5, 0.0, 0.1, 2.0])
def test_leaky_relu_any_slope(negative_slope):
    # A negative slope flips the sign of y, so the backward must keep z instead of y.
    x, w, b = (leaf(torch.randn(s, dtype=torch.float64)) for s in [(6, 3), (4, 3), (4,)])

    def f(x, w, b):
        return functional.linear(x, w, b, "leaky_relu", negative_slope=negative_slope)

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("activation", ["gelu", "relu", None])
def test_gradcheck_with_only_some_inputs_requiring_grad(activation):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x, b: functional.linear(x, w, b, activation), (x, b))
    assert gradgradcheck(lambda x, b: functional.linear(x, w, b, activation), (x, b))
    x2 = x.detach()
    w2 = w.clone().requires_grad_()
    assert gradcheck(lambda w: functional.linear(x2, w, None, activation), (w2,))
    assert gradgradcheck(lambda w: functional.linear(x2, w, None, activation), (w2,))
