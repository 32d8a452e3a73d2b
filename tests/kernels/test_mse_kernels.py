"""The MSE launchers of ``triton_kernels.mse`` against float64 torch math / ``F.mse_loss``.

Runs the kernels under Triton's CPU interpreter (``TRITON_INTERPRET=1``, which
``tests/conftest.py`` sets when there is no GPU) or on CUDA. Sizes are small and odd so that
blocks are partly masked; the interpreter's block sizes are small (see ``_INTERP_*`` in the
module), so these sizes still span several programs and several reduction passes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip(
        "Triton kernels need CUDA or the CPU interpreter (TRITON_INTERPRET=1 before importing "
        "triton)",
        allow_module_level=True,
    )

from manualbp.kernels import mse

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
REDUCTIONS = ["mean", "sum", "none"]


def _acc_eps(dtype: torch.dtype) -> float:
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _rand(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    return torch.randn(shape, dtype=torch.float64, device=DEVICE).to(dtype)


# Each builder returns (input, target) of the same shape, with the layout its name says.
def _contiguous(dtype):
    return _rand((47, 31), dtype), _rand((47, 31), dtype)


def _row_broadcast(dtype):  # target stride (0, 1)
    return _rand((47, 31), dtype), _rand((31,), dtype).expand(47, 31)


def _col_broadcast(dtype):  # target stride (1, 0)
    return _rand((47, 31), dtype), _rand((47, 1), dtype).expand(47, 31)


def _scalar_broadcast(dtype):  # target all stride 0
    return _rand((5, 7, 3), dtype), _rand((), dtype).expand(5, 7, 3)


def _transposed(dtype):
    return _rand((31, 47), dtype).t(), _rand((47, 31), dtype)


def _sliced(dtype):
    return _rand((47, 62), dtype)[:, ::2], _rand((50, 31), dtype)[3:]


def _both_expanded(dtype):  # input stride (0, 1), target stride (1, 0)
    return _rand((31,), dtype).expand(47, 31), _rand((47, 1), dtype).expand(47, 31)


def _permuted_4d(dtype):
    return _rand((2, 3, 4, 5), dtype).permute(3, 1, 0, 2), _rand((5, 3, 2, 4), dtype)


def _permuted_5d(dtype):  # > MAX_DIMS non-mergeable dims: the documented contiguous fallback
    x = _rand((2, 3, 2, 3, 2), dtype).permute(4, 2, 0, 3, 1)  # (2, 2, 2, 3, 3)
    t = _rand((3, 2, 3, 2, 2), dtype).permute(1, 3, 4, 0, 2)
    return x, t


def _one(dtype):
    return _rand((1,), dtype), _rand((1,), dtype)


def _zero_dim(dtype):
    return _rand((), dtype), _rand((), dtype)


def _long_1d(dtype):  # 1000 = not a multiple of any block size
    return _rand((1000,), dtype), _rand((1000,), dtype)


LAYOUTS = [
    _contiguous, _row_broadcast, _col_broadcast, _scalar_broadcast, _transposed, _sliced,
    _both_expanded, _permuted_4d, _permuted_5d, _one, _zero_dim, _long_1d,
]  # fmt: skip


def _want_loss(x: Tensor, t: Tensor, reduction: str) -> Tensor:
    return F.mse_loss(x.double(), t.double(), reduction=reduction)


def _check_loss(got: Tensor, x: Tensor, t: Tensor, reduction: str) -> None:
    """Loss within one rounding to the dtype plus a tree-sum's accumulation error."""
    want = _want_loss(x, t, reduction)
    assert got.dtype == x.dtype and got.shape == want.shape
    if reduction == "none":
        assert got.is_contiguous()
    eps = torch.finfo(x.dtype).eps
    n = max(x.numel(), 1)
    # (x - t)**2 in the accumulation dtype: 3 roundings per term; a tree of depth log2(n).
    acc_err = (3 + math.ceil(math.log2(n)) + 1) * _acc_eps(x.dtype) * want.abs()
    allowed = eps * want.abs() + acc_err + torch.finfo(x.dtype).tiny
    err = (got.double() - want).abs()
    assert bool((err <= allowed).all()), f"max err {err.max().item()}, allowed {allowed.max()}"


def _want_grad(x: Tensor, t: Tensor, reduction: str) -> Tensor:
    d = x.double() - t.double()
    return 2 * d / x.numel() if reduction == "mean" else 2 * d


def _check_elementwise(got: Tensor, want: Tensor, dtype: torch.dtype) -> None:
    """One rounding to ``dtype`` after a few ops in the accumulation dtype."""
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    allowed = (torch.finfo(dtype).eps + 4 * _acc_eps(dtype)) * want.abs()
    allowed = allowed + torch.finfo(dtype).tiny
    err = (got.double() - want).abs()
    assert bool((err <= allowed).all()), f"max err {err.max().item()}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forward(layout, dtype, reduction):
    x, t = layout(dtype)
    loss, grad = mse.mse_forward(x, t, reduction, compute_grad=True)
    _check_loss(loss, x, t, reduction)
    if reduction == "none":
        assert grad is None
    else:
        _check_elementwise(grad, _want_grad(x, t, reduction), dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forward_without_grad(reduction):
    x, t = _row_broadcast(torch.float32)
    loss, grad = mse.mse_forward(x, t, reduction, compute_grad=False)
    assert grad is None
    _check_loss(loss, x, t, reduction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_forward_empty(dtype):
    x = _rand((0, 31), dtype)
    t = _rand((31,), dtype).expand(0, 31)
    for reduction in REDUCTIONS:
        loss, grad = mse.mse_forward(x, t, reduction, compute_grad=True)
        want = F.mse_loss(x, t, reduction=reduction)
        torch.testing.assert_close(loss, want, equal_nan=True)
        if reduction != "none":
            assert grad is not None and grad.shape == x.shape and grad.dtype == dtype


def test_forward_is_deterministic():
    x, t = _row_broadcast(torch.float32)
    a, ga = mse.mse_forward(x, t, "sum", compute_grad=True)
    b, gb = mse.mse_forward(x, t, "sum", compute_grad=True)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_forward_many_reduction_passes():
    """17408 elements: 272 partials, then 17, then 1 with the interpreter's blocks; a constant
    summand makes a sequential fp32 sum drift, a tree does not."""
    x = torch.full((17408,), 1.1, dtype=torch.float32, device=DEVICE)
    t = torch.zeros_like(x)
    for reduction in ("mean", "sum"):
        loss, _ = mse.mse_forward(x, t, reduction, compute_grad=False)
        _check_loss(loss, x, t, reduction)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward(layout, dtype, reduction):
    x, t = layout(dtype)
    if reduction == "none":
        # A strided upstream gradient: reversed-dim memory order.
        go = _rand(tuple(reversed(x.shape)), dtype).permute(tuple(reversed(range(x.dim()))))
    else:
        go = torch.tensor(0.37, dtype=dtype, device=DEVICE)
    got = mse.mse_backward(go, x, t, reduction)
    _check_elementwise(got, _want_grad(x, t, reduction) * go.double(), dtype)


def test_backward_broadcast_grad_output():
    x, t = _transposed(torch.float32)
    go = _rand((31,), torch.float32).expand(47, 31)
    got = mse.mse_backward(go, x, t, "none")
    _check_elementwise(got, _want_grad(x, t, "none") * go.double(), torch.float32)


def test_backward_empty():
    x = _rand((0, 3), torch.float32)
    assert mse.mse_backward(torch.tensor(1.0, device=DEVICE), x, x, "mean").shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_scale_(dtype, layout):
    base = _rand((47, 31), dtype)
    g = {"contiguous": base, "transposed": base.t(), "sliced": base[:, 1::3]}[layout]
    before = g.double().clone()
    base_before = base.clone()
    go = torch.tensor(-2.5, dtype=dtype, device=DEVICE)
    out = mse.scale_(g, go)
    assert out is g
    # -2.5 * v is exact in the accumulation dtype: one rounding to ``dtype`` at most.
    assert bool(((g.double() - before * -2.5).abs() <= torch.finfo(dtype).eps * before.abs() * 3)
                .all())  # fmt: skip
    if layout == "sliced":  # elements outside the view stay untouched
        keep = torch.ones(31, dtype=torch.bool, device=DEVICE)
        keep[1::3] = False
        assert torch.equal(base[:, keep], base_before[:, keep])


def test_scale_rejects_stride_zero():
    g = _rand((3,), torch.float32).expand(4, 3)
    with pytest.raises(ValueError, match="stride-0"):
        mse.scale_(g, torch.tensor(2.0, device=DEVICE))


def test_errors():
    x = _rand((3, 4), torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        mse.mse_forward(x, x[:, :3], "mean", compute_grad=False)
    with pytest.raises(TypeError, match="dtype"):
        mse.mse_forward(x, x.double(), "mean", compute_grad=False)
    with pytest.raises(ValueError, match="reduction"):
        mse.mse_forward(x, x, "max", compute_grad=False)
    with pytest.raises(ValueError, match="1-element"):
        mse.mse_backward(x, x, x, "sum")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_real_sizes(dtype, reduction):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = _rand((4099, 1031), dtype)
    t = _rand((1031,), dtype).expand(4099, 1031)
    loss, grad = mse.mse_forward(x, t, reduction, compute_grad=True)
    _check_loss(loss, x, t, reduction)
    if grad is not None:
        _check_elementwise(grad, _want_grad(x, t, reduction), dtype)
    again, _ = mse.mse_forward(x, t, reduction, compute_grad=True)
    assert torch.equal(loss, again)
    go = torch.tensor(0.5, dtype=dtype, device=DEVICE) if reduction != "none" else x.t().clone().t()
    _check_elementwise(mse.mse_backward(go, x, t, reduction),
                       _want_grad(x, t, reduction) * go.double(), dtype)  # fmt: skip


@pytest.mark.cuda
def test_cuda_large_n_precision():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.full((1 << 25,), 1.1, dtype=torch.float32, device=DEVICE)
    t = torch.zeros_like(x)
    for reduction in ("mean", "sum"):
        loss, _ = mse.mse_forward(x, t, reduction, compute_grad=False)
        _check_loss(loss, x, t, reduction)
