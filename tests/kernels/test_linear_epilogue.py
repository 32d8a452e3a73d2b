"""The elementwise Linear epilogue (``triton_kernels.linear_epilogue``) against float64 math.

``z = acc + b`` rounded to the output dtype, ``y = act(z)``. The reference adds in float64,
rounds z to the dtype as native Linear does, and applies the native activation module in
float64 to that z; y is then compared after one more rounding. Tolerances, by dtype: z is one
rounding of an exact sum, so at most one ulp off when the kernel's fp32 sum rounds the other
way first (the dtype's default rtol is about an ulp for fp16/bf16; fp32 and fp64 sums are
exact here up to the last bit). y = act(z): the kernel evaluates act in fp32 (fp64) where the
reference uses float64, a few fp32 ulps, then rounds: the dtype's default tolerances, twice
the rtol for fp16/bf16 (z and y each round once). Sizes are odd (no block multiple), so every
tile is partly masked.
"""

from __future__ import annotations

import os

import pytest
import torch
from manualbp.kernels.linear import epilogue
from torch.testing import assert_close

from tests.helpers import ACTIVATION_CASES, DEFAULT_TOLERANCES, native_activation


def linear_epilogue(acc, bias, activation, slope=0.01, *, out=None, preact_out=None):
    """``(y, z)`` of the pass (a new y unless ``out``), as the tests read them."""
    y = torch.empty_like(acc) if out is None else out
    epilogue(acc, bias, activation, slope, out=y, preact_out=preact_out)
    return y, preact_out


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(
    not _INTERPRET and not torch.cuda.is_available(),
    reason="Triton kernels need CUDA or the CPU interpreter (TRITON_INTERPRET=1)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
M_, N_ = 37, 75


def _reference(acc, bias, activation, slope, dtype):
    """(y, z) of float64 math: z = round(acc + b), y = act(z) in float64."""
    v = acc.double() + (0.0 if bias is None else bias.double())
    z = v.to(dtype)
    return native_activation(activation, slope)(z.double()), z


def _tol(dtype, activated):
    rtol, atol = DEFAULT_TOLERANCES[dtype]
    low = dtype in (torch.float16, torch.bfloat16)
    return dict(rtol=2 * rtol if activated and low else rtol, atol=atol)


def _check(y, z, acc, bias, activation, slope):
    dtype = y.dtype
    y_ref, z_ref = _reference(acc, bias, activation, slope, dtype)
    if z is not None:
        assert_close(z, z_ref, **_tol(dtype, False))
    assert_close(y, y_ref.to(dtype), **_tol(dtype, activation is not None))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation,slope", ACTIVATION_CASES)
def test_bias_activation_and_preact(activation, slope, dtype):
    acc = 2 * torch.randn(M_, N_, dtype=dtype, device=DEVICE)
    bias = torch.randn(N_, dtype=dtype, device=DEVICE)
    z = torch.empty_like(acc)
    y, z_out = linear_epilogue(acc, bias, activation, slope, preact_out=z)
    assert z_out is z and y.shape == acc.shape and y.dtype == dtype
    _check(y, z, acc, bias, activation, slope)


@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
def test_in_place_without_bias(activation):
    acc = torch.randn(M_, N_, device=DEVICE)
    want = acc.clone()
    y, z = linear_epilogue(acc, None, activation, out=acc)
    assert y is acc and z is None
    _check(y, None, want, None, activation, 0.01)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_in_place_preact_with_bias(dtype):
    # The cuBLAS candidate's fp64 path: the GEMM wrote z without bias; the pass finishes z in
    # place and writes y elsewhere.
    acc = torch.randn(M_, N_, dtype=dtype, device=DEVICE)
    want, bias = acc.clone(), torch.randn(N_, dtype=dtype, device=DEVICE)
    y, z = linear_epilogue(acc, bias, "silu", preact_out=acc)
    assert z is acc
    _check(y, z, want, bias, "silu", 0.01)


def test_strided_operands():
    # acc transposed in memory, a strided bias, y and z as every-other-column views.
    acc = torch.randn(N_, M_, device=DEVICE).t()
    bias = torch.randn(N_, 3, device=DEVICE)[:, 1]
    y = torch.empty(M_, 2 * N_, device=DEVICE)[:, ::2]
    z = torch.empty(M_, 2 * N_, device=DEVICE)[:, 1::2]
    linear_epilogue(acc, bias, "gelu_tanh", out=y, preact_out=z)
    _check(y, z, acc, bias, "gelu_tanh", 0.01)


def test_fp32_accumulator_into_half_output():
    # The bias is added to the fp32 input before the one rounding to fp16.
    acc = torch.randn(M_, N_, device=DEVICE)
    bias = torch.randn(N_, device=DEVICE)
    y = torch.empty(M_, N_, dtype=torch.float16, device=DEVICE)
    z = torch.empty_like(y)
    linear_epilogue(acc, bias, "tanh", out=y, preact_out=z)
    _check(y, z, acc, bias, "tanh", 0.01)


@pytest.mark.parametrize("shape", [(0, N_), (M_, 0)])
def test_empty_launches_nothing(shape):
    acc = torch.randn(shape, device=DEVICE)
    y, z = linear_epilogue(acc, torch.randn(shape[1], device=DEVICE), "gelu")
    assert y.shape == shape and z is None


def test_audit_compiles_every_activation_in_the_shipped_configs():
    """The audit compiles the pass in its shipped CUDA config, with a bias and a stored z, for
    every activation of the registry (called directly), and as the cuBLAS candidate of the
    forward launches it; contiguous and aligned, so 128-bit loads are required."""
    from manualbp.kernels.linear import EPILOGUE_CONFIGS

    from manualbp.activations import ACTIVATIONS
    from tests.kernels._audit import audit_jobs

    jobs = [j for j in audit_jobs() if j["kernel"] == "linear_epilogue"]
    for arch in (80, 90):
        for dtype in ("fp16", "bf16", "fp32", "fp64"):
            mine = [j for j in jobs if j["arch"] == arch and j["dtype"] == dtype]
            full = [j["constexprs"] for j in mine]
            full = {c["ACTIVATION"] for c in full if c["HAS_BIAS"] and c["STORE_PREACT"]}
            assert full == {"none", *ACTIVATIONS}
            assert any("fwd" in j["config"] for j in mine)  # the cuBLAS candidate's own
            cfg = EPILOGUE_CONFIGS["cuda_fp64" if dtype == "fp64" else "cuda"]
            for j in mine:
                c, warps = j["constexprs"], j["options"]["num_warps"]
                assert (c["BLOCK_M"], c["BLOCK_N"], warps) == (cfg["BLOCK_M"], cfg["BLOCK_N"],
                                                               cfg["num_warps"])  # fmt: skip
                assert j["need_v128"]  # contiguous and aligned: 128-bit loads required
