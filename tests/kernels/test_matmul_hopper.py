"""The Hopper GEMM path (``triton_kernels._matmul_hopper``: persistent grid, TMA descriptors)
against float64 torch math, its eligibility rules, and its wiring into ``matmul`` /
``linear_forward``.

Triton's CPU interpreter executes tensor descriptors (3.6 and 3.9), so the kernel's math runs
here: the launchers are called directly (the dispatch never picks this path on the CPU), with
the interpreter's 32x32x16 blocks and a 3-program "persistent grid", on odd shapes whose rows
still meet TMA's 16-byte alignment (K, N multiples of 8): several tiles per program, partial
tiles at every edge, a K tail. What only a GPU shows (TMA and wgmma in the machine code, 0
spills) is the audit's (``tests/kernels/test_audit.py``); the ``cuda`` tests at the end compare
the path with native PyTorch on an sm_90 GPU.

Tolerances, by dtype (``k``: the reduction length; ``|A||B|``: the same GEMM on absolute
values):

* fp32 under the interpreter (IEEE ``tl.dot``): rtol 1.3e-6, atol 1e-5 * sqrt(k), as in
  ``test_linear_kernels.py``.
* fp32 on a GPU runs TF32 (the path takes fp32 only then): each operand is rounded to a 10-bit
  mantissa (relative error 2**-11), so a product is off by at most 2**-10 of its size, the
  sum by 2**-10 * ``|A||B|``; an activation multiplies that by at most max|act'| <= 1.13 (GELU).
* fp16 / bf16: fp32 accumulation and one rounding of the output: rtol the dtype's
  ``assert_close`` default, atol about half an output ulp at O(1) values; an activation output
  rounds twice (z, then y): rtol twice the default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from manualbp.kernels import _matmul
from manualbp.kernels import _matmul_hopper as hopper
from manualbp.kernels import linear as forward_mod
from manualbp.kernels._matmul import matmul
from manualbp.kernels._runtime import smem_limit
from manualbp.kernels.linear import forward as linear_forward
from torch import Tensor

from manualbp.testing import compare
from tests.helpers import ACTIVATION_NAMES, native_activation

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_HOPPER_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Calling the launchers directly needs the interpreter or an sm_90+ GPU (TMA).
needs_launch = pytest.mark.skipif(
    not (_INTERPRET or _HOPPER_GPU),
    reason="the TMA kernel runs under the CPU interpreter (TRITON_INTERPRET=1) or on sm_90+",
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
M_, K_, N_ = 47, 40, 72
TF32_REL = 2.0**-10  # a TF32 product's relative error bound (both operands rounded)
MAX_ACT_SLOPE = 1.13  # max |act'| over the registry (GELU)


# ------------------------------------------------------------------------------------------
# References and tolerances
# ------------------------------------------------------------------------------------------
def _tf32(dtype: torch.dtype) -> bool:
    """Whether fp32 runs TF32 here: on a GPU the path takes fp32 only under TF32."""
    return dtype == torch.float32 and not _INTERPRET


@contextmanager
def _precision(dtype: torch.dtype) -> Iterator[None]:
    """fp32 on a GPU: torch's "high" float32 matmul precision (TF32), as the path requires."""
    old = torch.get_float32_matmul_precision()
    if _tf32(dtype):
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _check(
    actual: Tensor,
    expected: Tensor,
    dtype: torch.dtype,
    k: int,
    abs_sum: Tensor,
    activated: bool = False,
) -> None:
    """``actual`` against the float64 ``expected`` within the module docstring's bounds."""
    assert actual.dtype == dtype
    if dtype == torch.float32:
        rtol, atol = 1.3e-6, 1e-5 * math.sqrt(max(k, 1))
    elif dtype == torch.float16:
        rtol, atol = 1e-3, 1e-3
    else:
        rtol, atol = 1.6e-2, 8e-3
    if activated and dtype != torch.float32:
        rtol *= 2
    exp = expected.double()
    allowed = atol + rtol * exp.abs()
    if _tf32(dtype):
        allowed = allowed + TF32_REL * (MAX_ACT_SLOPE if activated else 1.0) * abs_sum
    err = (actual.double() - exp).abs()
    bad = ~(err <= allowed)
    assert not bad.any(), (
        f"{int(bad.sum())} of {err.numel()} elements off; worst excess "
        f"{float((err - allowed).max()):.3g} (err {float(err.max()):.3g})"
    )


def _rand(*shape: int, dtype: torch.dtype) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE).to(dtype)


def _ref_forward(x: Tensor, w: Tensor, b: Tensor | None, act: str | None, slope: float = 0.01):
    """(y, z, |x||W^T|) in float64; y from z rounded to the input dtype, as native Linear +
    activation (and the kernel's epilogue) compute it."""
    z = x.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    y = native_activation(act, slope)(z.to(x.dtype).double())
    return y, z, x.double().abs() @ w.double().abs().T


# ------------------------------------------------------------------------------------------
# The kernel's math (interpreter, or an sm_90 GPU)
# ------------------------------------------------------------------------------------------
@needs_launch
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATION_NAMES)
def test_forward_every_activation(act, dtype):
    x, w, b = _rand(M_, K_, dtype=dtype), _rand(N_, K_, dtype=dtype), _rand(N_, dtype=dtype)
    y = torch.empty(M_, N_, dtype=dtype, device=DEVICE)
    z = torch.empty_like(y) if act is not None else None
    with _precision(dtype):
        hopper.launch_gemm(x, w.t(), y, z, b, act, 0.01)
    y_ref, z_ref, abs_sum = _ref_forward(x, w, b, act)
    _check(y, y_ref, dtype, K_, abs_sum, activated=act is not None)
    if z is not None:
        _check(z, z_ref, dtype, K_, abs_sum)


@needs_launch
@pytest.mark.parametrize("slope", [0.01, -0.5])
def test_forward_without_bias_and_slope(slope):
    dtype = torch.bfloat16
    x, w = _rand(M_, K_, dtype=dtype), _rand(N_, K_, dtype=dtype)
    y = torch.empty(M_, N_, dtype=dtype, device=DEVICE)
    z = torch.empty_like(y)
    hopper.launch_gemm(x, w.t(), y, z, None, "leaky_relu", slope)
    y_ref, z_ref, abs_sum = _ref_forward(x, w, None, "leaky_relu", slope)
    _check(z, z_ref, dtype, K_, abs_sum)
    _check(y, y_ref, dtype, K_, abs_sum, activated=True)


# Operand layouts: (A row-major or read through its transpose, B likewise). dX = dZ @ W is
# (row, row), dW = dZ^T @ X is (transposed, row), the forward x @ W^T is (row, transposed).
LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]


@needs_launch
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("a_t,b_t", LAYOUTS, ids=["dX", "dW", "fwd", "both_T"])
def test_matmul_layouts(a_t, b_t, dtype):
    M, K, N = 72, 40, 56  # every M, N, K a partial tile; all rows 16-byte aligned
    a = _rand(K, M, dtype=dtype).t() if a_t else _rand(M, K, dtype=dtype)
    b = _rand(N, K, dtype=dtype).t() if b_t else _rand(K, N, dtype=dtype)
    assert (hopper.tma_layout(a), hopper.tma_layout(b)) == (a_t, b_t)
    with _precision(dtype):
        c = hopper.matmul_tma(a, b)
    assert c.shape == (M, N) and c.is_contiguous()
    _check(c, a.double() @ b.double(), dtype, K, a.double().abs() @ b.double().abs())


@needs_launch
@pytest.mark.parametrize("shape", [(5, 8, 8), (130, 24, 96)], ids=["one_tile", "5x3_tiles"])
def test_persistent_grid_tile_counts(shape):
    """Fewer tiles than programs (idle programs), and several tiles per program."""
    M, K, N = shape
    dtype = torch.bfloat16
    a, b = _rand(M, K, dtype=dtype), _rand(K, N, dtype=dtype)
    c = hopper.matmul_tma(a, b)
    _check(c, a.double() @ b.double(), dtype, K, a.double().abs() @ b.double().abs())


@needs_launch
def test_empty_and_k0_into_out():
    dtype = torch.float16
    out = torch.full((6, 8), 7.0, dtype=dtype, device=DEVICE)
    assert hopper.matmul_tma(_rand(6, 0, dtype=dtype), _rand(0, 8, dtype=dtype), out=out) is out
    assert torch.equal(out, torch.zeros_like(out))
    empty = hopper.matmul_tma(_rand(0, 8, dtype=dtype), _rand(8, 8, dtype=dtype))
    assert empty.shape == (0, 8)


# ------------------------------------------------------------------------------------------
# Wiring: matmul() (dX / dW) and linear_forward() take the path when it is eligible
# ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not _INTERPRET, reason="forces the path on the CPU interpreter")
def test_matmul_and_linear_forward_dispatch(monkeypatch):
    calls = []

    def eligible(operands, outputs, *, epilogue=False, accumulate=False):
        calls.append(epilogue)
        return True

    monkeypatch.setattr(_matmul, "tma_eligible", eligible)
    monkeypatch.setattr(forward_mod, "tma_eligible", eligible)
    dtype = torch.bfloat16
    x, w, dz = _rand(M_, K_, dtype=dtype), _rand(N_, K_, dtype=dtype), _rand(M_, N_, dtype=dtype)
    dx, dw = matmul(dz, w), matmul(dz.t(), x)  # the backward's two GEMMs
    _check(dx, dz.double() @ w.double(), dtype, N_, dz.double().abs() @ w.double().abs())
    _check(dw, dz.double().T @ x.double(), dtype, M_, dz.double().abs().T @ x.double().abs())
    b = _rand(N_, dtype=dtype)
    y, z = linear_forward(x, w, b, "gelu", store_preact=True)
    y_ref, z_ref, abs_sum = _ref_forward(x, w, b, "gelu")
    _check(z, z_ref, dtype, K_, abs_sum)
    _check(y, y_ref, dtype, K_, abs_sum, activated=True)
    assert calls == [False, False, True]


def test_launcher_rejects_what_tma_cannot_read():
    a = _aligned(6, 8)
    with pytest.raises(ValueError, match="TMA"):
        hopper.matmul_tma(_aligned(6, 7)[:, :6], _aligned(6, 8))  # 14-byte row stride
    with pytest.raises(ValueError, match="TMA"):
        hopper.matmul_tma(a, _aligned(8, 8), out=_aligned(8, 6).t())  # column-major output


def test_not_eligible_off_gpu():
    a = torch.randn(16, 16, dtype=torch.float16)  # CPU tensors: never the TMA path
    assert not hopper.tma_eligible((a, a), (a,))


# ------------------------------------------------------------------------------------------
# Eligibility rules (device-independent)
# ------------------------------------------------------------------------------------------
def _aligned(r: int, c: int, dtype=torch.float16) -> Tensor:
    return torch.randn(r, c).to(dtype)


def test_tma_layout():
    assert hopper.tma_layout(_aligned(5, 8)) is False  # 16-byte rows
    assert hopper.tma_layout(_aligned(5, 8).t()) is True  # column-major view
    assert hopper.tma_layout(_aligned(5, 7)) is None  # 14-byte rows
    assert hopper.tma_layout(_aligned(5, 16)[:, ::2]) is None  # no unit stride
    assert hopper.tma_layout(_aligned(1, 41).flatten()[1:].view(5, 8)) is None  # offset 2 B
    assert hopper.tma_layout(_aligned(0, 8)) is None
    assert hopper.tma_layout(_aligned(5, 4, torch.float32)) is False  # 16-byte fp32 rows


@pytest.mark.parametrize(
    "arch,dtype,precision,want",
    [
        (90, torch.float16, "ieee", True),
        (90, torch.bfloat16, "ieee", True),
        (90, torch.float32, "tf32", True),
        (90, torch.float32, "ieee", False),  # IEEE fp32: FMA path, pointer kernel
        (90, torch.float64, "ieee", False),
        (80, torch.float16, "ieee", False),  # no TMA before Hopper
        (100, torch.bfloat16, "ieee", True),
        (120, torch.float16, "ieee", False),  # 99 KiB of shared memory: no config fits
    ],
)
def test_tma_supported_by_arch_and_dtype(arch, dtype, precision, want):
    # A (M, K) row-major, B (K, N) read through its transpose: both K-major, as x W^T is.
    a, b, c = _aligned(64, 32, dtype), _aligned(48, 32, dtype).t(), _aligned(64, 48, dtype)
    assert hopper.tma_supported(arch, precision, (a, b), (c,)) is want


def test_tf32_needs_k_major_operands():
    # An MN-major fp32 operand would reach wgmma through registers, a shared-memory round
    # trip per K step: dX's B (W row-major) and dW's A (dZ^T) stay on the pointer kernel.
    f32 = torch.float32
    a, c = _aligned(64, 32, f32), _aligned(64, 48, f32)
    k_major_b, mn_major_b = _aligned(48, 32, f32).t(), _aligned(32, 48, f32)
    assert hopper.tma_supported(90, "tf32", (a, k_major_b), (c,))
    assert not hopper.tma_supported(90, "tf32", (a, mn_major_b), (c,))
    assert not hopper.tma_supported(90, "tf32", (_aligned(32, 64, f32).t(), k_major_b), (c,))
    assert hopper.tma_supported(90, "ieee", (_aligned(32, 64).t(), _aligned(32, 48)), (c.half(),))


def test_stride_zero_operands_are_not_tma_readable():
    row = _aligned(1, 32).expand(64, 32)  # an expanded row: stride (0, 1)
    assert row.stride() == (0, 1) and hopper.tma_layout(row) is None
    col = _aligned(64, 1).expand(64, 32).t()  # a transposed expanded column: stride (1, 0)
    assert hopper.tma_layout(col) is None
    assert not hopper.tma_supported(90, "ieee", (row, _aligned(32, 48)), (_aligned(64, 48),))


def test_tma_supported_by_layout():
    a, b, c = _aligned(64, 32), _aligned(32, 48), _aligned(64, 48)
    ok = hopper.tma_supported
    assert ok(90, "ieee", (a, b), (c,), epilogue=True)
    assert ok(90, "ieee", (_aligned(32, 64).t(), _aligned(48, 32).t()), (c,))  # transposed
    assert not ok(90, "ieee", (a, b), (_aligned(48, 64).t(),))  # output must be row-major
    assert not ok(90, "ieee", (_aligned(64, 33)[:, :32], b), (c,))  # 66-byte row stride
    assert not ok(90, "ieee", (a, _aligned(32, 96)[:, ::2]), (c,))  # no unit stride


def test_configs_are_data_and_fit():
    """2-3 configs per class, each fitting sm_90's shared memory, with an even BLOCK_N (the
    epilogue stores halves). Warp specialisation is off everywhere: on sm_90 neither Triton
    3.6 nor 3.9 specialises the loop (see the module docstring)."""
    for (cls, epilogue), cfgs in hopper.HOPPER_CONFIGS.items():
        assert 2 <= len(cfgs) <= 3, (cls, epilogue)
        elsize = 2 if cls == "fp16" else 4
        for cfg in cfgs:
            assert hopper.smem_estimate(cfg, elsize) <= smem_limit(90), cfg
            assert cfg["BLOCK_N"] % 2 == 0 and not cfg["WARP_SPECIALIZE"], cfg
        if epilogue:  # an activation epilogue keeps <= 64 accumulator elements per thread
            assert all(c["BLOCK_M"] * c["BLOCK_N"] <= 64 * 32 * c["num_warps"] for c in cfgs)
    assert max(c["BLOCK_N"] for c in hopper.HOPPER_CONFIGS[("fp16", False)]) == 256


# ------------------------------------------------------------------------------------------
# On an sm_90 GPU: the dispatch takes the path and matches native
# ------------------------------------------------------------------------------------------
hopper_gpu = pytest.mark.skipif(not _HOPPER_GPU, reason="needs an sm_90+ GPU")


@pytest.mark.cuda
@hopper_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", [None, "gelu", "silu"])
def test_cuda_forward_matches_native(act, dtype):
    M, K, N = 2047, 264, 1032  # 16 x 9 tiles of 128x128: more tiles than SMs
    x, w, b = _rand(M, K, dtype=dtype), _rand(N, K, dtype=dtype), _rand(N, dtype=dtype)
    with _precision(dtype):
        y_probe = torch.empty(M, N, dtype=dtype, device=DEVICE)
        assert hopper.tma_eligible((x, w), (y_probe,), epilogue=act is not None)
        y, z = linear_forward(x, w, b, act, store_preact=act is not None)
        native = native_activation(act, 0.01)(torch.nn.functional.linear(x, w, b))
    y_ref, z_ref, abs_sum = _ref_forward(x, w, b, act)
    _check(y, y_ref, dtype, K, abs_sum, activated=act is not None)
    if z is not None:
        _check(z, z_ref, dtype, K, abs_sum)
    _against_native(y, native, y_ref, abs_sum)


def _against_native(got: Tensor, native: Tensor, exact: Tensor, abs_sum: Tensor) -> None:
    """``got`` against native's result, allowing native's own distance from float64 (see
    :func:`manualbp.testing.compare`); fp16/bf16 only: under TF32, cuBLAS rounds its operands
    its own way, so the float64 bound above is the comparison."""
    if got.dtype == torch.float32:
        return
    result = compare(got, native, abs_sum=abs_sum, exact=exact)
    assert result.ok, result.detail


@pytest.mark.cuda
@hopper_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_dx_dw_match_native(dtype):
    M, K, N = 2047, 264, 1032
    x, w, dz = _rand(M, K, dtype=dtype), _rand(N, K, dtype=dtype), _rand(M, N, dtype=dtype)
    with _precision(dtype):
        assert hopper.tma_eligible((dz, w), (torch.empty(M, K, dtype=dtype, device=DEVICE),))
        assert hopper.tma_eligible((dz.t(), x), (torch.empty(N, K, dtype=dtype, device=DEVICE),))
        dx, dw = matmul(dz, w), matmul(dz.t(), x)
    d64, w64, x64 = dz.double(), w.double(), x.double()
    dx_ref, dw_ref = d64 @ w64, d64.T @ x64
    dx_abs, dw_abs = d64.abs() @ w64.abs(), d64.abs().T @ x64.abs()
    _check(dx, dx_ref, dtype, N, dx_abs)
    _check(dw, dw_ref, dtype, M, dw_abs)
    _against_native(dx, dz @ w, dx_ref, dx_abs)
    _against_native(dw, dz.t() @ x, dw_ref, dw_abs)
