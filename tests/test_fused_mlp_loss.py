"""The MSE loss folded into the fused MLP (``FusedMLP.mse_loss``, ``fused_mlp_mse_loss``, and
``manualbp.Sequential`` ending in a loss), held to native ``nn.Sequential`` + ``nn.MSELoss``.

The oracle is the equivalent native model and ``F.mse_loss`` in the same dtype, with float64
as the exact value: the loss and every gradient must be as accurate as native's (``max |ours -
exact| <= 2 max |native - exact| + 8 eps max |exact|``, as in ``tests/test_fused_mlp.py``).
``backend="triton"`` runs the kernels (the CPU interpreter without a GPU); sizes are small and
odd (37 rows: two 32-row tiles under the interpreter).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manualbp
from manualbp.functional import fused_mlp_mse_loss
from tests.helpers import DEFAULT_TOLERANCES, count_launches
from tests.test_fused_mlp import DEVICE, _max_abs, needs_kernels

FORWARD = ("mlp_forward_kernel", "mlp_loss_reduce_kernel")
BACKWARD = ("mlp_backward_kernel", "mlp_wgrad_kernel", "mlp_wgrad_reduce_kernel")


@pytest.fixture
def launches(monkeypatch) -> dict[str, int]:
    """Launch counts of the fused-MLP kernels during the test."""
    from manualbp.kernels import fused_mlp as fm

    return count_launches(monkeypatch, fm, FORWARD + BACKWARD)


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _loss_results(loss_fn, model, x, t, g):
    """The loss, the input gradient and the parameter gradients for upstream gradient ``g``."""
    x = _leaf(x)
    model.zero_grad()
    loss = loss_fn(model, x, t)
    loss.backward(torch.tensor(g, dtype=loss.dtype, device=loss.device))
    return [loss, x.grad, *(p.grad for p in model.parameters())]


def _native_loss(reduction):
    return lambda model, x, t: F.mse_loss(model(x), t, reduction=reduction)


def assert_loss_as_accurate_as_native(ours, native, x, t, reduction="mean", g=1.0,
                                      backend="triton"):  # fmt: skip
    """``ours(model, x, t)`` on ``native``'s twin against ``F.mse_loss(native(x), t)``."""
    model, fn = ours
    with manualbp.use_backend(backend):
        got = _loss_results(fn, model, x, t, g)
    want = _loss_results(_native_loss(reduction), native, x, t, g)
    exact_model = copy.deepcopy(native).double()
    exact = _loss_results(_native_loss(reduction), exact_model, x.double(), t.double(), g)
    eps = torch.finfo(x.dtype).eps
    for i, (a, nat, ex) in enumerate(zip(got, want, exact, strict=True)):
        assert a.dtype == nat.dtype and a.shape == ex.shape, (i, a.dtype, nat.dtype)
        if i == 0 and ex.isnan():
            assert a.isnan(), "the mean over no elements is NaN"
            continue
        err, err_native = (_max_abs(v.double() - ex) for v in (a, nat))
        bound = 2 * err_native + 8 * eps * max(_max_abs(ex), 1.0)
        assert err <= bound, f"result {i}: error {err:.3g} > {bound:.3g} (native {err_native:.3g})"


def _mlp(in_f, hidden, out_f, depth, act, out_act=None, dtype=torch.float32, **kw):
    mlp = manualbp.FusedMLP(in_f, hidden, out_f, depth, act, out_act, device=DEVICE,
                            dtype=dtype, **kw)  # fmt: skip
    return mlp, mlp.to_sequential()


def _mse_loss(reduction):
    return lambda mlp, x, t: mlp.mse_loss(x, t, reduction)


def _data(rows, in_f, out_f, dtype=torch.float32):
    x = torch.randn(rows, in_f, device=DEVICE).to(dtype)
    return x, torch.randn(rows, out_f, device=DEVICE).to(dtype)


# --------------------------------------------------------------------------------------------
# FusedMLP.mse_loss through the kernels
# --------------------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize(
    "dtype, hidden_act, out_act, reduction, rows",
    [
        (torch.float32, "gelu", None, "mean", 37),
        (torch.float32, "relu", "sigmoid", "sum", 37),  # the output activation reads y
        (torch.float32, "tanh", "silu", "mean", 5),  # ... and z
        (torch.float16, "silu", None, "mean", 37),
        (torch.float16, "relu", "gelu_tanh", "sum", 37),
        (torch.bfloat16, "gelu", "tanh", "mean", 19),
        (torch.float64, "leaky_relu", "leaky_relu", "sum", 37),
    ],
)
def test_mse_loss_matches_native(dtype, hidden_act, out_act, reduction, rows):
    mlp, native = _mlp(3, 16, 5, 2, hidden_act, out_act, dtype, negative_slope=-0.2)
    x, t = _data(rows, 3, 5, dtype)
    assert_loss_as_accurate_as_native((mlp, _mse_loss(reduction)), native, x, t, reduction)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])  # fmt: skip
def test_upstream_gradient_is_applied_before_rounding(dtype):
    # A GradScaler's scale g: dY = g * 2 (y - t) / N must be formed before it is rounded to
    # the dtype (as native CUDA and autocast do): 2 (y - t) / N alone is a float16 subnormal
    # here (N = 512, y - t ~ 1e-3). Oracle: native autograd of the same MLP, fed that dY
    # formed in float64 from its own prediction and rounded once.
    mlp, native = _mlp(3, 16, 1, 1, "relu", dtype=dtype)
    x = torch.randn(512, 3, device=DEVICE).to(dtype)
    with torch.no_grad():
        t = (native(x).float() + 1e-3 * torch.randn(512, 1, device=DEVICE)).to(dtype)
    g = 2.0**10
    with manualbp.use_backend("triton"):
        got = _loss_results(_mse_loss("mean"), mlp, x, t, g)[1:]
    x_native = _leaf(x)
    y = native(x_native)
    y.backward((g * 2 * (y.double() - t.double()) / y.numel()).to(dtype))
    want = [x_native.grad, *(p.grad for p in native.parameters())]
    rtol, atol = DEFAULT_TOLERANCES[dtype]
    for ours, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol)


@needs_kernels
def test_leading_dims_zero_rows_and_no_bias():
    mlp, native = _mlp(4, 16, 3, 2, "gelu", bias=False)
    x, t = torch.randn(3, 5, 4, device=DEVICE), torch.randn(3, 5, 3, device=DEVICE)
    assert_loss_as_accurate_as_native((mlp, _mse_loss("mean")), native, x, t)
    for reduction in ("mean", "sum"):  # mean: NaN, as natively; the gradients are zeros
        x, t = _data(0, 4, 3)
        assert_loss_as_accurate_as_native((mlp, _mse_loss(reduction)), native, x, t, reduction)


@needs_kernels
def test_launch_counts(launches):
    mlp, _ = _mlp(3, 16, 2, 2, "gelu")
    x, t = _data(37, 3, 2)
    x.requires_grad_()
    with manualbp.use_backend("triton"):
        loss = mlp.mse_loss(x, t)
        # The MLP with the loss in its epilogue, then the fixed-order sum of its partials.
        assert launches == {**dict.fromkeys(BACKWARD, 0), **dict.fromkeys(FORWARD, 1)}
        loss.backward()
        # The chain, the weight gradients, their reduction (37 rows: two chunks).
        assert all(launches[k] == 1 for k in BACKWARD)
        with torch.no_grad():
            assert mlp.mse_loss(x, t).grad_fn is None
    assert launches["mlp_forward_kernel"] == 2 and sum(launches.values()) == 7


@needs_kernels
def test_gradients_are_bitwise_reproducible():
    mlp, _ = _mlp(3, 32, 4, 2, "silu")
    x, t = _data(50, 3, 4)
    runs = []
    with manualbp.use_backend("triton"):
        for _ in range(2):
            runs.append(_loss_results(_mse_loss("mean"), mlp, x, t, 1.0))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@needs_kernels
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_through_the_kernels(reduction):
    mlp, _ = _mlp(2, 16, 2, 1, "silu", "tanh", torch.float64)
    params = [p.detach().clone().requires_grad_() for p in mlp.parameters()]
    x, t = _data(5, 2, 2, torch.float64)
    x.requires_grad_()

    def f(x, *p):
        return fused_mlp_mse_loss(x, t, p[0::2], p[1::2], "silu", "tanh", reduction)

    with manualbp.use_backend("triton"):
        assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)
        # Double backward: the backward reruns the forward in reference ops.
        assert torch.autograd.gradgradcheck(f, (x, *params), fast_mode=True)


# --------------------------------------------------------------------------------------------
# The reference path, and what runs unfused (each still equal to native)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_path_matches_native(dtype):
    mlp, native = _mlp(5, 24, 3, 3, "leaky_relu", "sigmoid", dtype)
    x, t = _data(17, 5, 3, dtype)
    for reduction in ("mean", "sum"):
        assert_loss_as_accurate_as_native((mlp, _mse_loss(reduction)), native, x, t, reduction,
                                          backend="reference")  # fmt: skip


@needs_kernels
def test_unfolded_cases_match_native(launches):
    mlp, native = _mlp(3, 16, 2, 1, "relu")
    x, t = _data(9, 3, 2)
    with manualbp.use_backend("triton"):
        got = mlp.mse_loss(x, t, "none")
    torch.testing.assert_close(got, F.mse_loss(native(x), t, reduction="none"))
    # A target that promotes the loss (float64), one that requires grad, one that broadcasts.
    assert_loss_as_accurate_as_native((mlp, _mse_loss("sum")), native, x, t.double(), "sum")
    t_grad = _leaf(t)
    with manualbp.use_backend("triton"):
        mlp.mse_loss(x, t_grad).backward()
    t_native = _leaf(t)
    F.mse_loss(native(x), t_native).backward()
    torch.testing.assert_close(t_grad.grad, t_native.grad)
    assert launches["mlp_loss_reduce_kernel"] == 0
    with (
        pytest.warns(UserWarning, match="target size") as ours_warned,
        manualbp.use_backend("triton"),
    ):
        got = mlp.mse_loss(x, t[:1])
    with pytest.warns(UserWarning, match="target size"):
        want = F.mse_loss(native(x), t[:1])
    assert len([w for w in ours_warned if "target size" in str(w.message)]) == 1
    torch.testing.assert_close(got, want)


def test_bad_shapes_raise_as_natively():
    mlp, native = _mlp(3, 16, 2, 1, "relu")
    x, t = _data(9, 3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the size warning before the error, as natively
        with pytest.raises(RuntimeError):
            F.mse_loss(native(x), t[:, :1].expand(9, 3))
        with pytest.raises(RuntimeError, match="broadcast"):
            mlp.mse_loss(x, t[:, :1].expand(9, 3))
    with pytest.raises(RuntimeError):
        native(x[:, :2])
    with pytest.raises(RuntimeError):  # a ShapeError: a RuntimeError and a ValueError
        mlp.mse_loss(x[:, :2], t)
    with pytest.raises(ValueError, match="reduction"):
        mlp.mse_loss(x, t, "avg")


def test_torch_func_and_forward_mode_run_unfused_as_natively():
    mlp, native = _mlp(3, 16, 2, 1, "tanh", "silu")
    x, t = _data(5, 3, 2)
    got = torch.func.grad(lambda r: mlp.mse_loss(r, t))(x)
    torch.testing.assert_close(got, torch.func.grad(lambda r: F.mse_loss(native(r), t))(x))
    tangent = torch.randn_like(x)
    _, got = torch.func.jvp(lambda r: mlp.mse_loss(r, t, "sum"), (x,), (tangent,))
    _, want = torch.func.jvp(lambda r: F.mse_loss(native(r), t, reduction="sum"), (x,),
                             (tangent,))  # fmt: skip
    torch.testing.assert_close(got, want)


def test_autocast_loss_in_float32_as_natively():
    mlp, native = _mlp(3, 16, 2, 1, "relu")
    x, t = _data(9, 3, 2)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, want = mlp.mse_loss(x, t), F.mse_loss(native(x), t)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------
# manualbp.Sequential ending in a loss: called as seq(x, target)
# --------------------------------------------------------------------------------------------
def _native_body():
    return nn.Sequential(nn.Linear(3, 16, device=DEVICE), nn.Tanh(),
                         nn.Linear(16, 16, device=DEVICE), nn.Tanh(),
                         nn.Linear(16, 4, device=DEVICE))  # fmt: skip


class _WithTarget(nn.Module):
    """Holds ``seq`` (its parameters) for the helpers, which call ``seq(x, target)``."""

    def __init__(self, seq):
        super().__init__()
        self.seq = seq


def _seq_loss(model, x, t):
    return model.seq(x, t)


@needs_kernels
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sequential_folds_a_trailing_mse_loss(launches, reduction):
    native = _native_body()
    ours = manualbp.convert(copy.deepcopy(nn.Sequential(*native, nn.MSELoss(reduction=reduction))))
    assert type(ours[-1]) is manualbp.MSELoss
    x, t = _data(37, 3, 4)
    assert_loss_as_accurate_as_native((_WithTarget(ours), _seq_loss), native, x, t, reduction)
    assert launches["mlp_loss_reduce_kernel"] == 1 and launches["mlp_forward_kernel"] == 1


@needs_kernels
def test_sequential_folds_a_linear_mse_head(launches):
    native = _native_body()
    head = manualbp.LinearMSELoss(16, 4, device=DEVICE)
    head.load_state_dict(native[4].state_dict())
    ours = manualbp.convert(copy.deepcopy(native[:4]))
    ours.append(head)
    x, t = _data(37, 3, 4)
    assert_loss_as_accurate_as_native((_WithTarget(ours), _seq_loss), native, x, t)
    assert launches["mlp_loss_reduce_kernel"] == 1 and launches["mlp_forward_kernel"] == 1
    assert list(ours.state_dict()) == list(native.state_dict())


@needs_kernels
def test_sequential_runs_the_loss_as_a_module_where_it_cannot_fold(launches):
    native = _native_body()
    ours = manualbp.convert(copy.deepcopy(nn.Sequential(*native, nn.MSELoss())))
    x, t = _data(9, 3, 4)
    seen = []
    handle = ours[-1].register_forward_hook(lambda m, i, o: seen.append(o))
    assert_loss_as_accurate_as_native((_WithTarget(ours), _seq_loss), native, x, t)
    handle.remove()
    assert len(seen) == 1 and launches["mlp_loss_reduce_kernel"] == 0
    assert launches["mlp_forward_kernel"] == 1  # the run itself is still fused
    # Unfused pairs on the reference path; reduction "none": the loss module's own result.
    assert_loss_as_accurate_as_native((_WithTarget(ours), _seq_loss), native, x, t,
                                      backend="reference")  # fmt: skip
    ours[-1].reduction = "none"
    with manualbp.use_backend("triton"):
        got = ours(x, t)
    torch.testing.assert_close(got, F.mse_loss(native(x), t, reduction="none"))
    assert launches["mlp_loss_reduce_kernel"] == 0


def test_sequential_target_argument_errors():
    body = manualbp.convert(_native_body())
    x, t = _data(4, 3, 4)
    with pytest.raises(TypeError, match="got a target, but its last module is"):
        body(x, t)
    with_loss = manualbp.convert(nn.Sequential(*_native_body(), nn.MSELoss()))
    with pytest.raises(TypeError):  # the loss gets no target, as in nn.Sequential
        with_loss(x)
    torch.testing.assert_close(with_loss(x, t), F.mse_loss(with_loss[:-1](x), t))
