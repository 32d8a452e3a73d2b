"""Property-based tests: random shapes, strides, dtypes and activations, held to native autograd."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from manualbp import functional
from tests.helpers import ACTIVATION_NAMES, assert_close_through_sum, clone_leaf, native_activation

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False
)
DTYPES = st.sampled_from([torch.float32, torch.float64])


@st.composite
def strided(draw, shape, dtype):
    """A tensor of ``shape`` with drawn strides: contiguous, transposed, or sliced with steps."""
    kind = draw(st.sampled_from(["contiguous", "transposed", "stepped", "offset"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if kind == "transposed" and len(shape) >= 2:
        return torch.randn(tuple(reversed(shape)), generator=g, dtype=dtype).permute(
            *reversed(range(len(shape)))
        )
    if kind == "stepped":
        step = draw(st.integers(2, 3))
        big = torch.randn(*shape[:-1], shape[-1] * step if shape else 1, generator=g, dtype=dtype)
        return big[..., ::step] if shape else big[0]
    if kind == "offset":  # a storage offset of one element
        return torch.randn(int(torch.Size(shape).numel()) + 1, generator=g, dtype=dtype)[1:].view(
            shape
        )
    return torch.randn(shape, generator=g, dtype=dtype)


def _poison(t: torch.Tensor, draw) -> torch.Tensor:
    """Sometimes put a NaN or an Inf into ``t`` (in a copy)."""
    value = draw(st.sampled_from([None, float("nan"), float("inf"), -float("inf")]))
    if value is None or t.numel() == 0:
        return t
    t = t.clone()  # keeps the strides
    flat = torch.tensor(draw(st.integers(0, t.numel() - 1)))
    t[torch.unravel_index(flat, t.shape)] = value
    return t


@given(data=st.data(), dtype=DTYPES, activation=st.sampled_from(ACTIVATION_NAMES))
@SETTINGS
def test_linear_matches_native(data, dtype, activation):
    lead = data.draw(st.lists(st.integers(0, 5), min_size=0, max_size=2), label="lead")
    K, N = data.draw(st.integers(1, 9), label="K"), data.draw(st.integers(1, 9), label="N")
    x = _poison(data.draw(strided((*lead, K), dtype)), data.draw).requires_grad_()
    w = data.draw(strided((N, K), dtype)).requires_grad_()
    b = data.draw(st.one_of(st.none(), strided((N,), dtype)))
    b = None if b is None else b.requires_grad_()
    slope = data.draw(st.sampled_from([0.01, 0.3, -0.2]))
    grad_out = torch.randn(*lead, N, dtype=dtype)

    xs, ws = clone_leaf(x), clone_leaf(w)
    bs = None if b is None else clone_leaf(b)
    y = functional.linear(x, w, b, activation, negative_slope=slope)
    y_ref = native_activation(activation, slope)(F.linear(xs, ws, bs))
    assert_close(y, y_ref, equal_nan=True)
    y.backward(grad_out)
    y_ref.backward(grad_out)

    z = F.linear(x.detach(), w.detach(), None if b is None else b.detach()).requires_grad_()
    (dz,) = torch.autograd.grad(native_activation(activation, slope)(z), z, grad_out)
    dz2, x2 = dz.reshape(-1, N).abs(), x.detach().reshape(-1, K).abs()
    assert_close_through_sum(x.grad, xs.grad, dz.abs() @ w.detach().abs())
    assert_close_through_sum(w.grad, ws.grad, dz2.mT @ x2)
    if b is not None:
        assert_close_through_sum(b.grad, bs.grad, dz2.sum(0))


@given(data=st.data(), dtype=DTYPES, reduction=st.sampled_from(["mean", "sum", "none"]))
@SETTINGS
def test_mse_matches_native(data, dtype, reduction):
    shape = data.draw(st.lists(st.integers(0, 6), min_size=0, max_size=3), label="shape")
    # The target is the same shape, broadcast from size-1 dims, or a stride-0 expand.
    t_kind = data.draw(st.sampled_from(["same", "broadcast", "expanded"]))
    x = _poison(data.draw(strided(tuple(shape), dtype)), data.draw).requires_grad_()
    if t_kind == "same":
        t = data.draw(strided(tuple(shape), dtype))
    else:
        small = tuple(data.draw(st.sampled_from([1, s])) for s in shape)
        t = data.draw(strided(small, dtype))
        if t_kind == "expanded":
            t = t.expand(shape)
    t = t.requires_grad_(data.draw(st.booleans())) if t._base is None else t
    xs, ts = clone_leaf(x), clone_leaf(t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loss = functional.mse_loss(x, t, reduction)
        ref = F.mse_loss(xs, ts, reduction=reduction)
    assert_close(loss, ref, equal_nan=True)
    g = torch.randn_like(ref)
    loss.backward(g)
    ref.backward(g)
    assert_close(x.grad, xs.grad, equal_nan=True)
    if t.requires_grad:
        assert_close(t.grad, ts.grad, equal_nan=True)
