"""LinearMSELoss: the fused output head equals nn.Linear + nn.MSELoss and saves memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import manualbp
from manualbp import functional
from tests.helpers import assert_close_through_sum, clone_leaf, leaf


def _pair(K, N, bias, reduction, chunk_rows=None, dtype=torch.float32):
    torch.manual_seed(5)
    head = manualbp.LinearMSELoss(K, N, bias=bias, reduction=reduction, chunk_rows=chunk_rows,
                                  dtype=dtype)  # fmt: skip
    torch.manual_seed(5)
    return head, nn.Linear(K, N, bias=bias, dtype=dtype)


@pytest.mark.parametrize("chunk_rows", [None, 1, 8, 1000])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("lead", [(47,), (3, 17), (0,), ()], ids=str)
def test_matches_linear_then_mse(lead, reduction, bias, chunk_rows):
    K, N = 31, 123
    head, ref = _pair(K, N, bias, reduction, chunk_rows)
    assert_close(head.weight, ref.weight, rtol=0, atol=0)  # nn.Linear's very draw
    x = leaf(torch.randn(*lead, K))
    xr = clone_leaf(x)
    t = torch.randn(*lead, N)
    loss, want = head(x, t), F.mse_loss(ref(xr), t, reduction=reduction)
    assert_close(loss, want, equal_nan=True)
    # A non-uniform upstream gradient: per element for "none".
    g = torch.randn_like(want)
    loss.backward(g)
    want.backward(g)
    # The grads are GEMM sums over chunks in another order than one GEMM: allow the
    # rounding a sum may add (tests/helpers.py), nothing more.
    d = (ref(xr) - t).detach().abs() * 2 * g.abs()
    if reduction == "mean":
        d = d / max(d.numel(), 1)  # |dL/dŷ| itself, so the bound is as tight as the math
    d = d.reshape(-1, N)
    assert_close_through_sum(x.grad, xr.grad, (d @ head.weight.detach().abs()).reshape(x.shape))
    assert_close_through_sum(
        head.weight.grad, ref.weight.grad, d.mT @ x.detach().reshape(-1, K).abs()
    )
    if bias:
        assert_close_through_sum(head.bias.grad, ref.bias.grad, d.sum(0))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_and_gradgradcheck(reduction):
    kw = {"dtype": torch.float64}
    x, w, b = (
        leaf(torch.randn(7, 4, **kw)),
        leaf(torch.randn(5, 4, **kw)),
        leaf(torch.randn(5, **kw)),
    )
    t = torch.randn(7, 5, **kw)

    def f(x, w, b):
        return functional.linear_mse_loss(x, w, b, t, reduction, chunk_rows=3)

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


def test_broadcast_target_and_target_requiring_grad_match_native():
    head, ref = _pair(6, 9, True, "mean")
    x = leaf(torch.randn(11, 6))
    for t in (torch.randn(9), torch.randn(11, 9, requires_grad=True)):
        tr = clone_leaf(t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            loss, want = head(x, t), F.mse_loss(ref(x), tr)
        assert_close(loss, want)
        if t.requires_grad:
            loss.backward()
            want.backward()
            assert_close(t.grad, tr.grad)


def test_same_size_warning_as_native():
    head = manualbp.LinearMSELoss(3, 4)
    with pytest.warns(UserWarning, match=r"target size \(torch.Size\(\[5, 1\]\)\)"):
        head(torch.randn(5, 3), torch.randn(5, 1))


def test_state_dict_loads_both_ways_with_nn_linear():
    head, ref = manualbp.LinearMSELoss(4, 3), nn.Linear(4, 3)
    head.load_state_dict(ref.state_dict())
    ref.load_state_dict(head.state_dict())
    assert "reduction='mean'" in repr(head)


def test_bad_arguments():
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        manualbp.LinearMSELoss(3, 4, reduction="avg")
    head = manualbp.LinearMSELoss(3, 4)
    with pytest.raises(ValueError, match=r"input.shape\[-1\] \(5\) must equal"):
        head(torch.randn(2, 5), torch.randn(2, 4))
    with pytest.raises(ValueError, match="cannot be broadcast"), pytest.warns(UserWarning):
        head(torch.randn(2, 3), torch.randn(2, 7))
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        functional.linear_mse_loss(torch.randn(2, 3), head.weight, None, torch.randn(2, 4),
                                   chunk_rows=0)  # fmt: skip


def test_autocast_computes_the_loss_in_float32():
    head, ref = _pair(8, 16, True, "mean")
    x, t = torch.randn(12, 8), torch.randn(12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x, t)
        want = F.mse_loss(ref(x), t)
    assert loss.dtype == want.dtype == torch.float32
    assert_close(loss, want)


_MEASURE = textwrap.dedent(
    """
    import sys, torch, manualbp
    from torch import nn

    def status(field):  # kB, from the kernel's accounting of this process
        with open("/proc/self/status") as f:
            return int(next(l for l in f if l.startswith(field)).split()[1])

    fused = sys.argv[1] == "fused"
    M, K, N = map(int, sys.argv[2:5])
    dtype = getattr(torch, sys.argv[5])
    def make(M, K, N):
        layer = (manualbp.LinearMSELoss(K, N) if fused else nn.Linear(K, N)).to(dtype)
        x = torch.randn(M, K, dtype=dtype, requires_grad=True)
        return layer, x, torch.randn(M, N, dtype=dtype)
    def step(layer, x, t):
        (layer(x, t) if fused else nn.MSELoss()(layer(x), t)).backward()
    step(*make(64, 16, 128))  # warm-up: thread pools, BLAS buffers, the autograd engine
    layer, x, t = make(M, K, N)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current one
    before = status("VmRSS:")
    step(layer, x, t)
    print(status("VmHWM:") - before)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("M", "K", "N"), [(4096, 1024, 1024), (4096, 256, 8192)])
def test_peak_memory_is_well_below_the_unfused_pair(M, K, N, dtype):
    # Measured, not assumed: the rise of the process's peak resident memory (VmHWM, reset
    # just before) during one forward+backward, in a fresh process each, for a narrow head
    # (N = K) and a wide one (N >> K), in float32 and bfloat16.
    # glibc's malloc serves large blocks from its heap once its dynamic mmap threshold has
    # grown, and keeps freed heap resident: the peak then depends on allocation history
    # (runs differed by 10%). A fixed threshold maps every block of 64 KiB or more on its
    # own and unmaps it when freed, so the peak is that of the live buffers (runs within
    # 0.5%). Other C libraries ignore the variable.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}

    def peak_kib(kind: str) -> int:
        args = [sys.executable, "-c", _MEASURE, kind, str(M), str(K), str(N), dtype]
        out = subprocess.run(args, check=True, capture_output=True, text=True, env=env)
        return int(out.stdout.strip())

    fused, unfused = peak_kib("fused"), peak_kib("unfused")
    size = 2 if dtype == "bfloat16" else 4
    assert unfused > M * N * size // 1024, unfused  # the pair holds at least the prediction
    assert fused <= 0.8 * unfused, (fused, unfused)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 2.0**10], ids=["g=1", "g=2^10"])
def test_low_precision_matches_native_even_with_a_loss_scale(dtype, scale):
    # dL/dŷ = g * 2D/N must be formed before it is rounded to the low-precision dtype, as
    # natively: the unscaled row sums of 2D x (~1e5 here) overflow float16, and a GradScaler's
    # g (2^10 here) is what keeps 2D/N from underflowing at large N.
    reduction = "mean"
    head, ref = _pair(4, 4, True, reduction, dtype=dtype)
    x = leaf(torch.rand(32768, 4).to(dtype))
    xr = clone_leaf(x)
    t = torch.full((32768, 4), 3.0).to(dtype)
    loss, want = head(x, t), F.mse_loss(ref(xr), t, reduction=reduction)
    assert_close(loss, want)
    g = torch.tensor(scale, dtype=loss.dtype)
    loss.backward(g)
    want.backward(g)
    for got, native in ((head.weight.grad, ref.weight.grad), (head.bias.grad, ref.bias.grad)):
        assert got.isfinite().all()
        # dW, db sum 32768 rows: chunked sums in another order than one GEMM, each part
        # rounded to the dtype once: a few ulps of the dtype.
        assert_close(got, native, rtol=4 * torch.finfo(dtype).eps, atol=0)
    # dx = dL/dŷ W: a sum of K products, each rounded once to the dtype in its own order (the
    # head scales the GEMM of g = 1 by g, native rounds g * 2D/N first): a few ulps of the
    # terms, |dL/dŷ| |W| summed (float64 oracle on the same inputs).
    w64 = ref.weight.detach().double()
    dy = scale * 2 / t.numel() * (F.linear(x.detach().double(), w64, ref.bias.double()) - 3)
    assert_close_through_sum(x.grad, xr.grad, dy.abs() @ w64.abs())


# --------------------------------------------------------------------------------------------
# Devices, transforms and modes: each against native PyTorch
# --------------------------------------------------------------------------------------------
def _native_head(x, w, b, t, reduction):
    return F.mse_loss(F.linear(x, w, b), t, reduction=reduction)


def _head_args(M=9, K=5, N=7, dtype=torch.float64):
    return (torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype),
            torch.randn(N, dtype=dtype), torch.randn(M, N, dtype=dtype))  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_meta_device_infers_shapes_as_native(reduction):
    head = manualbp.LinearMSELoss(5, 7, reduction=reduction, device="meta")
    ref = nn.Linear(5, 7, device="meta")
    x, t = (
        torch.empty(3, 4, 5, device="meta", requires_grad=True),
        torch.empty(3, 4, 7, device="meta"),
    )
    loss, want = head(x, t), F.mse_loss(ref(x), t, reduction=reduction)
    assert (loss.shape, loss.dtype, loss.device) == (want.shape, want.dtype, want.device)
    loss.sum().backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"
    assert head.weight.grad.shape == head.weight.shape
    with torch.no_grad():
        assert head(x, t).shape == want.shape


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_vmap_matches_native(reduction):
    x, w, b, _ = _head_args()
    xs, ts = torch.randn(4, *x.shape, dtype=x.dtype), torch.randn(4, 9, 7, dtype=x.dtype)
    got = torch.vmap(lambda x, t: functional.linear_mse_loss(x, w, b, t, reduction))(xs, ts)
    want = torch.vmap(lambda x, t: _native_head(x, w, b, t, reduction))(xs, ts)
    assert_close(got, want)
    # Per-sample gradients: vmap of grad.
    grad = torch.func.grad(lambda w, x, t: functional.linear_mse_loss(x, w, b, t, reduction).sum())
    native = torch.func.grad(lambda w, x, t: _native_head(x, w, b, t, reduction).sum())
    assert_close(
        torch.vmap(grad, (None, 0, 0))(w, xs, ts), torch.vmap(native, (None, 0, 0))(w, xs, ts)
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_vectorized_jacobian_matches_native(reduction):
    # The fused forward runs as usual; backward then gets a batched upstream gradient.
    x, w, b, t = _head_args()

    def ours(x, w, b):
        return functional.linear_mse_loss(x, w, b, t, reduction, chunk_rows=4)

    def native(x, w, b):
        return _native_head(x, w, b, t, reduction)

    jacobian = torch.autograd.functional.jacobian
    got = jacobian(ours, (x, w, b), vectorize=True)
    assert_close(got, jacobian(native, (x, w, b), vectorize=True))
    assert_close(got, jacobian(ours, (x, w, b)))  # the unbatched backward agrees


class _RecordAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape and dtype of every new tensor (not a view) an op returns."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and not t._is_view():
                self.made.append((tuple(t.shape), t.dtype))
        return out


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_without_grad_only_the_loss_is_computed(mode, reduction):
    K, N = 6, 33
    head, ref = _pair(K, N, True, reduction)
    x, t = torch.randn(40, K, requires_grad=True), torch.randn(40, N)
    with mode(), _RecordAllocations() as rec:
        loss = head(x, t)
    with torch.no_grad():
        want = F.mse_loss(ref(x), t, reduction=reduction)
    assert_close(loss, want)
    assert not loss.requires_grad and loss.grad_fn is None
    # No dW accumulator (fp32, W-sized), no dx, no db: nothing input- or weight-sized.
    assert (tuple(head.weight.shape), torch.float32) not in rec.made
    assert (tuple(x.shape), torch.float32) not in rec.made
    assert x.grad is None and head.weight.grad is None


def test_eager_calls_apply_the_function_itself():
    head = manualbp.LinearMSELoss(4, 3)
    loss = head(torch.randn(5, 4), torch.randn(5, 3))
    assert type(loss.grad_fn) is manualbp.LinearMSELossFunction._backward_cls
    assert type(loss.grad_fn).__name__ == "LinearMSELossFunctionBackward"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("which", ["x", "w", "b", "t", "all"])
def test_forward_ad_matches_native(reduction, which):
    import torch.autograd.forward_ad as fwAD

    primals = _head_args()
    tangents = [torch.randn_like(p) if which in ("all", n) else None
                for n, p in zip("xwbt", primals, strict=True)]  # fmt: skip
    got = {}
    for key, fn in (("ours", functional.linear_mse_loss), ("native", _native_head)):
        with fwAD.dual_level():
            duals = [p if d is None else fwAD.make_dual(p, d)
                     for p, d in zip(primals, tangents, strict=True)]  # fmt: skip
            # requires_grad on x: the head records a graph and runs its Function.
            duals[0] = duals[0].requires_grad_() if which not in ("x", "all") else duals[0]
            out = fn(*duals, reduction)
            got[key] = (fwAD.unpack_dual(out).primal, fwAD.unpack_dual(out).tangent)
    assert_close(got["ours"], got["native"])


def test_forward_ad_uses_the_hand_derived_jvp(monkeypatch):
    import torch.autograd.forward_ad as fwAD

    from manualbp.ops import linear_mse

    calls = []
    real = linear_mse._residual_tangent
    monkeypatch.setattr(linear_mse, "_residual_tangent", lambda *a: calls.append(1) or real(*a))
    x, w, b, t = _head_args()
    with fwAD.dual_level():
        functional.linear_mse_loss(x, fwAD.make_dual(w, torch.randn_like(w)), b, t, chunk_rows=4)
    assert len(calls) == 3  # one per chunk of 4 rows (9 rows)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_func_jvp_and_jacfwd_match_native(reduction):
    x, w, b, t = _head_args()
    v = torch.randn_like(w)

    def ours(w):
        return functional.linear_mse_loss(x, w, b, t, reduction)

    def native(w):
        return _native_head(x, w, b, t, reduction)

    assert_close(torch.func.jvp(ours, (w,), (v,)), torch.func.jvp(native, (w,), (v,)))
    assert_close(torch.func.jacfwd(ours)(w), torch.func.jacfwd(native)(w))


def test_forward_ad_under_autocast_matches_native():
    import torch.autograd.forward_ad as fwAD

    x, w, b, t = _head_args(dtype=torch.float32)
    v = torch.randn_like(w)
    got = {}
    for key, fn in (("ours", functional.linear_mse_loss), ("native", _native_head)):
        with fwAD.dual_level(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x, fwAD.make_dual(w.clone().requires_grad_(), v), b, t, "mean")
            got[key] = fwAD.unpack_dual(out).tangent
    assert got["ours"].dtype == got["native"].dtype == torch.float32
    assert_close(got["ours"], got["native"], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("bias_shape", [(), (1,), (1, 7)], ids=str)
def test_bias_shapes_native_broadcasts(bias_shape):
    x, w, _, t = _head_args()
    b = leaf(torch.randn(bias_shape, dtype=x.dtype))
    br = clone_leaf(b)
    loss, want = functional.linear_mse_loss(x, w, b, t), _native_head(x, w, br, t, "mean")
    assert_close(loss, want)
    loss.backward()
    want.backward()
    assert b.grad.shape == b.shape
    assert_close(b.grad, br.grad)


def test_shape_errors_are_runtime_errors_too():
    head = manualbp.LinearMSELoss(3, 4)
    for x, t in ((torch.randn(2, 5), torch.randn(2, 4)), (torch.randn(2, 3), torch.randn(2, 7))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            with pytest.raises(RuntimeError, match="linear"):
                head(x, t)
    assert head.weight.grad is None


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fullgraph_compile_matches_eager(reduction):
    x, w, b, t = _head_args()
    x, w, b = leaf(x), leaf(w), leaf(b)
    torch._dynamo.reset()
    compiled = torch.compile(functional.linear_mse_loss, fullgraph=True)
    got = compiled(x, w, b, t, reduction)
    want = _native_head(*(clone_leaf(p) for p in (x, w, b)), t, reduction)
    assert_close(got, want)
    got.sum().backward()
    native = [clone_leaf(p) for p in (x, w, b)]
    _native_head(*native, t, reduction).sum().backward()
    for p, n in zip((x, w, b), native, strict=True):
        assert_close(p.grad, n.grad)
    torch._dynamo.reset()
