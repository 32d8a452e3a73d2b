"""The deterministic split-K GEMM of dW (``triton_kernels._splitk``) and the layout-aware
autotuning key of the plain GEMM (``triton_kernels._matmul``), against float64 math.

Under the CPU interpreter the SM count is a fixed stand-in (4) and the GEMM tile 32 x 32, so a
dW of a few dozen rows and columns has fewer tiles than twice that and the heuristic splits;
``splits=`` forces a split on or off. Sizes are odd (no tile multiple).

Tolerance: ``manualbp.testing.assert_close_through_sum`` against the float64 product rounded
to the dtype: the dtype's ``assert_close`` defaults plus 4 eps per unit of ``|A| |B|`` (the
sum over absolute terms), the rounding any summation order may add.
"""

from __future__ import annotations

import os

import pytest
import torch
from manualbp.kernels import _splitk
from manualbp.kernels._matmul import operand_layout, tuning_key
from manualbp.kernels._splitk import plan_splits, splitk_matmul
from manualbp.kernels.linear import backward as linear_backward

from manualbp.testing import assert_close_through_sum
from tests.helpers import make_layout

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_kernels = pytest.mark.skipif(
    not _INTERPRET and not torch.cuda.is_available(),
    reason="Triton kernels need CUDA or the CPU interpreter (TRITON_INTERPRET=1)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# dW = dZ^T X: (N, M) @ (M, K), reducing over the M = 67 rows.
N_, M_, K_ = 33, 67, 45


def _operands(layout: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dZ^T, X)`` of a dW GEMM; ``layout`` is dZ's and X's (dZ^T is its transposed view)."""
    kw = dict(dtype=torch.float64, device=DEVICE)
    dz = make_layout((M_, N_), layout, **kw).to(dtype)
    x = make_layout((M_, K_), layout, **kw).to(dtype)
    if layout == "noncontig":  # .to() of a strided view is contiguous: re-make the views
        dz = torch.randn(M_, 2 * N_, **kw).to(dtype)[:, ::2]
        x = torch.randn(M_, 2 * K_, **kw).to(dtype)[:, ::2]
    return dz.t(), x


def _check(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    assert c.shape == (a.shape[0], b.shape[1]) and c.dtype == a.dtype and c.is_contiguous()
    want = (a.double() @ b.double()).to(a.dtype)
    abs_sum = a.double().abs() @ b.double().abs()
    assert_close_through_sum(c, want, abs_sum)


# --------------------------------------------------------------------------------------------
# The split GEMM
# --------------------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize(
    "dtype, layout",
    [
        (torch.float32, "contiguous"),
        (torch.float32, "transposed"),
        (torch.float16, "noncontig"),
        (torch.float16, "transposed"),
        (torch.float64, "noncontig"),
    ],
    ids=str,
)
def test_split_and_unsplit_match_float64(dtype, layout):
    a, b = _operands(layout, dtype)
    split = splitk_matmul(a, b, splits=3)
    _check(split, a, b)
    _check(splitk_matmul(a, b, splits=1), a, b)
    # Deterministic: the same bits on a second run.
    assert torch.equal(splitk_matmul(a, b, splits=3), split)


@needs_kernels
def test_heuristic_splits_small_outputs_and_is_deterministic(monkeypatch):
    a, b = _operands("contiguous", torch.float32)
    cfg = _splitk.splitk_config(a.device, a.dtype, "ieee")
    plan = _splitk._plan(a, b, cfg, None)
    # 2 x 2 tiles of 32 x 32 < 2 * 4 stand-in SMs: split into >= 2 slices of >= 32 rows.
    assert plan.splits >= 2 and (plan.splits - 1) * plan.chunk < M_
    partial = _splitk.splitk_partial_kernel
    calls = []

    class Counted:
        def __getitem__(self, grid):
            calls.append(grid)
            return partial[grid]

    monkeypatch.setattr(_splitk, "splitk_partial_kernel", Counted())
    first = splitk_matmul(a, b)
    assert calls == [(4, plan.splits)]
    _check(first, a, b)
    assert torch.equal(splitk_matmul(a, b), first)


@needs_kernels
def test_linear_backward_dw_with_and_without_split():
    """dW through the Linear backward (gelu: dZ materialised, then dZ^T stride-swapped),
    forced split on and off, against float64 math on the same dZ; dX, db untouched."""
    dtype = torch.float16
    kw = dict(dtype=torch.float64, device=DEVICE)
    g, z = torch.randn(M_, N_, **kw).to(dtype), torch.randn(M_, N_, **kw).to(dtype)
    x, w = torch.randn(M_, K_, **kw).to(dtype), torch.randn(N_, K_, **kw).to(dtype)
    on = linear_backward(g, x, w, z, "gelu", 0.01, needs_grad=(True, True, True), dw_splits=4)
    off = linear_backward(g, x, w, z, "gelu", 0.01, needs_grad=(False, True, True), dw_splits=1)
    assert torch.equal(on[2], off[2])
    dz = torch.ops.aten.gelu_backward(g.double(), z.double()).to(dtype)  # as the kernel stores it
    for dw in (on[1], off[1]):
        _check(dw, dz.t(), x)
    _check(on[0], dz, w)
    again = linear_backward(g, x, w, z, "gelu", 0.01, needs_grad=(False, True, False),
                            dw_splits=4)  # fmt: skip
    assert torch.equal(again[1], on[1])


@needs_kernels
@pytest.mark.parametrize("shape", [(0, 5, 7), (5, 0, 7), (5, 7, 0), (1, 40, 1)], ids=str)
def test_empty_and_degenerate_shapes(shape):
    n, m, k = shape  # (n, m) @ (m, k)
    a = torch.randn(m, n, device=DEVICE).t()
    b = torch.randn(m, k, device=DEVICE)
    c = splitk_matmul(a, b, splits=4)
    assert c.shape == (n, k)
    torch.testing.assert_close(c.double(), a.double() @ b.double(), rtol=1.3e-6, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The split heuristic (host arithmetic)
# --------------------------------------------------------------------------------------------
def test_plan_splits_heuristic():
    gpu = dict(min_chunk=1024, align=256)
    # K = N = 1024 (64 tiles of 128 x 128) on 132 SMs, M = 65536 rows: about two waves.
    assert tuple(plan_splits(64, 65536, 132, **gpu)) == (5, 13312)
    # Enough tiles already: no split. Too short a reduction: no split.
    assert plan_splits(264, 65536, 132, **gpu).splits == 1
    assert plan_splits(64, 1500, 132, **gpu).splits == 1
    # A single tile: capped at MAX_SPLITS.
    assert plan_splits(1, 10**6, 132, **gpu).splits == _splitk.MAX_SPLITS
    # Forced: as asked, rounded to whole aligned slices; 1 never splits.
    assert plan_splits(10**4, 97, 4, min_chunk=32, align=16, requested=3).splits == 3
    assert plan_splits(1, 10**6, 132, **gpu, requested=1).splits == 1
    for tiles in (1, 3, 17, 64):
        for k in (257, 1000, 4097, 65537):
            s, chunk = plan_splits(tiles, k, 132, min_chunk=16, align=16)
            assert chunk % 16 == 0 or s == 1
            assert (s - 1) * chunk < k <= s * chunk  # every slice holds at least one row


# --------------------------------------------------------------------------------------------
# The layout-aware autotuning key
# --------------------------------------------------------------------------------------------
def test_dx_and_dw_get_distinct_tuning_keys():
    """dX = dZ W (A row-major) and dW = dZ^T X (A an M-major view) of a square layer share
    every part of the key but the layout: they tune apart."""
    m = n = k = 96
    dz, w, x = torch.randn(m, n), torch.randn(n, k), torch.randn(m, k)
    key_dx, key_dw = tuning_key(dz, w), tuning_key(dz.t(), x)
    assert key_dx.split("|")[:4] == key_dw.split("|")[:4]
    assert key_dx != key_dw
    assert operand_layout(dz, w) == "A:K,B:N"
    assert operand_layout(dz.t(), x) == "A:M,B:N"
    assert operand_layout(dz, x.t().contiguous().t()) == "A:K,B:K"
    assert operand_layout(dz[:, ::2], w[::2]).startswith("A:S")


def test_splitk_and_chain_configs_are_audited():
    """The audit compiles the split-K kernels in the config each architecture and dtype class
    ships (dW's layout: A = dZ^T M-major), and the cross-layer chain GEMM in every config it is
    tuned over, with erf- and tanh-GELU (the heaviest derivatives) in its epilogue."""
    from manualbp.kernels.linear import chain_configs

    from tests.kernels._audit import audit_jobs, config_shape, shape

    jobs = audit_jobs()
    variants = [(torch.float16, "ieee", "fp16"), (torch.bfloat16, "ieee", "bf16"),
                (torch.float32, "ieee", "fp32"), (torch.float32, "tf32", "tf32"),
                (torch.float64, "ieee", "fp64")]  # fmt: skip
    for arch in (80, 90):
        for dtype, precision, name in variants:
            mine = [j for j in jobs if j["arch"] == arch and j["dtype"] == name]
            partial = [j for j in mine if j["kernel"] == "splitk_partial"]
            cfg = _splitk.splitk_config_for(arch, dtype, precision)
            assert [shape(j) for j in partial] == [config_shape(cfg)], (arch, name)
            assert partial[0]["constexprs"]["stride_am"] == 1  # dW's M-major A
            chain = [j for j in mine if j["kernel"] == "chain_grad"]
            configs = chain_configs(arch, dtype, precision)
            assert len(chain) == 2 * len(configs), (arch, name)
            assert {shape(j) for j in chain} == {config_shape(c) for c in configs}
            assert {j["constexprs"]["ACTIVATION"] for j in chain} == {"gelu", "gelu_tanh"}
            if precision == "ieee":  # (TF32's is fp32's: the same kernel, compiled once)
                assert any(j["kernel"] == "splitk_reduce" for j in mine)
