"""manualbp's Linear against native autograd in float32: outputs and every gradient."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from manualbp import functional
from tests.helpers import (
    ACTIVATION_NAMES,
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


def _run(fn, x, w, b, activation, grad_out):
    y = fn(x, w, b, activation)
    y.backward(grad_out)
    return y, x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("layout", ["contiguous", "noncontig", "transposed"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("lead,K,N", SHAPES)
def test_matches_native_autograd(lead, K, N, activation, bias, layout):
    x = leaf(make_layout((*lead, K), layout))
    w = leaf(make_layout((N, K), layout))
    b = leaf(torch.randn(N)) if bias else None
    grad_out = torch.randn(*lead, N)
    ours = _run(functional.linear, x, w, b, activation, grad_out)
    xn, wn = clone_leaf(x), clone_leaf(w)
    bn = None if b is None else clone_leaf(b)
    native = _run(native_linear, xn, wn, bn, activation, grad_out)
    assert_close(ours[0], native[0])
    _assert_grads_close(ours[1:], native[1:], x, w, b, activation, grad_out)


def _assert_grads_close(ours, native, x, w, b, activation, grad_out):
    """Gradients at default tolerances plus what the GEMM sums can add (see helpers)."""
    with torch.enable_grad():
        z = torch.nn.functional.linear(x.detach(), w.detach(), None if b is None else b.detach())
        z.requires_grad_()
        (dz,) = torch.autograd.grad(native_activation(activation)(z), z, grad_out)
    dz2, x2 = dz.reshape(-1, dz.shape[-1]).abs(), x.detach().reshape(-1, x.shape[-1]).abs()
    bounds = [dz.abs() @ w.detach().abs(), dz2.mT @ x2, dz2.sum(0)]
    for got, want, bound in zip(ours, native, bounds):
        if want is not None:
            assert_close_through_sum(got, want, bound)


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_no_grad_forward_matches_native(activation):
    x, w, b = torch.randn(47, 31), torch.randn(123, 31), torch.randn(123)
    with torch.no_grad():
        assert_close(functional.linear(x, w, b, activation), native_linear(x, w, b, activation))


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
    ours = _run(functional.linear, x, w, b, "silu", grad_out)
    xn, wn, bn = clone_leaf(x), clone_leaf(w), clone_leaf(b)
    native = _run(native_linear, xn, wn, bn, "silu", grad_out)
    assert ours[0].dtype == dtype
    assert_close(ours[0], native[0])
    _assert_grads_close(ours[1:], native[1:], x, w, b, "silu", grad_out)


@pytest.mark.parametrize("K,N", [(0, 5), (4, 0), (0, 0)])
@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
def test_zero_features_match_native(K, N, activation):
    x, w, b = leaf(torch.randn(3, 2, K)), leaf(torch.randn(N, K)), leaf(torch.randn(N))
    grad_out = torch.randn(3, 2, N)
    ours = _run(functional.linear, x, w, b, activation, grad_out)
    xn, wn, bn = clone_leaf(x), clone_leaf(w), clone_leaf(b)
    native = _run(native_linear, xn, wn, bn, activation, grad_out)
    for got, want in zip(ours, native):
        assert_close(got, want)
