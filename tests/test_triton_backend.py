"""The autograd Functions run end to end on the Triton kernels (backend "triton").

Without a GPU the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set
by conftest.py), so the sizes stay small. The oracle is native autograd / float64 math.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.testing import assert_close

import manualbp
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

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the Triton kernels need a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton_backend():
    with manualbp.use_backend("triton"):
        yield


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_gradcheck_through_the_kernels(activation):
    kw = {"dtype": torch.float64, "device": DEVICE}
    x = leaf(make_layout((2, 5, 7), "transposed", **kw))
    w, b = leaf(torch.randn(6, 7, **kw)), leaf(torch.randn(6, **kw))
    assert gradcheck(lambda x, w, b: functional.linear(x, w, b, activation), (x, w, b))


@pytest.mark.parametrize("layout", ["contiguous", "noncontig"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_linear_float32_matches_native(activation, bias, layout):
    # "highest": the kernels then use exact fp32 products (no TF32), as cuBLAS does.
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        x = leaf(make_layout((47, 31), layout, device=DEVICE))
        w = leaf(make_layout((23, 31), layout, device=DEVICE))
        b = leaf(torch.randn(23, device=DEVICE)) if bias else None
        ours = functional.linear(x, w, b, activation)
        xr, wr, br = clone_leaf(x), clone_leaf(w), None if b is None else clone_leaf(b)
        want = native_linear(xr, wr, br, activation)
        g = torch.randn_like(want)
        ours.backward(g)
        want.backward(g)
    finally:
        torch.set_float32_matmul_precision(prev)
    # Both sides sum K (or M, or N) products in their own order: the dtype's tolerance
    # plus the rounding such a sum may add (tests/helpers.py).
    xa, wa = x.detach().abs(), w.detach().abs()
    z = F.linear(x.detach(), w.detach(), None if b is None else b.detach()).requires_grad_()
    (dz,) = torch.autograd.grad(native_activation(activation)(z), z, g)
    slope = _lipschitz(activation, z.detach())
    fwd_bound = slope * (xa @ wa.mT)
    assert_close_through_sum(ours, want, fwd_bound)
    dza = dz.abs()
    assert_close_through_sum(x.grad, xr.grad, dza @ wa)
    assert_close_through_sum(w.grad, wr.grad, dza.mT @ xa)
    if b is not None:
        assert_close_through_sum(b.grad, br.grad, dza.sum(0))


def _lipschitz(activation, z):
    """|act'(z)|, bounding how much a rounding of z can move act(z)."""
    z = z.detach().requires_grad_()
    (d,) = torch.autograd.grad(native_activation(activation)(z).sum(), z)
    return d.abs()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_matches_native(reduction):
    x = leaf(torch.randn(47, 31, device=DEVICE))
    t = torch.randn(1, 31, device=DEVICE).expand(47, 31)
    xr = clone_leaf(x)
    loss, want = functional.mse_loss(x, t, reduction), F.mse_loss(xr, t, reduction=reduction)
    assert_close(loss, want)
    g = torch.randn_like(want)
    loss.backward(g)
    want.backward(g)
    assert_close(x.grad, xr.grad)


def test_mse_gradcheck_through_the_kernels():
    kw = {"dtype": torch.float64, "device": DEVICE}
    x, t = leaf(torch.randn(5, 4, **kw)), leaf(torch.randn(4, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for reduction in ("mean", "sum", "none"):
            assert gradcheck(lambda x, t, r=reduction: functional.mse_loss(x, t, r), (x, t))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_mse_head_matches_native(reduction):
    kw = {"dtype": torch.float64, "device": DEVICE}
    x, w, b = (
        leaf(torch.randn(19, 6, **kw)),
        leaf(torch.randn(40, 6, **kw)),
        leaf(torch.randn(40, **kw)),
    )
    t = torch.randn(19, 40, **kw)
    xr, wr, br = clone_leaf(x), clone_leaf(w), clone_leaf(b)
    loss = functional.linear_mse_loss(x, w, b, t, reduction, chunk_rows=8)
    want = F.mse_loss(F.linear(xr, wr, br), t, reduction=reduction)
    assert_close(loss, want)
    g = torch.randn_like(want)
    loss.backward(g)
    want.backward(g)
    for got, ref in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        assert_close(got, ref)


@pytest.mark.parametrize("K,N", [(0, 5), (4, 0)])
def test_zero_features_through_the_kernels(K, N):
    kw = {"dtype": torch.float64, "device": DEVICE}
    x, w, b = (
        leaf(torch.randn(3, K, **kw)),
        leaf(torch.randn(N, K, **kw)),
        leaf(torch.randn(N, **kw)),
    )
    y = functional.linear(x, w, b, "gelu")
    xr, wr, br = clone_leaf(x), clone_leaf(w), clone_leaf(b)
    want = native_linear(xr, wr, br, "gelu")
    assert_close(y, want)
    g = torch.randn_like(want)
    y.backward(g)
    want.backward(g)
    for got, ref in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        assert_close(got, ref)
