"""The fused Linear launchers (``triton_kernels.linear_forward`` / ``linear_backward``) against
independent float64 torch math and PyTorch's own activation backward ops.

Runs under Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py`` when
there is no GPU) or on CUDA. Interpreter sizes are small and odd (M=47, K=31, N=123: no block
multiple), so every tile is partly masked; the interpreter's fixed GEMM config is 32x32x16.

Tolerances, by dtype (``k`` is the length of the reduction behind the compared value):

* fp64: ``assert_close`` defaults (rtol 1e-7, atol 1e-7); the kernels accumulate in fp64. The
  leaky_relu slope reaches fp64 math as the exact double (``negative_slope: tl.float64``), fp32
  math rounded once to fp32, as native (checked exactly below).
* fp32 (IEEE ``tl.dot`` in the interpreter / with ``"highest"`` precision): rtol 1.3e-6 (the
  default) and atol 1e-5 * sqrt(k): a k-term fp32 dot of O(1) terms has an O(sqrt(k)) value and
  a rounding error that grows like sqrt(k) eps times it.
* fp16 / bf16 (bf16 runs in the interpreter too: the kernels upcast bf16 dot operands and
  round bf16 stores themselves there, see ``triton_kernels._matmul``): fp32 accumulation and
  one rounding of the output: rtol = the dtype's ``assert_close`` default, atol about half an
  output ulp at O(1) values for the forward. The backward GEMMs consume dZ rounded to the
  input dtype; the reference rounds its float64 dZ too, but the kernel's fp32 dZ can round to
  the neighbouring value: one ulp of an O(1..4) dZ element (2**-9 in fp16) times an O(1..3)
  operand, hence atol 1e-2 for dX / dW in fp16 (8x that in bf16, 3 fewer mantissa bits).
  An activation output ``y = act(z)`` rounds twice: z (to the input dtype, where the kernel's
  fp32 z can round to the neighbouring value of the float64 reference's, one ulp of z times
  |act'| <= 1.13) and then y: rtol twice the default.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import pytest
import torch
from manualbp.kernels.linear import backward as linear_backward
from manualbp.kernels.linear import forward as linear_forward
from torch import Tensor

from manualbp.activations import ACTIVATIONS as REGISTRY
from tests.helpers import native_activation

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(
    not _INTERPRET and not torch.cuda.is_available(),
    reason="Triton kernels need CUDA or the CPU interpreter (TRITON_INTERPRET=1 set before "
    "triton is imported)",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTIVATIONS = [None, *REGISTRY]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
M_, K_, N_ = 47, 31, 123


# ------------------------------------------------------------------------------------------
# References (float64 torch math, PyTorch's own backward formulas)
# ------------------------------------------------------------------------------------------
def _act(name: str | None, slope: float):
    return native_activation(name, slope)


def _saves_output(activation: str | None, slope: float) -> bool:
    """Whether the launchers get y (else z) as the saved tensor: what the registry says."""
    return activation is not None and REGISTRY[activation].saved_for(slope) == "output"


def ref_forward(x: Tensor, w: Tensor, b: Tensor | None, act: str | None, slope: float = 0.01):
    """(y, z) in float64; like native Linear + activation, y is computed from z rounded to
    the input dtype (the kernel's epilogue does the same)."""
    z = x.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    return _act(act, slope)(z.to(x.dtype).double()), z


def ref_act_grad(
    g: Tensor, s: Tensor, act: str | None, slope: float, z: Tensor | None = None
) -> Tensor:
    """dZ in float64 from dY and the saved tensor ``s``, by aten's backward ops; for an
    activation without a known aten backward, by native autograd through the registry's
    native module at the pre-activation ``z`` (so a new registry entry needs no change here)."""
    if act is not None and act not in _ATEN_BACKWARDS:
        assert z is not None, f"{act}: pass the pre-activation z for the autograd oracle"
        z64 = z.double().requires_grad_(True)
        out = REGISTRY[act].native_module(slope)(z64)
        return torch.autograd.grad(out, z64, g.double())[0]
    g, s = g.double(), s.double() if s is not None else None
    aten = torch.ops.aten
    if act is None:
        return g
    if act == "relu":
        return aten.threshold_backward(g, s, 0)
    if act in ("gelu", "gelu_tanh"):
        return aten.gelu_backward(g, s, approximate="tanh" if act == "gelu_tanh" else "none")
    if act == "silu":
        return aten.silu_backward(g, s)
    if act == "tanh":
        return aten.tanh_backward(g, s)
    if act == "sigmoid":
        return aten.sigmoid_backward(g, s)
    assert act == "leaky_relu", act
    return aten.leaky_relu_backward(g, s, slope, False)


_ATEN_BACKWARDS = {"relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "leaky_relu"}


def ref_backward(g, x, w, saved, act, slope, dtype, z=None):
    dz = ref_act_grad(g, saved, act, slope, z)
    # The kernels materialise dZ in the input dtype before the GEMMs (as native autograd does).
    dz_q = dz.to(dtype).double()
    return dz_q @ w.double(), dz_q.T @ x.double(), dz.sum(0)


def tols(
    dtype: torch.dtype, k: int, rounded_operand: bool = False, activated: bool = False
) -> dict[str, float]:
    """Tolerances for a value reduced over ``k`` terms (see the module docstring);
    ``rounded_operand``: one operand (dZ) was rounded to ``dtype`` before the GEMM;
    ``activated``: the value is act(z) of a z rounded to ``dtype`` (two roundings)."""
    if dtype == torch.float64:
        return dict(rtol=1e-7, atol=1e-7)
    if dtype == torch.float32:
        return dict(rtol=1.3e-6, atol=1e-5 * math.sqrt(max(k, 1)))
    rtol = 2 if activated else 1
    if dtype == torch.float16:
        return dict(rtol=rtol * 1e-3, atol=1e-2 if rounded_operand else 1e-3)
    # bf16: 8x fp16's ulp
    return dict(rtol=rtol * 1.6e-2, atol=8e-2 if rounded_operand else 8e-3)


def close(
    actual: Tensor,
    expected: Tensor,
    dtype: torch.dtype,
    k: int,
    rounded_operand: bool = False,
    activated: bool = False,
) -> None:
    assert actual.dtype == dtype
    tol = tols(dtype, k, rounded_operand, activated)
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


# ------------------------------------------------------------------------------------------
# Input builders
# ------------------------------------------------------------------------------------------
def make(shape: tuple[int, int], layout: str = "contiguous", dtype=torch.float32) -> Tensor:
    """A (rows, cols) tensor laid out as ``contiguous``, ``transposed`` (column-major),
    ``noncontig`` (every other column of a wider tensor) or ``offset1`` (storage offset 1
    element, which breaks 16-byte alignment)."""
    r, c = shape
    kw = dict(dtype=torch.float64, device=DEVICE)
    if layout == "contiguous":
        t = torch.randn(r, c, **kw).to(dtype)
    elif layout == "transposed":
        t = torch.randn(c, r, **kw).to(dtype).t()
    elif layout == "noncontig":
        t = torch.randn(r, 2 * c, **kw).to(dtype)[:, ::2]
    elif layout == "offset1":
        t = torch.randn(r * c + 1, **kw).to(dtype)[1:].view(r, c)
    else:
        raise ValueError(layout)
    assert t.shape == (r, c)
    return t


def run_both(x, w, b, act, slope=0.01, g=None, needs=(True, True, True)):
    """Forward then backward through the launchers; returns (y, z, dx, dw, db, saved, g)."""
    y, z = linear_forward(x, w, b, act, slope, store_preact=act is not None)
    saves_out = _saves_output(act, slope)
    saved = None if act is None else (y if saves_out else z)
    if g is None:
        g = make(tuple(y.shape), dtype=x.dtype)
    dx, dw, db = linear_backward(
        g,
        x if needs[1] else None,
        w if needs[0] else None,
        saved,
        act,
        slope,
        needs_grad=needs,
    )
    return y, z, dx, dw, db, saved, g


def check_all(x, w, b, act, slope=0.01, g=None):
    dtype = x.dtype
    M, K = x.shape
    N = w.shape[0]
    y, z, dx, dw, db, saved, g = run_both(x, w, b, act, slope, g)
    y_ref, z_ref = ref_forward(x, w, b, act, slope)
    assert y.shape == (M, N) and y.is_contiguous()
    close(y, y_ref, dtype, K, activated=act is not None)
    if act is None:
        assert z is None
    else:
        close(z, z_ref, dtype, K)
    dx_ref, dw_ref, db_ref = ref_backward(g, x, w, saved, act, slope, dtype, z)
    close(dx, dx_ref, dtype, N, rounded_operand=act is not None)
    close(dw, dw_ref, dtype, M, rounded_operand=act is not None)
    if b is not None:
        close(db, db_ref, dtype, M)
    assert dx.shape == (M, K) and dw.shape == (N, K) and db.shape == (N,)


# ------------------------------------------------------------------------------------------
# Interpreter / CUDA tests (small shapes)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_forward_every_activation(act, dtype, has_bias):
    x, w = make((M_, K_), dtype=dtype), make((N_, K_), dtype=dtype)
    b = make((1, N_), dtype=dtype)[0] if has_bias else None
    y, z = linear_forward(x, w, b, act, 0.01, store_preact=True)
    y_ref, z_ref = ref_forward(x, w, b, act)
    close(z, z_ref, dtype, K_)
    close(y, y_ref, dtype, K_, activated=act is not None)
    y2, z2 = linear_forward(x, w, b, act, 0.01, store_preact=False)
    assert z2 is None
    assert torch.equal(y2, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_backward_every_activation(act, dtype):
    x, w = make((M_, K_), dtype=dtype), make((N_, K_), dtype=dtype)
    b = make((1, N_), dtype=dtype)[0]
    check_all(x, w, b, act)


@pytest.mark.parametrize("slope", [-0.2, 0.0, 1.5])
def test_leaky_relu_slopes(slope):
    # slope < 0 saves z; slope >= 0 saves y (sign(y) == sign(z)).
    x, w, b = make((M_, K_)), make((N_, K_)), make((1, N_))[0]
    check_all(x, w, b, "leaky_relu", slope)


# The exact slope: 0.1 is not an fp32 number (fp32(0.1) is 0.1 + 1.5e-9).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("slope", [0.1, -0.3, 1 / 3])
def test_leaky_relu_slope_is_exact(dtype, slope):
    """act(z) and its derivative are one multiplication by the slope: bit for bit native's
    (fp64 with the double slope, fp32/fp16/bf16 with its fp32 rounding, as torch)."""
    z = torch.linspace(-4, 4, 57, dtype=torch.float64, device=DEVICE).to(dtype)
    y, _ = linear_forward(_empty_x(1, dtype), _empty_w(z), z, "leaky_relu", slope,
                          store_preact=False)  # fmt: skip
    zn = z.clone().requires_grad_(True)
    yn = torch.nn.functional.leaky_relu(zn, slope)
    assert torch.equal(y[0], yn.detach())
    g = torch.linspace(-2, 3, 57, dtype=torch.float64, device=DEVICE).to(dtype)
    (dz_native,) = torch.autograd.grad(yn, zn, g)
    saved = yn.detach() if _saves_output("leaky_relu", slope) else z
    _, _, dz = linear_backward(g[None], None, None, saved[None], "leaky_relu", slope,
                               needs_grad=(False, False, True))  # fmt: skip
    assert torch.equal(dz, dz_native)  # db of one row is dZ itself


def test_leaky_relu_fp64_slope_through_the_gemm():
    """The fused Linear + leaky_relu(0.1) in fp64 against float64 native autograd to ~1e-15
    (it was 2e-8 relative with the slope rounded to fp32)."""
    x, w, b = (make(s, dtype=torch.float64) for s in ((M_, K_), (N_, K_), (1, N_)))
    b = b[0]
    g = make((M_, N_), dtype=torch.float64)
    y, _, dx, dw, db, _, _ = run_both(x, w, b, "leaky_relu", 0.1, g)
    xn, wn, bn = (t.clone().requires_grad_(True) for t in (x, w, b))
    yn = torch.nn.functional.leaky_relu(xn @ wn.T + bn, 0.1)
    yn.backward(g)
    tight = dict(rtol=1e-14, atol=1e-14)  # a few ulps of O(1..10) values: reduction order
    torch.testing.assert_close(y, yn.detach(), **tight)
    torch.testing.assert_close(dx, xn.grad, **tight)
    torch.testing.assert_close(dw, wn.grad, **tight)
    torch.testing.assert_close(db, bn.grad, **tight)


@pytest.mark.slow
def test_leaky_relu_fp64_slope_under_compile():
    """Compiled (the kernels run from their custom ops): the same exact fp64 slope."""
    import manualbp

    x = make((5, 0), dtype=torch.float64)
    w = make((7, 0), dtype=torch.float64)
    b = torch.linspace(-3, 3, 7, dtype=torch.float64, device=DEVICE).requires_grad_(True)
    torch._dynamo.reset()
    f = torch.compile(
        lambda x, w, b: manualbp.functional.linear(x, w, b, "leaky_relu", negative_slope=0.1),
        fullgraph=True,
    )
    with manualbp.use_backend("triton"):
        y = f(x, w, b)
        y.backward(torch.ones_like(y))
    torch._dynamo.reset()
    bn = b.detach().clone().requires_grad_(True)
    yn = torch.nn.functional.leaky_relu(bn, 0.1).expand(5, 7)
    yn.backward(torch.ones_like(yn))
    assert torch.equal(y, yn)
    torch.testing.assert_close(b.grad, bn.grad, rtol=1e-15, atol=0)


# Special values: every registry activation at +-inf, nan, 0 and large values, as native.
def _special_values(dtype: torch.dtype) -> Tensor:
    big = 1e300 if dtype == torch.float64 else 1e30
    top = torch.finfo(dtype).max
    vals = [-math.inf, math.inf, math.nan, 0.0, -0.0, 1.0, -1.0, 1e4, -1e4, 1e10, -1e10, big, -big]
    return torch.tensor([*vals, top, -top], dtype=dtype, device=DEVICE)


def _empty_x(rows: int, dtype: torch.dtype) -> Tensor:
    return torch.empty(rows, 0, dtype=dtype, device=DEVICE)


def _empty_w(z: Tensor) -> Tensor:
    return torch.empty(z.numel(), 0, dtype=z.dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("act", "slope"), [*((a, 0.01) for a in REGISTRY), ("leaky_relu", -0.2)])
def test_special_values_like_native(act, slope, dtype):
    """y = act(z) and dZ = g * act'(z) at z in {+-inf, nan, +-0, +-1, +-large, +-max} equal
    native autograd's, NaN for NaN and inf for inf. z enters as the bias of a K = 0 Linear
    (z = 0 + bias exactly); dZ is the bias gradient of one row, from native's saved tensor."""
    z = _special_values(dtype)
    y, _ = linear_forward(_empty_x(1, dtype), _empty_w(z), z, act, slope, store_preact=False)
    # Native value by value (one-element tensors: aten's scalar loop). Its vectorised loop
    # differs at some of these points on some CPUs (torch 2.13, AVX512: gelu(+inf) = nan,
    # gelu(float32 max) = inf), so a vector of them would test the CPU, not the kernel.
    zn = z.clone().requires_grad_(True)
    yn = torch.cat([_act(act, slope)(v) for v in zn.split(1)])
    g = torch.full_like(z, 0.75)
    (dz_native,) = torch.autograd.grad(yn, zn, g)
    saved = yn.detach() if _saves_output(act, slope) else z
    _, _, dz = linear_backward(g[None], None, None, saved[None], act, slope,
                               needs_grad=(False, False, True))  # fmt: skip
    tol = dict(rtol=1e-13, atol=1e-300) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-37)
    torch.testing.assert_close(y[0], yn.detach(), equal_nan=True, **tol)
    torch.testing.assert_close(dz, dz_native, equal_nan=True, **tol)


@pytest.mark.parametrize(
    "shape", [(1, 31, 123), (47, 31, 1), (65, 33, 70), (3, 100, 5), (33, 1, 17)], ids=str
)
def test_odd_shapes(shape):
    M, K, N = shape
    x, w, b = make((M, K)), make((N, K)), make((1, N))[0]
    check_all(x, w, b, "gelu")


@pytest.mark.parametrize(
    ("x_layout", "w_layout"),
    [
        ("transposed", "contiguous"),
        ("contiguous", "transposed"),
        ("noncontig", "noncontig"),
        ("offset1", "offset1"),
        ("transposed", "offset1"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_layouts(x_layout, w_layout, dtype):
    x, w = make((M_, K_), x_layout, dtype), make((N_, K_), w_layout, dtype)
    b = make((N_, 2), "noncontig", dtype)[:, 0]  # strided bias
    g = make((M_, N_), "transposed" if x_layout == "transposed" else "offset1", dtype)
    check_all(x, w, b, "silu", g=g)


def test_saved_and_grad_layouts():
    x, w, b = make((M_, K_)), make((N_, K_)), make((1, N_))[0]
    _, z = linear_forward(x, w, b, "gelu", store_preact=True)
    saved = z.t().contiguous().t()  # column-major copy of z
    g = make((M_, N_), "noncontig")
    dx, dw, db = linear_backward(g, x, w, saved, "gelu", 0.01, needs_grad=(True, True, True))
    dx_ref, dw_ref, db_ref = ref_backward(g, x, w, z, "gelu", 0.01, torch.float32)
    close(dx, dx_ref, torch.float32, N_)
    close(dw, dw_ref, torch.float32, M_)
    close(db, db_ref, torch.float32, M_)


@pytest.mark.parametrize(
    "needs",
    [(True, False, False), (False, True, False), (False, False, True), (False, True, True)],
    ids=str,
)
@pytest.mark.parametrize("act", [None, "tanh"])
def test_needs_grad_subsets(needs, act):
    x, w, b = make((M_, K_)), make((N_, K_)), make((1, N_))[0]
    _, _, dx, dw, db, saved, g = run_both(x, w, b, act, needs=needs)
    dx_ref, dw_ref, db_ref = ref_backward(g, x, w, saved, act, 0.01, torch.float32)
    for got, ref, need, k in (
        (dx, dx_ref, needs[0], N_),
        (dw, dw_ref, needs[1], M_),
        (db, db_ref, needs[2], M_),
    ):
        if need:
            close(got, ref, torch.float32, k)
        else:
            assert got is None


@pytest.mark.parametrize("act", [None, "gelu", "sigmoid"])
def test_empty_batch(act):
    x, w, b = make((0, K_)), make((N_, K_)), make((1, N_))[0]
    y, z = linear_forward(x, w, b, act, store_preact=True)
    assert y.shape == (0, N_) and z.shape == (0, N_)
    g = make((0, N_))
    dx, dw, db = linear_backward(
        g,
        x,
        w,
        None if act is None else y,
        act,
        0.01,
        needs_grad=(True, True, True),
    )
    assert dx.shape == (0, K_)
    torch.testing.assert_close(dw, torch.zeros(N_, K_, device=DEVICE), rtol=0, atol=0)
    torch.testing.assert_close(db, torch.zeros(N_, device=DEVICE), rtol=0, atol=0)


@pytest.mark.parametrize("has_bias", [True, False])
def test_empty_reduction_dim(has_bias):
    x, w = make((M_, 0)), make((N_, 0))
    b = make((1, N_))[0] if has_bias else None
    y, z = linear_forward(x, w, b, "sigmoid", store_preact=True)
    z_ref = (b if has_bias else torch.zeros(N_, device=DEVICE)).expand(M_, N_)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(y, torch.sigmoid(z_ref))
    g = make((M_, N_))
    dx, dw, db = linear_backward(g, x, w, y, "sigmoid", 0.01, needs_grad=(True, True, True))
    assert dx.shape == (M_, 0) and dw.shape == (N_, 0)
    close(db, ref_act_grad(g, y, "sigmoid", 0.01).sum(0), torch.float32, M_)


def test_empty_out_features():
    x, w, b = make((M_, K_)), make((0, K_)), make((1, 0))[0]
    y, _ = linear_forward(x, w, b, "relu", store_preact=False)
    assert y.shape == (M_, 0)
    dx, dw, db = linear_backward(
        make((M_, 0)), x, w, y, "relu", 0.01, needs_grad=(True, True, True)
    )
    torch.testing.assert_close(dx, torch.zeros(M_, K_, device=DEVICE), rtol=0, atol=0)
    assert dw.shape == (0, K_) and db.shape == (0,)


def test_nan_propagation_like_native():
    x, w = make((4, 3)), make((5, 3))
    x[0, 0] = float("nan")
    y, _ = linear_forward(x, w, None, "relu", store_preact=False)
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1:]).any()  # relu(nan) is nan
    g = torch.ones(4, 5, device=DEVICE)
    _, _, db = linear_backward(g, x, w, y, "relu", 0.0, needs_grad=(False, False, True))
    ref = torch.ops.aten.threshold_backward(g, y, 0).sum(0)  # a NaN output passes g
    torch.testing.assert_close(db, ref)


def test_backward_is_deterministic():
    x, w, b = make((M_, K_)), make((N_, K_)), make((1, N_))[0]
    first = run_both(x, w, b, "gelu_tanh")
    g = first[-1]
    again = run_both(x, w, b, "gelu_tanh", g=g)
    for a, c in zip(first[2:5], again[2:5]):
        assert torch.equal(a, c)


class _KernelLinear(torch.autograd.Function):
    """Minimal autograd wrapper around the launchers, for gradcheck only."""

    @staticmethod
    def forward(ctx, x, w, b, act, slope):
        y, z = linear_forward(x, w, b, act, slope, store_preact=True)
        ctx.saves_out = _saves_output(act, slope)
        ctx.save_for_backward(x, w, y if ctx.saves_out else z)
        ctx.act, ctx.slope = act, slope
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, saved = ctx.saved_tensors
        dx, dw, db = linear_backward(
            g,
            x,
            w,
            saved,
            ctx.act,
            ctx.slope,
            needs_grad=tuple(ctx.needs_input_grad[:3]),
        )
        return dx, dw, db, None, None


@pytest.mark.parametrize(("act", "slope"), [("gelu_tanh", 0.01), ("leaky_relu", -0.2)])
def test_gradcheck_fp64(act, slope):
    kw = dict(dtype=torch.float64, device=DEVICE, requires_grad=True)
    x, w, b = torch.randn(4, 3, **kw), torch.randn(5, 3, **kw), torch.randn(5, **kw)
    assert torch.autograd.gradcheck(
        lambda x, w, b: _KernelLinear.apply(x, w, b, act, slope), (x, w, b)
    )


@contextlib.contextmanager
def _fp32_precision(mode: str) -> Iterator[None]:
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(mode)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


# ------------------------------------------------------------------------------------------
# CUDA only: real sizes, every dtype, poisoned memory, > 2**31 elements
# ------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str
)
@pytest.mark.parametrize("shape", [(512, 768, 1024), (1000, 1000, 300), (4096, 257, 129)], ids=str)
@pytest.mark.parametrize("act", ["gelu", "relu", None])
def test_cuda_real_sizes(dtype, shape, act):
    M, K, N = shape
    x, w, b = make((M, K), dtype=dtype), make((N, K), dtype=dtype), make((1, N), dtype=dtype)[0]
    w = w / math.sqrt(K)
    with _fp32_precision("highest"):
        check_all(x, w, b, act)


@pytest.mark.cuda
def test_cuda_tf32_path():
    M, K, N = 512, 1024, 384
    x, w, b = make((M, K)), make((N, K)) / math.sqrt(K), make((1, N))[0]
    with _fp32_precision("high"):
        y, _ = linear_forward(x, w, b, "gelu", store_preact=False)
    y_ref, _ = ref_forward(x, w, b, "gelu")
    torch.testing.assert_close(y.double(), y_ref, rtol=5e-3, atol=5e-3)  # TF32: 10-bit mantissa


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cuda_outputs_fully_written(dtype):
    """Fill the caching allocator's free blocks with NaN first: any output element a kernel
    forgets to write then shows up as NaN (inputs are finite). The poison goes in after a
    first run, which makes every decision (kernel configs, Triton or cuBLAS) and so allocates
    whatever timing allocates: the checked run then only allocates its outputs."""
    M, K, N = 1000, 520, 777
    x, w, b = make((M, K), dtype=dtype), make((N, K), dtype=dtype), make((1, N), dtype=dtype)[0]
    w = w / math.sqrt(K)
    run_both(x, w, b, "silu")  # warm up: tune, choose, compile
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    poison = torch.full((64 * 2**20,), float("nan"), device="cuda")
    del poison  # its NaN-filled block returns to the cache and backs the outputs below
    probe = torch.empty(M, N, dtype=dtype, device="cuda")
    assert torch.isnan(probe).any(), "the poison did not reach new allocations"
    del probe
    outs = run_both(x, w, b, "silu")
    for t in outs[:5]:
        assert torch.isfinite(t).all()


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_int64_offsets():
    """x with more than 2**31 elements: rows near the end are addressed past int32."""
    M, K, N = 2**21 + 3, 1024, 16
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~12 GiB of GPU memory")
    x = torch.empty(M, K, dtype=torch.float16, device="cuda").normal_()
    w = make((N, K), dtype=torch.float16) / 32
    y, _ = linear_forward(x, w, None, "relu", store_preact=False)
    tail = slice(M - 70, M)
    y_ref, _ = ref_forward(x[tail], w, None, "relu")
    close(y[tail], y_ref, torch.float16, K)
    g = torch.zeros(M, N, dtype=torch.float16, device="cuda")
    g[-1] = 1
    dx, dw, _ = linear_backward(g, x, w, y, "relu", 0.0, needs_grad=(True, True, False))
    dx_ref, dw_ref, _ = ref_backward(g[tail], x[tail], w, y[tail], "relu", 0.0, torch.float16)
    close(dx[tail], dx_ref, torch.float16, N)
    close(dw, dw_ref, torch.float16, 1)


# ------------------------------------------------------------------------------------------
# CUDA only: bf16 rounding, held to native. Triton's CPU interpreter truncates fp32 -> bf16
# where torch rounds to nearest (the Linear kernels round their bf16 stores themselves there,
# see ``triton_kernels._runtime.cast_out``, but the interpreter cannot show what the GPU
# compiler does), so the rounding itself is checked on a GPU.
# ------------------------------------------------------------------------------------------
def bf16_grid(*shape: int, device: str = DEVICE) -> Tensor:
    """bf16 values +-m/128, m in [128, 256): 8 significant bits, so each product (16 bits)
    and each sum of up to 32 of them (multiples of 2**-14 below 2**7: 21 bits) is exact in
    fp32. The one rounding left in a Linear forward or backward is the final fp32 -> bf16
    store, which must round to nearest (even), as cuBLAS does for native."""
    m = torch.randint(128, 256, shape, device=device)
    sign = torch.randint(0, 2, shape, device=device) * 2 - 1
    return (sign * m / 128).to(torch.bfloat16)


def bf16_rounding_case(impl: str, activation: str | None, device: str) -> None:
    import torch.nn.functional as F
    from manualbp.kernels import linear as lc

    import manualbp
    from manualbp import functional

    x, w, b = (bf16_grid(*s, device=device).requires_grad_() for s in [(32, 32), (32, 32), (32,)])
    g = bf16_grid(32, 32, device=device)
    reduced = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False  # fp32 sums
    try:
        with manualbp.use_backend("triton"), lc.force(impl):
            y = functional.linear(x, w, b, activation)
            y.backward(g)
        xn, wn, bn = (t.detach().clone().requires_grad_() for t in (x, w, b))
        yn = _act(activation, 0.01)(F.linear(xn, wn, bn))
        yn.backward(g)
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced
    # The float64 values (exact here), each rounded once to nearest.
    x64, w64, b64 = (t.detach().double() for t in (x, w, b))
    z64 = x64 @ w64.T + b64
    dz64 = g.double() * (z64 > 0) if activation == "relu" else g.double()
    exact = [_act(activation, 0.01)(z64), dz64 @ w64, dz64.T @ x64, dz64.sum(0)]
    for name, ours, native, want in zip(
        ("y", "dx", "dw", "db"), (y, x.grad, w.grad, b.grad), (yn, xn.grad, wn.grad, bn.grad),
        exact, strict=True,
    ):  # fmt: skip
        assert ours.dtype == torch.bfloat16, name
        want = want.to(torch.bfloat16)
        assert torch.equal(native, want), f"{name}: native is not the rounded exact value"
        wrong = (ours != native).sum().item()
        assert wrong == 0, f"{name}: {wrong} of {ours.numel()} elements differ from native"


@pytest.mark.cuda
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("impl", ["triton", "cublas"])
def test_cuda_bf16_rounds_to_nearest_as_native(impl, activation):
    bf16_rounding_case(impl, activation, "cuda")
