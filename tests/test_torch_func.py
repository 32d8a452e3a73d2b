"""torch.func: grad and vmap work over manualbp's functional ops; forward-mode AD does not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap
from torch.testing import assert_close

from manualbp import functional


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


def test_forward_mode_ad_through_the_function_is_a_clear_error():
    import torch.autograd.forward_ad as fwAD

    x, w = torch.randn(4, 5), torch.randn(3, 5, requires_grad=True)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="jvp"):
        functional.linear(x, fwAD.make_dual(w, torch.ones_like(w)), None, "relu")
