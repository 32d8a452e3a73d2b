"""manualbp's MSE, held to native and to float64 math: the op against F.mse_loss and native
autograd (values, gradients, warnings, dtypes), gradcheck and gradgradcheck in float64, and the
Triton launchers of ``triton_kernels.mse`` against float64 torch math.

The op's cases (reduction, target layout) are ``manualbp check``'s:
:data:`manualbp.testing.MSE_CASES`. The kernels run under Triton's CPU interpreter
(``TRITON_INTERPRET=1``, which ``tests/conftest.py`` sets when there is no GPU) or on CUDA. Their
sizes are small and odd so that the last block is partial; the interpreter's block sizes are
small (see ``mse.CONFIGS``), so these sizes still span several programs (full blocks on the
unmasked path, a masked tail) and several partials. Layouts cover contiguous, unaligned (a view
at storage offset 1), strided, transposed, broadcast (stride 0) and > MAX_DIMS views.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from manualbp.kernels import _host, mse
from torch import Tensor
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import manualbp
from manualbp import functional
from manualbp.testing import parity
from tests.helpers import DEFAULT_TOLERANCES, MSE_CASES, REDUCTIONS, clone_leaf, leaf

needs_kernels = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available(),
    reason="Triton kernels need CUDA or the CPU interpreter (TRITON_INTERPRET=1 before "
    "importing triton)",
)


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


# --------------------------------------------------------------------------------------------
# gradcheck and gradgradcheck (float64)
# --------------------------------------------------------------------------------------------
SMALL_ROWS, SMALL_COLS = 4, 3  # the input of the gradcheck cases


@pytest.mark.parametrize("target_grad", [False, True], ids=["target_fixed", "target_grad"])
@pytest.mark.parametrize("case", MSE_CASES, ids=lambda case: case.variant)
def test_gradcheck_and_gradgradcheck(case, target_grad):
    # The targets: same shape, a row (cols,) and a column (rows, 1) broadcast, and a (1, cols)
    # leaf that the loss sees expanded (a stride-0 view).
    x = torch.randn(SMALL_ROWS, SMALL_COLS, dtype=torch.float64, requires_grad=True)
    t = torch.randn(case.target_shape(SMALL_ROWS, SMALL_COLS), dtype=torch.float64)
    t.requires_grad_(target_grad)
    inputs = (x, t) if target_grad else (x,)

    def f(x, t=t):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the broadcast warning
            return functional.mse_loss(
                x, case.target_seen(t, SMALL_ROWS, SMALL_COLS), case.reduction
            )

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


# --------------------------------------------------------------------------------------------
# The kernels against float64 math
# --------------------------------------------------------------------------------------------
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _acc_eps(dtype: torch.dtype) -> float:
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _rand(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    return torch.randn(shape, dtype=torch.float64, device=DEVICE).to(dtype)


def _at_offset(shape: tuple[int, ...], dtype: torch.dtype, offset: int = 1) -> Tensor:
    """A contiguous view whose data starts ``offset`` elements into its storage: not 16-byte
    aligned for any dtype when ``offset`` is 1."""
    n = math.prod(shape)
    return _rand((n + offset,), dtype)[offset:].view(shape)


# Each builder returns (input, target) of the same shape, with the layout its name says.
def _contiguous(dtype):
    return _rand((47, 31), dtype), _rand((47, 31), dtype)


def _full_blocks(dtype):  # 256 = a whole number of the interpreter's blocks: no masked block
    return _rand((4, 64), dtype), _rand((4, 64), dtype)


def _unaligned(dtype):  # both at storage offset 1
    return _at_offset((47, 31), dtype), _at_offset((47, 31), dtype)


def _unaligned_input(dtype):  # input at offset 1, target aligned
    return _at_offset((1000,), dtype), _rand((1000,), dtype)


def _row_broadcast(dtype):  # target stride (0, 1)
    return _rand((47, 31), dtype), _rand((31,), dtype).expand(47, 31)


def _col_broadcast(dtype):  # target stride (1, 0)
    return _rand((47, 31), dtype), _rand((47, 1), dtype).expand(47, 31)


def _scalar_broadcast(dtype):  # target all stride 0
    return _rand((5, 7, 3), dtype), _rand((), dtype).expand(5, 7, 3)


def _transposed(dtype):
    return _rand((31, 47), dtype).t(), _rand((47, 31), dtype)


def _sliced(dtype):  # input coalesces to one dim of stride 2
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
    _contiguous, _full_blocks, _unaligned, _unaligned_input, _row_broadcast, _col_broadcast,
    _scalar_broadcast, _transposed, _sliced, _both_expanded, _permuted_4d, _permuted_5d, _one,
    _zero_dim, _long_1d,
]  # fmt: skip
_ID = dict(ids=lambda f: f.__name__.strip("_"))


def _sum_depth(n: int, dtype: torch.dtype) -> int:
    """Most roundings on the way from one squared term to the reduced loss: the per-lane
    sequential sum over a segment's blocks, a tree over the block's lanes, the masked block's
    sum added, a tree over the partials (for the larger of the layouts' plans)."""
    depth = 0
    for ndim in (1, 4):
        plan = mse.forward_plan(n, ndim, dtype, torch.device(DEVICE))
        depth = max(depth, plan.segment_blocks + math.ceil(math.log2(plan.block)) + 1
                    + math.ceil(math.log2(plan.config["PARTIALS"])))  # fmt: skip
    return depth


def _want_loss(x: Tensor, t: Tensor, reduction: str) -> Tensor:
    return F.mse_loss(x.double(), t.double(), reduction=reduction)


def _check_loss(got: Tensor, x: Tensor, t: Tensor, reduction: str) -> None:
    """Loss within one rounding to the dtype plus the reduction's accumulation error (the
    squared terms are nonnegative, so a relative bound holds)."""
    want = _want_loss(x, t, reduction)
    assert got.dtype == x.dtype and got.shape == want.shape
    if reduction == "none":
        assert got.is_contiguous()
    # A whole ulp (eps), not the half a rounding to nearest costs: in bf16 under Triton's CPU
    # interpreter the kernels' stores truncate fp32 -> bf16 where torch rounds to nearest (the
    # GPU test test_cuda_bf16_rounds_to_nearest_as_native checks the rounding itself).
    eps = torch.finfo(x.dtype).eps
    # (x - t)**2 in the accumulation dtype: 3 roundings per term, then the sum's; "mean" one more.
    acc_err = (3 + _sum_depth(max(x.numel(), 1), x.dtype) + 1) * _acc_eps(x.dtype) * want.abs()
    allowed = eps * want.abs() + acc_err + torch.finfo(x.dtype).tiny
    err = (got.double() - want).abs()
    assert bool((err <= allowed).all()), f"max err {err.max().item()}, allowed {allowed.max()}"


def _want_grad(x: Tensor, t: Tensor, reduction: str) -> Tensor:
    d = x.double() - t.double()
    return 2 * d / x.numel() if reduction == "mean" else 2 * d


def _check_elementwise(got: Tensor, want: Tensor, dtype: torch.dtype, roundings: int = 1) -> None:
    """``roundings`` roundings to ``dtype``, each after a few ops in the accumulation dtype;
    each allowed a whole ulp, not half: in bf16 under Triton's CPU interpreter the kernels'
    stores truncate fp32 -> bf16 where torch rounds to nearest (checked on a GPU by
    test_cuda_bf16_rounds_to_nearest_as_native)."""
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    allowed = roundings * (torch.finfo(dtype).eps + 4 * _acc_eps(dtype)) * want.abs()
    allowed = allowed + torch.finfo(dtype).tiny
    err = (got.double() - want).abs()
    assert bool((err <= allowed).all()), f"max err {err.max().item()}"


def _counters_are_zero() -> bool:
    return all(int(c.item()) == 0 for c in mse._counters.values())


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS, **_ID)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@needs_kernels
def test_forward(layout, dtype, reduction):
    x, t = layout(dtype)
    loss, grad = mse.mse_forward(x, t, reduction, compute_grad=True)
    _check_loss(loss, x, t, reduction)
    if reduction == "none":
        assert grad is None
    else:
        _check_elementwise(grad, _want_grad(x, t, reduction), dtype)
    assert _counters_are_zero()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@needs_kernels
def test_forward_without_grad(reduction):
    x, t = _row_broadcast(torch.float32)
    loss, grad = mse.mse_forward(x, t, reduction, compute_grad=False)
    assert grad is None
    _check_loss(loss, x, t, reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@needs_kernels
def test_forward_empty(dtype):
    x = _rand((0, 31), dtype)
    t = _rand((31,), dtype).expand(0, 31)
    for reduction in REDUCTIONS:
        loss, grad = mse.mse_forward(x, t, reduction, compute_grad=True)
        want = F.mse_loss(x, t, reduction=reduction)
        assert loss.dtype == dtype and loss.shape == want.shape
        torch.testing.assert_close(loss, want, equal_nan=True)
        if reduction != "none":
            assert grad is not None and grad.shape == x.shape and grad.dtype == dtype


@pytest.mark.parametrize("layout", [_contiguous, _unaligned, _row_broadcast, _long_1d], **_ID)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@needs_kernels
def test_forward_is_deterministic(layout, reduction):
    x, t = layout(torch.float32)
    a, ga = mse.mse_forward(x, t, reduction, compute_grad=True)
    b, gb = mse.mse_forward(x, t, reduction, compute_grad=True)
    assert torch.equal(a, b)
    assert (ga is None and gb is None) or torch.equal(ga, gb)
    assert _counters_are_zero()


@needs_kernels
def test_forward_many_partials():
    """17408 elements: 272 of the interpreter's blocks, cut into 8 segments of 34 blocks (a
    per-lane sequential sum of 34 terms, then trees); a constant summand makes a long
    sequential fp32 sum drift."""
    x = torch.full((17408,), 1.1, dtype=torch.float32, device=DEVICE)
    t = torch.zeros_like(x)
    for reduction in ("mean", "sum"):
        loss, _ = mse.mse_forward(x, t, reduction, compute_grad=False)
        _check_loss(loss, x, t, reduction)


# --------------------------------------------------------------------------------------------
# The persistent grids: bounded, and the loss independent of how the work is split
# --------------------------------------------------------------------------------------------


def _fwd_launch(launches: list) -> _host.Launch:
    (fwd,) = [entry for entry in launches if entry.name == "_mse_fwd_kernel"]
    return fwd


# (layout name, shape, builder): contiguous sizes around the interpreter's block of 64 and its
# 8 partials (a partial block, whole blocks, one-block and multi-block segments), and strided
# layouts of 2 and 4 merged dims.
_SPLIT_CASES = {
    "n1": lambda dtype: (_rand((1,), dtype), _rand((1,), dtype)),
    "n63": lambda dtype: (_rand((63,), dtype), _rand((63,), dtype)),
    "n65": lambda dtype: (_rand((65,), dtype), _rand((65,), dtype)),
    "n512": lambda dtype: (_rand((512,), dtype), _rand((512,), dtype)),  # 8 blocks, 8 segments
    "n1537": lambda dtype: (_rand((1537,), dtype), _rand((1537,), dtype)),  # 25 blocks: 4 a seg
    "transposed": lambda dtype: (_rand((67, 61), dtype).t(), _rand((61, 67), dtype)),
    "row_broadcast": _row_broadcast,
    "permuted_4d": lambda dtype: (
        _rand((3, 5, 7, 11), dtype).permute(3, 1, 0, 2),
        _rand((11, 5, 3, 7), dtype),
    ),
}


@pytest.mark.parametrize("case", list(_SPLIT_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@needs_kernels
def test_forward_is_independent_of_the_grid(monkeypatch, case, dtype):
    """Loss and gradient are bitwise equal whatever the number of programs the grid-stride
    loops share the segments among (the SM count the interpreter stands in for: 1 to 64), the
    grid never has more programs than PROGRAMS_PER_SM per SM nor more partials than PARTIALS,
    and the values match float64 math and ``F.mse_loss``."""
    x, t = _SPLIT_CASES[case](dtype)
    seen: dict[str, tuple[Tensor, Tensor | None]] = {}
    for sms in (1, 2, 3, 5, 64):
        monkeypatch.setattr(mse, "INTERPRETER_SMS", sms)
        for reduction in REDUCTIONS:
            with _host.observe() as launches:
                loss, grad = mse.mse_forward(x, t, reduction, compute_grad=True)
            fwd = _fwd_launch(launches)
            cfg = mse.launch_config("fwd", fwd.kwargs["NDIM"], dtype=dtype)
            block = cfg["BLOCK"]
            units = math.ceil(x.numel() / block)
            if reduction != "none":
                partials = fwd.args[4]
                assert partials.numel() <= cfg["PARTIALS"]
                units = partials.numel()
            assert fwd.grid == (min(units, sms * cfg["PROGRAMS_PER_SM"]),)
            if reduction not in seen:
                _check_loss(loss, x, t, reduction)
                # Both within their accumulation error of the float64 value; torch rounds
                # (x - t) and its square to the dtype (bf16 on the CPU), the kernel once (and
                # under the CPU interpreter truncates its bf16 result where torch rounds to
                # nearest: a whole ulp of the 3 eps).
                depth = _sum_depth(x.numel(), dtype)
                rtol = 3 * torch.finfo(dtype).eps + 2 * depth * _acc_eps(dtype)
                want = F.mse_loss(x, t, reduction=reduction).double()
                torch.testing.assert_close(loss.double(), want, rtol=rtol,
                                           atol=torch.finfo(dtype).tiny)  # fmt: skip
                if grad is not None:
                    _check_elementwise(grad, _want_grad(x, t, reduction), dtype)
                seen[reduction] = (loss, grad)
                continue
            want_loss, want_grad = seen[reduction]
            assert torch.equal(loss, want_loss), (sms, reduction)
            assert (grad is None and want_grad is None) or torch.equal(grad, want_grad)
    assert _counters_are_zero()


@pytest.mark.parametrize(
    "n, dtype, segment_blocks, segments",
    [(1 << 26, torch.float32, 16, 2048), (1 << 26, torch.float16, 16, 2048),
     (1 << 26, torch.float64, 32, 2048), (1 << 20, torch.float32, 1, 512),
     (3 * 4096 + 5, torch.float32, 1, 7)],
)  # fmt: skip
@needs_kernels
def test_forward_plan_on_a_132_sm_gpu(n, dtype, segment_blocks, segments):
    """What the launcher would launch on sm_90 with 132 SMs (recorded, nothing run, ``meta``
    tensors): 4 programs per SM at most, at most 2048 partials; the kernel's only per-element
    traffic is input and target read and the gradient written (12 bytes per fp32 element), the
    partials add at most 2048 accumulator values."""
    x = torch.empty(n, dtype=dtype, device="meta")
    with _host.simulate(90, 132), _host.record() as launches:
        loss, grad = mse.mse_forward(x, x, "mean", compute_grad=True)
    (fwd,) = launches
    x_arg, t_arg, out, grad_arg, partials, counter = fwd.args[:6]
    assert fwd.grid == (min(segments, 4 * 132),)
    assert fwd.args[7:9] == (segment_blocks, segments)  # segment_blocks, n_segments
    assert partials.numel() == segments and partials.dtype == _host.acc_dtype(dtype)
    assert x_arg is x and t_arg is x and grad_arg is grad and out is loss
    assert counter.numel() == 1 and counter.dtype == torch.int32
    element_bytes = 3 * n * x.element_size()  # input, target read; the gradient written
    # The partials written once and read once, the loss written, the counter's ticket and reset.
    other_bytes = 2 * partials.numel() * partials.element_size() + loss.element_size() + 8
    assert other_bytes <= 2 * 2048 * 8 + 8 + 8
    if n == 1 << 26 and dtype == torch.float32:
        assert element_bytes == 12 * n and other_bytes < 1e-4 * element_bytes


class _Counting:
    """Wraps a Triton kernel, counting its launches."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]


@needs_kernels
def test_one_launch_each(monkeypatch):
    launches: list = []
    for name in ("_mse_fwd_kernel", "_mse_bwd_kernel", "_grad_scale_kernel"):
        monkeypatch.setattr(mse, name, _Counting(getattr(mse, name), launches))
    x, t = _long_1d(torch.float32)
    for reduction in REDUCTIONS:
        launches.clear()
        _, grad = mse.mse_forward(x, t, reduction, compute_grad=True)
        assert len(launches) == 1, reduction
        go = torch.tensor(0.5, device=DEVICE) if reduction != "none" else torch.ones_like(x)
        launches.clear()
        mse.mse_backward(go, x, t, reduction)
        assert len(launches) == 1
        if grad is not None:
            launches.clear()
            mse.mse_grad_scale_(grad, go)
            assert len(launches) == 1


# --------------------------------------------------------------------------------------------
# Backward (recomputing) and the in-place scale of the forward's gradient
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS, **_ID)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@needs_kernels
def test_backward(layout, dtype, reduction):
    x, t = layout(dtype)
    if reduction == "none":
        # A strided upstream gradient: reversed-dim memory order.
        go = _rand(tuple(reversed(x.shape)), dtype).permute(tuple(reversed(range(x.dim()))))
    else:
        go = torch.tensor(0.37, dtype=dtype, device=DEVICE)
    got = mse.mse_backward(go, x, t, reduction)
    _check_elementwise(got, _want_grad(x, t, reduction) * go.double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@needs_kernels
def test_backward_contiguous_grad_output(dtype):
    """``"none"`` with every operand contiguous: the vector path, grad_output included."""
    x, t = _long_1d(dtype)
    go = _rand((1000,), dtype)
    got = mse.mse_backward(go, x, t, "none")
    _check_elementwise(got, _want_grad(x, t, "none") * go.double(), dtype)


@needs_kernels
def test_backward_broadcast_grad_output():
    x, t = _transposed(torch.float32)
    go = _rand((31,), torch.float32).expand(47, 31)
    got = mse.mse_backward(go, x, t, "none")
    _check_elementwise(got, _want_grad(x, t, "none") * go.double(), torch.float32)


@needs_kernels
def test_backward_empty():
    x = _rand((0, 3), torch.float32)
    assert mse.mse_backward(torch.tensor(1.0, device=DEVICE), x, x, "mean").shape == (0, 3)


@pytest.mark.parametrize("layout", [_contiguous, _unaligned, _row_broadcast], **_ID)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("g", [1.0, 0.37])
@needs_kernels
def test_forward_grad_then_scale(layout, dtype, reduction, g):
    """The Triton backend's backward for a scalar loss: the forward's gradient for g = 1,
    scaled in place by the real g, against float64 autograd through ``F.mse_loss``."""
    x, t = layout(dtype)
    _, grad = mse.mse_forward(x, t, reduction, compute_grad=True)
    before = grad.clone()
    go = torch.tensor(g, dtype=dtype, device=DEVICE)
    assert mse.mse_grad_scale_(grad, go) is grad
    if g == 1.0:
        assert torch.equal(grad, before)
    xd = x.double().requires_grad_()
    (want,) = torch.autograd.grad(F.mse_loss(xd, t.double(), reduction=reduction), xd,
                                  go.double())  # fmt: skip
    _check_elementwise(grad, want, dtype, roundings=1 if g == 1.0 else 2)


_SCALE_VIEWS = {
    "contiguous": lambda b: b,
    "long": lambda b: b.view(-1),
    "transposed": lambda b: b.t(),
    "sliced": lambda b: b[:, 1::3],
    "unaligned": lambda b: b.view(-1)[1:],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("view", list(_SCALE_VIEWS))
@pytest.mark.parametrize("g", [1.0, -2.5])
@needs_kernels
def test_grad_scale_(dtype, view, g):
    base = _rand((47, 31), dtype)
    grad = _SCALE_VIEWS[view](base)
    before = grad.double().clone()
    base_before = base.clone()
    go = torch.tensor(g, dtype=dtype, device=DEVICE)
    out = mse.mse_grad_scale_(grad, go)
    assert out is grad
    if g == 1.0:
        assert torch.equal(base, base_before)
        return
    # -2.5 * v is exact in the accumulation dtype: one rounding to ``dtype`` at most.
    err = (grad.double() - before * g).abs()
    assert bool((err <= torch.finfo(dtype).eps * before.abs() * abs(g)).all())
    if view == "sliced":  # elements outside the view stay untouched
        keep = torch.ones(31, dtype=torch.bool, device=DEVICE)
        keep[1::3] = False
        assert torch.equal(base[:, keep], base_before[:, keep])
    if view == "unaligned":
        assert torch.equal(base.view(-1)[:1], base_before.view(-1)[:1])


@pytest.mark.parametrize(
    "grad_dtype, go_dtype, go_shape",
    [(torch.float16, torch.float32, (1, 1)), (torch.float32, torch.float64, (1,)),
     (torch.float64, torch.float32, ()), (torch.bfloat16, torch.bfloat16, (1, 1, 1))],
)  # fmt: skip
@needs_kernels
def test_grad_scale_grad_output_dtype_and_shape(grad_dtype, go_dtype, go_shape):
    """grad_output is converted to the accumulation dtype, then one rounding to grad's."""
    grad = _rand((1000,), grad_dtype)
    before = grad.double().clone()
    go = torch.full(go_shape, 0.3, dtype=go_dtype, device=DEVICE)
    mse.mse_grad_scale_(grad, go)
    acc = torch.float64 if grad_dtype == torch.float64 else torch.float32
    want = before * go.to(acc).double().reshape(())
    err = (grad.double() - want).abs()
    assert bool((err <= torch.finfo(grad_dtype).eps * want.abs()).all())


@needs_kernels
def test_grad_scale_grid_on_a_132_sm_gpu():
    """At most one program per SM (fewer for a small gradient), whatever ``grad_output``."""
    for n, want in ((1 << 26, 132), (5 * 8192 + 1, 6), (1, 1)):
        grad = torch.empty(n, device="meta")
        with _host.simulate(90, 132), _host.record() as launches:
            mse.mse_grad_scale_(grad, torch.ones((), device="meta"))
        (scale,) = launches
        assert scale.grid == (want,)


@pytest.mark.parametrize("view", list(_SCALE_VIEWS))
@needs_kernels
def test_grad_scale_is_independent_of_the_grid(monkeypatch, view):
    """The in-place scale over 1 to 7 programs (the interpreter's stand-in SM count) gives the
    same bits, and the grid never has more programs than SMs."""
    base = _rand((47, 31), torch.float32)
    results = []
    for sms in (1, 2, 7):
        monkeypatch.setattr(mse, "INTERPRETER_SMS", sms)
        grad = _SCALE_VIEWS[view](base.clone())
        with _host.observe() as launches:
            mse.mse_grad_scale_(grad, torch.tensor(-2.5, device=DEVICE))
        (scale,) = launches
        n_blocks = math.ceil(grad.numel() / mse.launch_config("scale")["BLOCK"])
        assert scale.grid == (min(sms, n_blocks),)
        results.append(grad)
    want = _SCALE_VIEWS[view](base) * -2.5  # one fp32 multiplication, rounded once, as the kernel
    for got in results:
        assert torch.equal(got, want)


@needs_kernels
def test_grad_scale_empty_and_errors():
    empty = torch.empty(0, 3, device=DEVICE)
    assert mse.mse_grad_scale_(empty, torch.tensor(2.0, device=DEVICE)) is empty
    g = _rand((3,), torch.float32).expand(4, 3)
    with pytest.raises(ValueError, match="stride-0"):
        mse.mse_grad_scale_(g, torch.tensor(2.0, device=DEVICE))
    with pytest.raises(ValueError, match="1-element"):
        mse.mse_grad_scale_(_rand((3,), torch.float32), torch.ones(2, device=DEVICE))
    with pytest.raises(TypeError, match="floating grad"):
        mse.mse_grad_scale_(torch.ones(3, dtype=torch.int32, device=DEVICE),
                            torch.tensor(2.0, device=DEVICE))  # fmt: skip
    with pytest.raises(TypeError, match="floating grad_output"):
        mse.mse_grad_scale_(_rand((3,), torch.float32),
                            torch.tensor(2, device=DEVICE))  # fmt: skip


@needs_kernels
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


# --------------------------------------------------------------------------------------------
# CUDA only: real block sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", ["contiguous", "unaligned", "broadcast"])
@needs_kernels
def test_cuda_real_sizes(dtype, reduction, layout):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = _rand((4099, 1031), dtype) if layout != "unaligned" else _at_offset((4099, 1031), dtype)
    if layout == "broadcast":
        t = _rand((1031,), dtype).expand(4099, 1031)
    else:
        t = _rand((4099, 1031), dtype)
    loss, grad = mse.mse_forward(x, t, reduction, compute_grad=True)
    _check_loss(loss, x, t, reduction)
    if grad is not None:
        _check_elementwise(grad, _want_grad(x, t, reduction), dtype)
    again, grad_again = mse.mse_forward(x, t, reduction, compute_grad=True)
    assert torch.equal(loss, again)
    go = torch.tensor(0.5, dtype=dtype, device=DEVICE) if reduction != "none" else x.t().clone().t()
    _check_elementwise(mse.mse_backward(go, x, t, reduction),
                       _want_grad(x, t, reduction) * go.double(), dtype)  # fmt: skip
    if grad_again is not None:
        mse.mse_grad_scale_(grad_again, go)
        _check_elementwise(grad_again, _want_grad(x, t, reduction) * go.double(), dtype, 2)
    assert _counters_are_zero()


@pytest.mark.cuda
@needs_kernels
def test_cuda_large_n_precision():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.full((1 << 25,), 1.1, dtype=torch.float32, device=DEVICE)
    t = torch.zeros_like(x)
    for reduction in ("mean", "sum"):
        loss, _ = mse.mse_forward(x, t, reduction, compute_grad=False)
        _check_loss(loss, x, t, reduction)


@pytest.mark.cuda
@needs_kernels
def test_cuda_graph_capture():
    """Under capture each call takes a fresh counter; replays give the eager result."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x, t = _rand((1000, 37), torch.float32), _rand((1000, 37), torch.float32)
    want, want_grad = mse.mse_forward(x, t, "mean", compute_grad=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        mse.mse_forward(x, t, "mean", compute_grad=True)  # warm-up: compile
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grad = mse.mse_forward(x, t, "mean", compute_grad=True)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(loss, want) and torch.equal(grad, want_grad)
    assert _counters_are_zero()


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "broadcast"])
@needs_kernels
def test_cuda_loss_is_independent_of_the_grid(monkeypatch, layout):
    """The real configs over grids for 1 to 1000 SMs: the same bits (the segments depend on
    ``N`` alone)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = _rand((4099, 1031), torch.float32)
    if layout == "broadcast":
        t = _rand((1031,), torch.float32).expand(4099, 1031)
    else:
        t = _rand((4099, 1031), torch.float32)
    want, want_grad = mse.mse_forward(x, t, "mean", compute_grad=True)
    arch = mse.target(x.device)[0]
    for sms in (1, 7, 133, 1000):
        monkeypatch.setattr(mse, "target", lambda device, sms=sms: (arch, sms))
        with _host.observe() as launches:
            loss, grad = mse.mse_forward(x, t, "mean", compute_grad=True)
        assert _fwd_launch(launches).grid[0] <= sms * 4
        assert torch.equal(loss, want) and torch.equal(grad, want_grad)
    assert _counters_are_zero()


def bf16_grid(*shape: int, device: str = DEVICE) -> Tensor:
    """bf16 values +-m/128, m in [128, 256): 8 significant bits. Differences of two are
    multiples of 2**-7 below 4, their squares multiples of 2**-14 below 16, and sums of up to
    32 squares (below 2**9: 23 bits) are exact in fp32: what is left is one rounding to bf16."""
    m = torch.randint(128, 256, shape, device=device)
    sign = torch.randint(0, 2, shape, device=device) * 2 - 1
    return (sign * m / 128).to(torch.bfloat16)


def bf16_rounding_case(reduction: str, device: str) -> None:
    """16 losses of 32 elements each (one bf16 value rounds either way by chance; 16 do not):
    the loss is the exact value rounded once to nearest. Native's loss is within two ulps of it
    (aten rounds x - t, its square and the sum to bf16, each in turn); the gradient is bitwise
    native's (aten's norm * (x - t) * g with g = 1 and a power-of-two norm: x - t rounded once)."""
    x, t = bf16_grid(16, 32, device=device).requires_grad_(), bf16_grid(16, 32, device=device)
    with manualbp.use_backend("triton"):
        losses = [functional.mse_loss(x[i], t[i], reduction) for i in range(16)]
        torch.autograd.backward(losses, [torch.ones_like(v) for v in losses])
    xn = x.detach().clone().requires_grad_()
    natives = [F.mse_loss(xn[i], t[i], reduction=reduction) for i in range(16)]
    torch.autograd.backward(natives, [torch.ones_like(v) for v in natives])
    ulp = torch.finfo(torch.bfloat16).eps
    for i, (ours, native) in enumerate(zip(losses, natives, strict=True)):
        want = F.mse_loss(x[i].detach().double(), t[i].double(), reduction=reduction)
        assert ours.dtype == torch.bfloat16
        assert torch.equal(ours, want.to(torch.bfloat16)), (i, ours, want)
        assert ((ours.double() - native.double()).abs() <= 2 * ulp * want.abs()).all(), i
    wrong = (x.grad != xn.grad).sum().item()
    assert wrong == 0, f"{wrong} of {x.numel()} gradient elements differ from native"


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", REDUCTIONS)
@needs_kernels
def test_cuda_bf16_rounds_to_nearest_as_native(reduction):
    """Triton's CPU interpreter truncates fp32 -> bf16 where torch rounds to nearest (the MSE
    kernels' bf16 stores do so there), so bf16 rounding is checked on a GPU only."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    bf16_rounding_case(reduction, "cuda")
