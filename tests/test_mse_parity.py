"""manualbp's MSE against F.mse_loss and native autograd: values, gradients, warnings, dtypes.

The cases (reduction, target layout) are ``manualbp check``'s: :data:`manualbp.testing.MSE_CASES`.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from manualbp import functional
from manualbp.testing import parity
from tests.helpers import DEFAULT_TOLERANCES, MSE_CASES, REDUCTIONS, clone_leaf, leaf

ROWS, COLS = 47, 31  # the input of the table's cases


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


def _both(x, t, reduction, grad_out=None, seen_target=_as_is):
    """(loss, x.grad, t.grad) from manualbp and from native autograd, on copies; the losses are
    called with ``seen_target(t)`` (a view of the target, or the target itself)."""
    results = []
    for fn in (functional.mse_loss, F.mse_loss):
        xi, ti = clone_leaf(x), clone_leaf(t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            loss = fn(xi, seen_target(ti), reduction=reduction)
        g = torch.ones_like(loss) if grad_out is None else grad_out
        if loss.requires_grad:
            loss.backward(g)
        results.append((loss, xi.grad, ti.grad))
    return results


@pytest.mark.parametrize("target_grad", [False, True])
@pytest.mark.parametrize("case", MSE_CASES, ids=lambda case: case.variant)
def test_matches_native(case, target_grad):
    x = leaf(torch.randn(ROWS, COLS))
    t = torch.randn(case.target_shape(ROWS, COLS)).requires_grad_(target_grad)
    grad_out = torch.randn(ROWS, COLS) if case.reduction == "none" else torch.randn(())
    ours, native = _both(x, t, case.reduction, grad_out, lambda t: case.target_seen(t, ROWS, COLS))
    for got, want in zip(ours, native):
        assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("dtype", list(DEFAULT_TOLERANCES))
@pytest.mark.parametrize("case", MSE_CASES, ids=lambda case: case.variant)
def test_every_dtype_within_the_checks_tolerance(case, dtype):
    """``manualbp check``'s judgement (manualbp.testing.parity) in every dtype: the loss and
    both gradients against native, allowing native's own error as measured in float64."""
    x = torch.randn(ROWS, COLS, dtype=dtype)
    t = torch.randn(case.target_shape(ROWS, COLS), dtype=dtype)
    grad_out = torch.randn((ROWS, COLS) if case.reduction == "none" else (), dtype=dtype)

    def ours(x, t):
        return functional.mse_loss(x, case.target_seen(t, ROWS, COLS), case.reduction)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the broadcast warning
        results = parity(ours, case, [x, t], grad_out)
    assert list(results) == ["forward", "d input", "d target"]
    for name, result in results.items():
        assert result.ok, f"{name}: {result.detail}"


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "x_shape,t_shape",
    [((5, 47, 31), (47, 31)), ((0, 31), (0, 31)), ((1, 31), (47, 31)), ((), ())],
)
@pytest.mark.parametrize("target_grad", [False, True])
def test_other_shapes_match_native(reduction, x_shape, t_shape, target_grad):
    """Shapes beside the table's: a batch dim, zero rows, the input broadcast, scalars."""
    x = leaf(torch.randn(x_shape))
    t = torch.randn(t_shape).requires_grad_(target_grad)
    shape = torch.broadcast_shapes(x_shape, t_shape)
    grad_out = torch.randn(shape) if reduction == "none" else torch.randn(())
    ours, native = _both(x, t, reduction, grad_out)
    for got, want in zip(ours, native):
        assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_non_contiguous_and_expanded_views(reduction):
    x = leaf(torch.randn(31, 94)[:, ::2].T)  # transposed and strided: (47, 31)
    t = torch.randn(1, 31).expand(47, 31)  # stride-0 rows
    ours, native = _both(x, t, reduction)
    for got, want in zip(ours, native):
        assert_close(got, want)


def test_same_warning_as_native():
    x, t = torch.randn(4, 3), torch.randn(4, 1)
    with pytest.warns(UserWarning) as ours:
        functional.mse_loss(x, t)
    with pytest.warns(UserWarning) as native:
        F.mse_loss(x, t)
    assert str(ours[0].message) == str(native[0].message)
    assert ours[0].filename == __file__  # points at the caller, as native's does
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        functional.mse_loss(x, x)  # same size: no warning


@pytest.mark.parametrize(
    "dx,dt",
    [(torch.float32, torch.float64), (torch.float16, torch.float32), (torch.int64, torch.float32)],
)
def test_dtype_promotion(dx, dt):
    # Native semantics: the loss is computed in the inputs' promoted dtype, and each input's
    # gradient comes back in that input's own dtype. The reference promotes before calling
    # F.mse_loss, which is what a mixed-dtype call means: native mixed-dtype backward itself
    # raises on some supported torch releases (2.11: "Found dtype Double but expected Float").
    common = torch.promote_types(dx, dt)
    x = (torch.randn(6, 5) * 3).to(dx)
    t = torch.randn(6, 5).to(dt)
    ours = functional.mse_loss(x, t)
    assert ours.dtype == common
    assert_close(ours, F.mse_loss(x.to(common), t.to(common)))
    # Every floating-point input requires grad.
    mine = [leaf(v) if v.is_floating_point() else v for v in (x, t)]
    ref = [leaf(v) if v.is_floating_point() else v for v in (x, t)]
    functional.mse_loss(*mine).backward()
    F.mse_loss(*(v.to(common) for v in ref)).backward()
    for got, want, dtype in zip(mine, ref, (dx, dt)):
        if dtype.is_floating_point:
            assert got.grad.dtype == dtype
            assert_close(got.grad, want.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_double_backward_matches_native(reduction):
    x, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    grads = []
    for fn in (functional.mse_loss, F.mse_loss):
        xi, ti = leaf(x), leaf(t)
        (gx,) = torch.autograd.grad(fn(xi, ti, reduction=reduction), xi, create_graph=True)
        (gx * gx).sum().backward()
        grads.append((xi.grad, ti.grad))
    for got, want in zip(*grads):
        assert_close(got, want)
