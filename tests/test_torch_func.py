"""torch.func and forward-mode AD over manualbp's functional ops, against native PyTorch."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap
from torch.testing import assert_close

from manualbp import functional
from manualbp.testing import ACTIVATION_NAMES, native_activation


def test_grad_of_linear_and_mse_matches_native():
    x, t = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    w, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)

    def ours(w, b):
        return functional.mse_loss(functional.linear(x, w, b, "gelu"), t)

    def native(w, b):
        return F.mse_loss(F.gelu(F.linear(x, w, b)), t)

    for got, want in zip(grad(ours, argnums=(0, 1))(w, b), grad(native, argnums=(0, 1))(w, b)):
        assert_close(got, want)


def test_per_sample_gradients_with_vmap_of_grad():
    x, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    w = torch.randn(3, 5, dtype=torch.float64)

    def loss(w, xi, ti):
        return functional.mse_loss(functional.linear(xi, w, None, "tanh"), ti)

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(w, x, t)
    for i in range(6):
        wi = w.clone().requires_grad_()
        F.mse_loss(torch.tanh(F.linear(x[i], wi)), t[i]).backward()
        assert_close(per_sample[i], wi.grad)


def test_vmap_of_forward():
    xs = torch.randn(4, 7, 5)
    w = torch.randn(3, 5)
    assert_close(vmap(lambda x: functional.linear(x, w, None, "silu"))(xs), F.silu(xs @ w.T))


def test_forward_mode_ad_through_the_forward_ops():
    # Where nothing requires grad, the forward runs as plain differentiable ops, so
    # torch.func.jvp sees their tangents.
    x, w, v = torch.randn(4, 5), torch.randn(3, 5), torch.randn(3, 5)
    _, got = torch.func.jvp(lambda w: functional.linear(x, w, None, "gelu"), (w,), (v,))
    _, want = torch.func.jvp(lambda w: F.gelu(F.linear(x, w)), (w,), (v,))
    assert_close(got, want)


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_forward_mode_ad_through_the_function_matches_native(activation):
    import torch.autograd.forward_ad as fwAD

    dt = dict(dtype=torch.float64)
    x, w, b = torch.randn(4, 5, **dt), torch.randn(3, 5, **dt), torch.randn(3, **dt)
    tx, tw, tb = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    act = native_activation(activation, -0.2)
    got_t = {}
    for key, fn in (
        ("ours", lambda x, w, b: functional.linear(x, w, b, activation, negative_slope=-0.2)),
        ("native", lambda x, w, b: act(F.linear(x, w, b))),
    ):
        with fwAD.dual_level():
            # requires_grad makes manualbp take its autograd Function (not plain ops).
            duals = [fwAD.make_dual(p.requires_grad_(), t) for p, t in ((x, tx), (w, tw), (b, tb))]
            out = fn(*duals)
            got_t[key] = fwAD.unpack_dual(out).tangent
    assert_close(got_t["ours"], got_t["native"])


@pytest.mark.parametrize("activation", ["gelu", "tanh", "leaky_relu"])
def test_jvp_jacfwd_and_hessian_match_native(activation):
    dt = dict(dtype=torch.float64)
    x, w, b = torch.randn(4, 5, **dt), torch.randn(3, 5, **dt), torch.randn(3, **dt)
    y = torch.randn(4, 3, **dt)
    act = native_activation(activation, 0.1)

    def ours(w):
        out = functional.linear(x, w, b, activation, negative_slope=0.1)
        return functional.mse_loss(out, y)

    def native(w):
        return F.mse_loss(act(F.linear(x, w, b)), y)

    v = torch.randn_like(w)
    assert_close(torch.func.jvp(ours, (w,), (v,)), torch.func.jvp(native, (w,), (v,)))
    assert_close(torch.func.jacfwd(ours)(w), torch.func.jacfwd(native)(w))
    assert_close(torch.func.hessian(ours)(w), torch.func.hessian(native)(w))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_forward_mode_matches_native_with_broadcast(reduction):
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 3, dtype=torch.float32, requires_grad=True)
    tx, tt = torch.randn_like(x), torch.randn_like(t)
    got = {}
    for key, fn in (("ours", functional.mse_loss), ("native", F.mse_loss)):
        with fwAD.dual_level(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the size-mismatch warning, on purpose
            out = fn(fwAD.make_dual(x, tx), fwAD.make_dual(t, tt), reduction=reduction)
            got[key] = fwAD.unpack_dual(out).tangent
    assert_close(got["ours"], got["native"])


@pytest.mark.parametrize("op", ["linear", "mse_loss"])
def test_backward_using_a_tensor_saved_under_a_finished_vjp(op):
    """A custom Function's backward that calls the op on a tensor it saved inside
    ``torch.func.vjp`` runs after vjp has returned (the saved tensor is then a dead functorch
    wrapper, which autograd.Function unwraps): the gradient must reach the real input, as with
    the native op."""
    eye, zero = torch.eye(4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64)

    def apply(kind: str, x):
        if op == "linear":
            return functional.linear(x, eye) if kind == "ours" else F.linear(x, eye)
        loss = functional.mse_loss if kind == "ours" else F.mse_loss
        return loss(x, zero, reduction="none") / x  # = x

    def square(kind: str):
        class Square(torch.autograd.Function):
            @staticmethod
            def forward(x):
                return x**2

            @staticmethod
            def setup_context(ctx, inputs, output):
                ctx.save_for_backward(inputs[0])

            @staticmethod
            def backward(ctx, gy):
                (x,) = ctx.saved_tensors
                return 2 * gy * apply(kind, x)

        return Square

    grads = {}
    for kind in ("native", "ours"):
        torch.manual_seed(0)
        x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        gy = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        _, vjp_fn = torch.func.vjp(square(kind).apply, x)
        (r,) = vjp_fn(gy)
        grads[kind] = torch.autograd.grad(r.sum(), (x, gy), allow_unused=True)
    for got, want in zip(grads["ours"], grads["native"], strict=True):
        assert want is not None and got is not None
        assert_close(got, want)
