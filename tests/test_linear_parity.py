"""manualbp's Linear against native autograd in float32: outputs and every gradient.

The cases (activation, slope, bias) are ``manualbp check``'s: :data:`manualbp.testing.LINEAR_CASES`.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from manualbp import functional
from manualbp.testing import parity
from tests.helpers import (
    DEFAULT_TOLERANCES,
    LINEAR_CASES,
    LinearCase,
    assert_close_through_sum,
    clone_leaf,
    leaf,
    make_layout,
    native_activation,
    native_linear,
)

SHAPES = [  # (leading dims, in_features K, out_features N)
    ((47,), 31, 123),
    ((5, 47), 31, 123),
    ((123,), 47, 31),
    ((), 31, 17),  # 1-D input
    ((0,), 31, 17),  # zero-size batch
    ((3, 0), 8, 5),
    ((1,), 1, 1),
]


def _run(fn, x, w, b, case: LinearCase, grad_out):
    y = fn(x, w, b, case.activation, negative_slope=case.negative_slope)
    y.backward(grad_out)
    return y, x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("layout", ["contiguous", "noncontig", "transposed"])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda case: case.variant)
@pytest.mark.parametrize("lead,K,N", SHAPES)
def test_matches_native_autograd(lead, K, N, case, layout):
    x = leaf(make_layout((*lead, K), layout))
    w = leaf(make_layout((N, K), layout))
    b = leaf(torch.randn(N)) if case.bias else None
    grad_out = torch.randn(*lead, N)
    ours = _run(functional.linear, x, w, b, case, grad_out)
    xn, wn = clone_leaf(x), clone_leaf(w)
    bn = None if b is None else clone_leaf(b)
    native = _run(native_linear, xn, wn, bn, case, grad_out)
    assert_close(ours[0], native[0])
    _assert_grads_close(ours[1:], native[1:], x, w, b, case, grad_out)


def _assert_grads_close(ours, native, x, w, b, case: LinearCase, grad_out):
    """Gradients at default tolerances plus what the GEMM sums can add (see helpers)."""
    with torch.enable_grad():
        z = torch.nn.functional.linear(x.detach(), w.detach(), None if b is None else b.detach())
        z.requires_grad_()
        act = native_activation(case.activation, case.negative_slope)
        (dz,) = torch.autograd.grad(act(z), z, grad_out)
    dz2, x2 = dz.reshape(-1, dz.shape[-1]).abs(), x.detach().reshape(-1, x.shape[-1]).abs()
    bounds = [dz.abs() @ w.detach().abs(), dz2.mT @ x2, dz2.sum(0)]
    for got, want, bound in zip(ours, native, bounds):
        if want is not None:
            assert_close_through_sum(got, want, bound)


@pytest.mark.parametrize("dtype", list(DEFAULT_TOLERANCES))
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda case: case.variant)
def test_every_dtype_within_the_checks_tolerance(case, dtype):
    """``manualbp check``'s judgement (manualbp.testing.parity) in every dtype: the output and
    every gradient against native, allowing native's own error as measured in float64."""
    x, w = torch.randn(3, 9, 13, dtype=dtype), torch.randn(11, 13, dtype=dtype)
    b = torch.randn(11, dtype=dtype) if case.bias else None

    def ours(x, w, b=None):
        return functional.linear(x, w, b, case.activation, negative_slope=case.negative_slope)

    results = parity(ours, case, [x, w, b], torch.randn(3, 9, 11, dtype=dtype))
    assert list(results) == ["forward", "dX", "dW", "db"][: 4 if case.bias else 3]
    for name, result in results.items():
        assert result.ok, f"{name}: {result.detail}"


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda case: case.variant)
def test_no_grad_forward_matches_native(case):
    x, w = torch.randn(47, 31), torch.randn(123, 31)
    b = torch.randn(123) if case.bias else None
    act, slope = case.activation, case.negative_slope
    with torch.no_grad():
        ours = functional.linear(x, w, b, act, negative_slope=slope)
        assert_close(ours, native_linear(x, w, b, act, slope))


def test_inputs_without_grad_get_none_and_are_not_computed():
    x = torch.randn(6, 4)
    w = torch.randn(3, 4, requires_grad=True)
    functional.linear(x, w, None, "relu").sum().backward()
    assert x.grad is None and w.grad is not None


@pytest.mark.parametrize("activation", ["gelu", "tanh", None])
def test_double_backward_matches_native(activation):
    # A gradient penalty: d/dW of ||dL/dx||^2, which differentiates the backward itself.
    def penalty(fn, x, w, b):
        y = fn(x, w, b, activation)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
        return w.grad, b.grad

    # float64: a second derivative composes several roundings, each of which may fall
    # differently from aten's fused double-backward kernels; in float64 they vanish.
    x, w, b = (leaf(torch.randn(s, dtype=torch.float64)) for s in [(7, 5), (3, 5), (3,)])
    ours = penalty(functional.linear, x, w, b)
    native = penalty(native_linear, clone_leaf(x), clone_leaf(w), clone_leaf(b))
    for got, want in zip(ours, native):
        assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_match_native(dtype):
    x, w, b = (leaf(torch.randn(s, dtype=dtype)) for s in [(9, 13), (7, 13), (7,)])
    grad_out = torch.randn(9, 7, dtype=dtype)
    silu = LinearCase("silu")
    ours = _run(functional.linear, x, w, b, silu, grad_out)
    xn, wn, bn = clone_leaf(x), clone_leaf(w), clone_leaf(b)
    native = _run(native_linear, xn, wn, bn, silu, grad_out)
    assert ours[0].dtype == dtype
    assert_close(ours[0], native[0])
    _assert_grads_close(ours[1:], native[1:], x, w, b, silu, grad_out)


@pytest.mark.parametrize("K,N", [(0, 5), (4, 0), (0, 0)])
@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
def test_zero_features_match_native(K, N, activation):
    x, w, b = leaf(torch.randn(3, 2, K)), leaf(torch.randn(N, K)), leaf(torch.randn(N))
    grad_out = torch.randn(3, 2, N)
    case = LinearCase(activation)
    ours = _run(functional.linear, x, w, b, case, grad_out)
    xn, wn, bn = clone_leaf(x), clone_leaf(w), clone_leaf(b)
    native = _run(native_linear, xn, wn, bn, case, grad_out)
    for got, want in zip(ours, native):
        assert_close(got, want)
