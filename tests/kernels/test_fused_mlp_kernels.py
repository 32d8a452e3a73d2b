"""The fused-MLP launchers (``triton_kernels.fused_mlp``) against native PyTorch and float64.

Runs under Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py`` when
there is no GPU) or on CUDA. Sizes are small and odd (37 rows: two 32-row tiles, two
weight-gradient chunks; widths that are not multiples of the 16-column chunks), so every tile
is partly masked and both weight-gradient paths (direct, and partials + reduction) run.

Accuracy rule: the oracle is native autograd (``F.linear`` + the activation's native module,
layer by layer) in the same dtype, and float64 math on the same inputs is the exact value.
The kernels must be as accurate as native: ``max |ours - exact| <= 2 max |native - exact| +
8 eps(dtype) max |exact|``. (Both round z, y, dZ and each dY to the dtype at the same points;
they may round a value to neighbouring representables, and such a difference propagates
through the later layers no further than native's own rounding errors do.)
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from manualbp.kernels import fused_mlp as fm
from torch import Tensor

from manualbp.activations import ACTIVATIONS as REGISTRY
from tests.helpers import native_activation

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(
    not _INTERPRET and not torch.cuda.is_available(),
    reason="Triton kernels need CUDA or the CPU interpreter",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = ("mlp_forward_kernel", "mlp_backward_kernel", "mlp_wgrad_kernel",
           "mlp_wgrad_reduce_kernel")  # fmt: skip


class _Counted:
    """A kernel whose launches (``kernel[grid](...)``) are counted."""

    def __init__(self, kernel, counts: dict[str, int], name: str) -> None:
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] += 1
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch) -> dict[str, int]:
    """Launch counts of the four fused-MLP kernels during the test."""
    counts = dict.fromkeys(KERNELS, 0)
    for name in KERNELS:
        monkeypatch.setattr(fm, name, _Counted(getattr(fm, name), counts, name))
    return counts


def _kind(name: str | None, slope: float) -> str:
    return "none" if name is None else REGISTRY[name].saved_for(slope)


def native_mlp(x, ws, bs, hidden, out, slopes):
    h = x
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        last = i == len(ws) - 1
        h = native_activation(out if last else hidden, slopes[last])(F.linear(h, w, b))
    return h


def _params(dims, dtype, bias):
    ws = [torch.randn(n, k, device=DEVICE) / k**0.5 for k, n in itertools.pairwise(dims)]
    bs = [torch.randn(n, device=DEVICE) * 0.2 if bias else None for n in dims[1:]]
    return [w.to(dtype) for w in ws], [None if b is None else b.to(dtype) for b in bs]


def _native_grads(x, ws, bs, g, hidden, out, slopes, dtype):
    """(y, dx, dWs, dbs) of native autograd with every tensor cast to ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in [x, *ws]]
    bl = [None if b is None else b.detach().to(dtype).requires_grad_() for b in bs]
    y = native_mlp(leaves[0], leaves[1:], bl, hidden, out, slopes)
    y.backward(g.to(dtype))
    return [
        y,
        leaves[0].grad,
        *(w.grad for w in leaves[1:]),
        *(b.grad for b in bl if b is not None),
    ]


def _run(x, ws, bs, g, hidden, out, slopes):
    """(y, dx, dWs, dbs) of the launchers."""
    stores = (True, _kind(hidden, slopes[0]) == "preact", _kind(out, slopes[1]) == "preact")
    y, saved = fm.mlp_forward(x, ws, bs, hidden, out, slopes, store=stores)
    out_saved = {"preact": saved[-1], "output": y, "none": None}[_kind(out, slopes[1])]
    dx, dws, dbs = fm.mlp_backward(
        g, x, ws, saved[:-1], out_saved, hidden, out, slopes,
        has_bias=tuple(b is not None for b in bs), hidden_preact=stores[1], need_dx=True,
        need_params=True,
    )  # fmt: skip
    return [y, dx, *dws, *(d for d in dbs if d is not None)]


def _max_abs(t: Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def _assert_as_accurate_as_native(got: list[Tensor], x, ws, bs, g, hidden, out, slopes):
    dtype = x.dtype
    native = _native_grads(x, ws, bs, g, hidden, out, slopes, dtype)
    exact = _native_grads(x, ws, bs, g, hidden, out, slopes, torch.float64)
    eps = torch.finfo(dtype).eps
    for i, (ours, nat, ex) in enumerate(zip(got, native, exact, strict=True)):
        assert ours.dtype == dtype and ours.shape == ex.shape, i
        err, err_native = (_max_abs(t.double() - ex) for t in (ours, nat))
        bound = 2 * err_native + 8 * eps * max(_max_abs(ex), 1.0)
        assert err <= bound, f"result {i}: error {err:.3g} > {bound:.3g} (native {err_native:.3g})"


CASES = [
    # dims, hidden activation, output activation, dtype, rows, bias, slope
    ((3, 16, 16, 5), "relu", None, torch.float32, 37, True, 0.01),
    ((3, 20, 17, 5), "gelu", "sigmoid", torch.float16, 37, True, 0.01),
    ((7, 32, 2), "leaky_relu", "leaky_relu", torch.float32, 20, True, -0.5),
    ((5, 64, 64, 3), "silu", "tanh", torch.float16, 37, False, 0.01),
    ((2, 128, 1), "gelu_tanh", None, torch.bfloat16, 19, True, 0.01),
    ((4, 16, 4), None, None, torch.float64, 37, True, 0.01),
    ((6, 9), None, "silu", torch.float32, 37, True, 0.01),
    ((3, *(16,) * 8, 2), "tanh", None, torch.float32, 33, True, 0.01),
]


@pytest.mark.parametrize("dims, hidden, out, dtype, rows, bias, slope", CASES)
def test_forward_and_backward_as_accurate_as_native(
    launches, dims, hidden, out, dtype, rows, bias, slope
):
    ws, bs = _params(dims, dtype, bias)
    x = torch.randn(rows, dims[0], device=DEVICE).to(dtype)
    g = torch.randn(rows, dims[-1], device=DEVICE).to(dtype)
    got = _run(x, ws, bs, g, hidden, out, (slope, slope))
    _assert_as_accurate_as_native(got, x, ws, bs, g, hidden, out, (slope, slope))
    # One forward launch, one backward-chain launch, one weight-gradient launch, and the
    # reduction when the rows span more than one weight-gradient chunk.
    splits, _ = fm.wgrad_splits(rows, len(dims) - 1, 16, cuda=DEVICE == "cuda" and not _INTERPRET)
    assert launches == {
        "mlp_forward_kernel": 1,
        "mlp_backward_kernel": 1,
        "mlp_wgrad_kernel": 1,
        "mlp_wgrad_reduce_kernel": int(splits > 1),
    }


def test_strided_input_and_broadcast_gradient():
    """A column slice as input and the stride-0 gradient ``y.sum().backward()`` hands down."""
    dims, slopes = (5, 16, 3), (0.01, 0.01)
    ws, bs = _params(dims, torch.float32, True)
    x = torch.randn(37, 11, device=DEVICE)[:, 2:7]
    g = torch.ones((), device=DEVICE).expand(37, 3)
    got = _run(x, ws, bs, g, "gelu", None, slopes)
    _assert_as_accurate_as_native(got, x, ws, bs, g, "gelu", None, slopes)


def test_inference_writes_only_the_output(launches):
    ws, bs = _params((3, 16, 16, 2), torch.float32, True)
    x = torch.randn(37, 3, device=DEVICE)
    y, saved = fm.mlp_forward(x, ws, bs, "silu", None, (0.01, 0.01), store=(False,) * 3)
    assert saved == [] and launches["mlp_forward_kernel"] == 1
    torch.testing.assert_close(y, native_mlp(x, ws, bs, "silu", None, (0.01, 0.01)))


def test_zero_rows_launch_nothing(launches):
    ws, bs = _params((3, 16, 2), torch.float32, True)
    x = torch.randn(0, 3, device=DEVICE)
    y, saved = fm.mlp_forward(x, ws, bs, "relu", None, (0.01, 0.01), store=(True, False, False))
    dx, dws, dbs = fm.mlp_backward(
        torch.randn(0, 2, device=DEVICE), x, ws, saved[:-1], None, "relu", None, (0.01, 0.01),
        has_bias=(True, True), hidden_preact=False, need_dx=True, need_params=True,
    )  # fmt: skip
    assert y.shape == (0, 2) and dx.shape == (0, 3)
    assert all(bool((t == 0).all()) for t in [*dws, *dbs])
    assert sum(launches.values()) == 0


def test_gradients_are_bitwise_reproducible():
    ws, bs = _params((3, 32, 32, 4), torch.float32, True)
    x = torch.randn(50, 3, device=DEVICE)
    g = torch.randn(50, 4, device=DEVICE)
    first = _run(x, ws, bs, g, "gelu", None, (0.01, 0.01))
    second = _run(x, ws, bs, g, "gelu", None, (0.01, 0.01))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_weight_gradient_chunks_cover_the_rows_in_fixed_order():
    for rows in (1, 16, 37, 1000, 10**6):
        for layers in (1, 4):
            splits, chunk = fm.wgrad_splits(rows, layers, 64, cuda=True)
            assert chunk % 64 == 0 and (splits - 1) * chunk < rows <= splits * chunk
            assert splits * layers <= max(fm.TARGET_PROGRAMS, layers)
    assert fm.wgrad_splits(10**6, 2, 64, cuda=True) == fm.wgrad_splits(10**6, 2, 64, cuda=True)


def test_supported_shapes():
    cpu = torch.device("cpu")
    assert fm.supports((3, 128, 128, 1), torch.float16, cpu)
    assert not fm.supports((3, 129, 1), torch.float16, cpu)
    assert not fm.supports((3,) * (fm.MAX_LAYERS + 2), torch.float16, cpu)
    assert fm.padded_width((3, 20, 5)) == 32 and fm.padded_width((2, 3)) == 16
    # Every shipped config is compiled by the audit, and IEEE fp32 stops at width 64.
    assert fm.shipped_widths(90, torch.float16, "ieee") == [16, 32, 64, 128]
    assert fm.shipped_widths(80, torch.float32, "ieee") == [16, 32, 64]
    assert fm.shipped_widths(90, torch.float32, "tf32") == [16, 32, 64, 128]


# --------------------------------------------------------------------------------------------
# The MSE loss folded into the last layer (mlp_mse_forward, mlp_backward(loss=...))
# --------------------------------------------------------------------------------------------
def _native_loss_grads(x, ws, bs, t, g, hidden, out, slopes, dtype, reduction):
    """(loss, dx, dWs, dbs) of native autograd, every tensor cast to ``dtype`` (the loss in
    the promoted dtype of the prediction and the target, as F.mse_loss computes it)."""
    leaves = [v.detach().to(dtype).requires_grad_() for v in [x, *ws]]
    bl = [None if b is None else b.detach().to(dtype).requires_grad_() for b in bs]
    y = native_mlp(leaves[0], leaves[1:], bl, hidden, out, slopes)
    t = t.to(torch.float64) if dtype == torch.float64 else t
    loss = F.mse_loss(y, t, reduction=reduction)
    loss.backward(torch.tensor(g, dtype=loss.dtype, device=loss.device))
    return [loss, leaves[0].grad, *(w.grad for w in leaves[1:]),
            *(b.grad for b in bl if b is not None)]  # fmt: skip


def _run_loss(x, t, ws, bs, g, hidden, out, slopes, reduction, loss_dtype):
    """(loss, dx, dWs, dbs) of the launchers, with the mode the dtype calls for."""
    mode = "y"
    pre = (_kind(hidden, slopes[0]) == "preact", _kind(out, slopes[1]) == "preact")
    loss, head, saved = fm.mlp_mse_forward(
        x, t, ws, bs, hidden, out, slopes, reduction=reduction, loss_dtype=loss_dtype,
        mode=mode, hidden_preact=pre[0], out_preact=pre[1],
    )  # fmt: skip
    out_saved = {"preact": saved[-1], "output": head, "none": None}[_kind(out, slopes[1])]
    grad = torch.tensor(g, dtype=loss_dtype, device=DEVICE)
    dx, dws, dbs = fm.mlp_backward(
        head, x, ws, saved[:-1], out_saved, hidden, out, slopes,
        has_bias=tuple(b is not None for b in bs), hidden_preact=pre[0], need_dx=True,
        need_params=True, loss=(grad, t, reduction),
    )  # fmt: skip
    return [loss, dx, *dws, *(d for d in dbs if d is not None)]


LOSS_CASES = [
    # dims, hidden, output activation, dtype, target dtype, rows, reduction
    ((3, 16, 16, 5), "relu", None, torch.float32, torch.float32, 37, "mean"),
    ((3, 20, 17, 5), "gelu", "sigmoid", torch.float16, torch.float16, 37, "sum"),
    ((5, 32, 3), "silu", "gelu", torch.float32, torch.float32, 37, "sum"),
    ((2, 64, 1), "tanh", "leaky_relu", torch.bfloat16, torch.float32, 19, "mean"),
    ((4, 16, 4), "leaky_relu", "silu", torch.float64, torch.float64, 37, "mean"),
    ((6, 9), None, "tanh", torch.float16, torch.float32, 37, "mean"),
]


@pytest.mark.parametrize("dims, hidden, out, dtype, t_dtype, rows, reduction", LOSS_CASES)
def test_folded_loss_as_accurate_as_native(launches, monkeypatch, dims, hidden, out, dtype,
                                           t_dtype, rows, reduction):  # fmt: skip
    counts = {"mlp_loss_reduce_kernel": 0}
    reduce = _Counted(fm.mlp_loss_reduce_kernel, counts, "mlp_loss_reduce_kernel")
    monkeypatch.setattr(fm, "mlp_loss_reduce_kernel", reduce)
    slopes = (-0.3, 0.2)
    ws, bs = _params(dims, dtype, True)
    x = torch.randn(rows, dims[0], device=DEVICE).to(dtype)
    # A strided target: a column slice of a wider tensor, in its own dtype.
    t = torch.randn(rows, dims[-1] + 2, device=DEVICE).to(t_dtype)[:, 1:-1]
    loss_dtype = torch.promote_types(dtype, t_dtype)
    got = _run_loss(x, t, ws, bs, 0.75, hidden, out, slopes, reduction, loss_dtype)
    args = (x, ws, bs, t, 0.75, hidden, out, slopes)
    native = _native_loss_grads(*args, dtype, reduction)
    exact = _native_loss_grads(*args, torch.float64, reduction)
    eps = torch.finfo(dtype).eps
    for i, (ours, nat, ex) in enumerate(zip(got, native, exact, strict=True)):
        assert ours.dtype == nat.dtype and ours.shape == ex.shape, (i, ours.dtype, nat.dtype)
        err, err_native = (_max_abs(v.double() - ex) for v in (ours, nat))
        bound = 2 * err_native + 8 * eps * max(_max_abs(ex), 1.0)
        assert err <= bound, f"result {i}: error {err:.3g} > {bound:.3g} (native {err_native:.3g})"
    # Forward: the MLP with the loss in its epilogue, and the partials' sum; backward as ever.
    splits, _ = fm.wgrad_splits(rows, len(dims) - 1, 16, cuda=DEVICE == "cuda" and not _INTERPRET)
    assert counts == {"mlp_loss_reduce_kernel": 1}
    assert launches == {
        "mlp_forward_kernel": 1,
        "mlp_backward_kernel": 1,
        "mlp_wgrad_kernel": 1,
        "mlp_wgrad_reduce_kernel": int(splits > 1),
    }


def test_folded_loss_value_mode_writes_nothing_but_the_loss(launches):
    ws, bs = _params((3, 16, 16, 2), torch.float32, True)
    x, t = torch.randn(37, 3, device=DEVICE), torch.randn(37, 2, device=DEVICE)
    for reduction in ("mean", "sum"):
        loss, head, saved = fm.mlp_mse_forward(
            x, t, ws, bs, "gelu", None, (0.01, 0.01), reduction=reduction,
            loss_dtype=torch.float32, mode="value", hidden_preact=True, out_preact=False,
        )  # fmt: skip
        assert head is None and saved == []
        want = F.mse_loss(native_mlp(x, ws, bs, "gelu", None, (0.01, 0.01)), t, reduction=reduction)
        torch.testing.assert_close(loss, want)
    assert launches["mlp_forward_kernel"] == 2 and sum(launches.values()) == 2


def test_folded_loss_zero_rows_launch_nothing(launches):
    ws, bs = _params((3, 16, 2), torch.float32, True)
    x, t = torch.randn(0, 3, device=DEVICE), torch.randn(0, 2, device=DEVICE)
    for reduction, want in (("mean", float("nan")), ("sum", 0.0)):
        loss, head, saved = fm.mlp_mse_forward(
            x, t, ws, bs, "relu", None, (0.01, 0.01), reduction=reduction,
            loss_dtype=torch.float32, mode="y", hidden_preact=False, out_preact=False,
        )  # fmt: skip
        torch.testing.assert_close(loss, torch.tensor(want, device=DEVICE), equal_nan=True)
        assert head.shape == (0, 2) and saved[0].shape == (0, 16)
    assert sum(launches.values()) == 0
