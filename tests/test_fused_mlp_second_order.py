"""The fused MLP's second order: an input gradient inside the loss (``create_graph=True``).

The losses of the users who need it: an eikonal term ``(|grad_x u| - 1)^2`` (signed-distance
fields), force matching ``F = -grad_x E`` with an MSE on E and F (interatomic potentials) and a
first-order physics residual (a transport equation). The oracle is the equivalent native
``nn.Sequential`` (``FusedMLP.to_sequential()``) in the same dtype, with float64 as the exact
value: every gradient of every step is as accurate as native's (the bound of
``tests/test_fused_mlp.py``), and float64 gradchecks hold the hand-derived second order (the
R-op of ``manualbp.ops.fused_mlp.reference_second_order`` and its kernel,
``mlp_rop_kernel``) to finite differences. ``backend="triton"`` runs the kernels (under the
CPU interpreter without a GPU); sizes are small and odd for the interpreter's sake.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manualbp
from manualbp.activations import ACTIVATIONS, bind
from manualbp.functional import fused_mlp
from tests.helpers import count_launches

_KERNELS_RUN = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_kernels = pytest.mark.skipif(not _KERNELS_RUN, reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = ("mlp_forward_kernel", "mlp_backward_kernel", "mlp_wgrad_kernel",
           "mlp_wgrad_reduce_kernel", "mlp_rop_kernel")  # fmt: skip
#: Activations whose derivative has a derivative (sigma'' != 0): the second order reads it.
CURVED = [name for name, a in ACTIVATIONS.items() if a.grad2 is not None]


@pytest.fixture
def launches(monkeypatch) -> dict[str, int]:
    from manualbp.kernels import fused_mlp as fm

    return count_launches(monkeypatch, fm, KERNELS)


# --------------------------------------------------------------------------------------------
# The losses, written as their users write them: plain autograd
# --------------------------------------------------------------------------------------------
def eikonal(net, x):
    x = x.detach().requires_grad_()
    u = net(x)
    (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    return ((g.norm(dim=-1) - 1) ** 2).mean() + u.square().mean()


def force_matching(net, x):
    x = x.detach().requires_grad_()
    energy = net(x)
    (grad_e,) = torch.autograd.grad(energy, x, torch.ones_like(energy), create_graph=True)
    forces = -grad_e
    e_ref = x.detach().square().sum(-1, keepdim=True).to(energy.dtype)
    return F.mse_loss(energy, e_ref) + F.mse_loss(forces, -2 * x.detach())


def transport_residual(net, x):
    """``u_t + c . u_s = 0`` on interior points, plus ``u = sin`` on the boundary t = 0."""
    x = x.detach().requires_grad_()
    u = net(x)
    (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    residual = g[..., 0] + 0.5 * g[..., 1:].sum(-1)
    boundary = torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:]], dim=-1).detach()
    u0 = net(boundary)
    return residual.square().mean() + F.mse_loss(u0[..., 0], torch.sin(boundary[:, 1]))


LOSSES = {"eikonal": eikonal, "force": force_matching, "residual": transport_residual}


def _grads(net, loss_fn, x) -> list[torch.Tensor]:
    params = list(net.parameters())
    for p in params:
        p.grad = None
    loss = loss_fn(net, x)
    loss.backward()
    return [loss.detach(), *(p.grad for p in params)]


def _max_abs(t) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def assert_steps_as_accurate_as_native(mlp, loss_fn, x, steps=3, lr=1e-2, backend="triton"):
    """Each of ``steps`` SGD steps of ``mlp``: its loss and gradients at its current weights are
    as accurate as native's at the same weights (float64 exact), then ``mlp`` steps."""
    eps = torch.finfo(x.dtype).eps
    for step in range(steps):
        native = mlp.to_sequential()
        exact = copy.deepcopy(native).double()
        with manualbp.use_backend(backend):
            got = _grads(mlp, loss_fn, x)
        want = _grads(native, loss_fn, x)
        ex = _grads(exact, loss_fn, x.double())
        for i, (ours, nat, e) in enumerate(zip(got, want, ex, strict=True)):
            assert ours.dtype == x.dtype and ours.shape == e.shape, (step, i)
            err, err_native = (_max_abs(t.double() - e) for t in (ours, nat))
            bound = 2 * err_native + 8 * eps * max(_max_abs(e), 1.0)
            assert err <= bound, f"step {step}, result {i}: {err:.3g} > {bound:.3g}"
        with torch.no_grad():
            for p in mlp.parameters():
                p -= lr * p.grad


def _mlp(in_f, hidden, depth, act, out_act=None, dtype=torch.float32, out_f=1, **kw):
    torch.manual_seed(0)
    return manualbp.FusedMLP(in_f, hidden, out_f, depth, act, out_act, device=DEVICE,
                             dtype=dtype, **kw)  # fmt: skip


def _x(rows, features, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, features, generator=g).to(device=DEVICE, dtype=dtype)


# --------------------------------------------------------------------------------------------
# sigma'': the registry's hand-derived second derivatives
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_second_derivative_of_every_activation(name):
    """``grad2(t, s) = t * d act'(s)/ds``, against autograd differentiating the registry's
    own ``grad`` (itself held to native by the first-order tests), and gradchecked."""
    act = bind(name)
    z = torch.linspace(-6, 6, 97, dtype=torch.float64) + 0.013  # no kink hit exactly
    s = act.forward(z) if not act.reads_preact else z
    s = s.detach().requires_grad_()
    t = torch.randn_like(z)
    d = act.grad(torch.ones_like(s), s)  # act'(s): piecewise constant ones do not track s
    want = torch.autograd.grad(d, s, t)[0] if d.requires_grad else torch.zeros_like(z)
    got = act.grad2(t, s.detach())
    if act.fn.grad2 is None:  # piecewise linear: sigma'' = 0
        assert got is None and not want.any()
        return
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda s: act.grad(t, s), (s,))


# --------------------------------------------------------------------------------------------
# Finite differences through the kernels
# --------------------------------------------------------------------------------------------
def _params(mlp):
    return [p.detach().clone().requires_grad_() for p in mlp.parameters()]


@needs_kernels
@pytest.mark.parametrize("activation", CURVED)
def test_input_gradient_is_gradchecked_through_the_kernels(activation, launches):
    """The input gradient ``dx(x, W, b, v)`` as a function in its own right: its derivatives
    (the hand-derived R-op, fused) against finite differences, in float64."""
    out_act = "tanh" if activation == "softplus" else None
    mlp = _mlp(2, 16, 2, activation, out_act, torch.float64, out_f=2)
    params = _params(mlp)
    x = torch.randn(5, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    v = torch.randn(5, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def input_gradient(x, v, *p):
        y = fused_mlp(x, p[0::2], p[1::2], activation, out_act)
        return torch.autograd.grad(y, x, v, create_graph=True)[0]

    with manualbp.use_backend("triton"):
        assert torch.autograd.gradcheck(input_gradient, (x, v, *params), fast_mode=True)
    assert launches["mlp_rop_kernel"] > 0


@needs_kernels
@pytest.mark.parametrize("activation", ["softplus", "sin", "gelu", "relu"])
def test_gradgradcheck_through_the_kernels(activation):
    """The full second order (gradients of dW and db in the loss too: the general path)."""
    mlp = _mlp(3, 16, 2, activation, "tanh", torch.float64, out_f=2)
    params = _params(mlp)
    x = torch.randn(4, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def f(x, *p):
        return fused_mlp(x, p[0::2], p[1::2], activation, "tanh")

    with manualbp.use_backend("triton"):
        assert torch.autograd.gradgradcheck(f, (x, *params), fast_mode=True)


def test_reference_path_is_gradchecked():
    mlp = _mlp(3, 16, 3, "sin", "softplus", torch.float64, out_f=2, negative_slope=2.0)
    params = _params(mlp)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)

    def input_gradient(x, v, *p):
        y = fused_mlp(x, p[0::2], p[1::2], "sin", "softplus", negative_slope=2.0)
        return torch.autograd.grad(y, x, v, create_graph=True)[0]

    with manualbp.use_backend("reference"):
        assert torch.autograd.gradcheck(input_gradient, (x, v, *params))
        assert torch.autograd.gradgradcheck(lambda x, *p: input_gradient(x, v, *p),
                                            (x, *params))  # fmt: skip


# --------------------------------------------------------------------------------------------
# The users' losses, over training steps, against native
# --------------------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize(
    "loss, width, depth, activation, dtype, rows",
    [
        ("eikonal", 16, 1, "softplus", torch.float32, 37),
        ("eikonal", 64, 4, "sin", torch.float32, 19),
        ("eikonal", 128, 1, "softplus", torch.bfloat16, 21),
        ("force", 32, 3, "softplus", torch.float32, 37),
        ("force", 16, 8, "tanh", torch.float32, 23),
        ("force", 64, 2, "silu", torch.float16, 37),
        ("residual", 32, 2, "gelu", torch.float32, 29),
        ("residual", 16, 3, "sin", torch.bfloat16, 37),
        ("eikonal", 32, 2, "relu", torch.float32, 1),
    ],
)
def test_losses_over_steps_match_native(loss, width, depth, activation, dtype, rows, launches):
    mlp = _mlp(3, width, depth, activation, dtype=dtype)
    assert_steps_as_accurate_as_native(mlp, LOSSES[loss], _x(rows, 3, dtype))
    # One per step: the second order ran fused (up to width 64; wider, the R-op in torch ops).
    assert launches["mlp_rop_kernel"] == (3 if width <= 64 else 0)


@needs_kernels
def test_launches_per_eikonal_step(launches):
    """One training step of an eikonal fit: forward 1; the input gradient (the first-order
    chain, recorded; ``autograd.grad(u, x)`` asks for no weight gradient) 1; the second order:
    R-op 1 + its weight gradients 1 + reduction 1, then the forward's backward with the R-op's
    gradients injected 1 + weight gradients 1 + reduction 1. 37 rows: two weight-gradient
    chunks (the reductions run). 8 launches at any depth."""
    mlp = _mlp(3, 32, 2, "softplus")
    with manualbp.use_backend("triton"):
        _grads(mlp, eikonal, _x(37, 3))
    assert launches == dict(mlp_forward_kernel=1, mlp_backward_kernel=2, mlp_wgrad_kernel=2,
                            mlp_wgrad_reduce_kernel=2, mlp_rop_kernel=1)  # fmt: skip


@needs_kernels
def test_an_input_gradient_alone_computes_no_weight_gradient(launches):
    """``autograd.grad(u, x)``: the chain alone, as native computes no dW there; ``backward``
    after it: the weight gradients too."""
    mlp = _mlp(3, 16, 2, "tanh")
    native = mlp.to_sequential()
    x = _x(37, 3).requires_grad_()
    with manualbp.use_backend("triton"):
        (g,) = torch.autograd.grad(mlp(x).sum(), x)
        assert launches["mlp_backward_kernel"] == 1 and launches["mlp_wgrad_kernel"] == 0
        assert all(p.grad is None for p in mlp.parameters())
        mlp(x).sum().backward()
        assert launches["mlp_wgrad_kernel"] == 1
    (want,) = torch.autograd.grad(native(x).sum(), x)
    torch.testing.assert_close(g, want)


@needs_kernels
def test_through_convert_and_sequential(launches):
    torch.manual_seed(0)
    native = nn.Sequential(nn.Linear(2, 32), nn.Softplus(beta=2.0), nn.Linear(32, 32),
                           nn.Softplus(beta=2.0), nn.Linear(32, 1)).to(DEVICE)  # fmt: skip
    ours = manualbp.convert(copy.deepcopy(native))
    x = _x(33, 2)
    with manualbp.use_backend("triton"):
        got = _grads(ours, eikonal, x)
    want = _grads(native, eikonal, x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    assert launches["mlp_rop_kernel"] == 1  # the converted run took the fused second order


@pytest.mark.parametrize("backend", [
    "reference", pytest.param("triton", marks=needs_kernels)])  # fmt: skip
def test_third_order_through_the_reference_ops(backend):
    """A Laplacian in the loss (a third derivative for the weights' gradient): correct through
    the differentiable reference ops, not fused."""
    mlp = _mlp(2, 16, 2, "tanh", dtype=torch.float64)
    native = mlp.to_sequential()
    x = torch.randn(7, 2, dtype=torch.float64)

    def laplacian_loss(net):
        xl = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(net(xl).sum(), xl, create_graph=True)
        lap = sum(torch.autograd.grad(g[:, i].sum(), xl, create_graph=True)[0][:, i]
                  for i in range(2))  # fmt: skip
        return lap.square().mean()

    def grads(net):  # the output bias does not reach a Laplacian
        return torch.autograd.grad(laplacian_loss(net), list(net.parameters()), allow_unused=True,
                                   materialize_grads=True)  # fmt: skip

    with manualbp.use_backend(backend):
        got = grads(mlp)
    want = grads(native)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_zero_rows():
    mlp = _mlp(3, 16, 2, "softplus")
    native = mlp.to_sequential()
    got, want = _grads(mlp, eikonal, _x(0, 3)), _grads(native, eikonal, _x(0, 3))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_sdf_example_runs(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "fit_sdf_eikonal.py"
    spec = importlib.util.spec_from_file_location("fit_sdf_eikonal", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "sdf.png"
    threads = str(torch.get_num_threads())  # the script sets it: keep the suite's
    args = ["--points", "64", "--steps", "3", "--threads", threads, "--out", str(out)]
    assert example.main(args) == 0
    assert out.stat().st_size > 0


def test_a_parameter_that_is_not_a_real_number_is_a_type_error():
    w, x = [torch.randn(4, 3)], torch.randn(2, 3)
    for bad in ("2", True, torch.tensor(2.0)):
        with pytest.raises(TypeError, match="real number"):
            fused_mlp(x, w, [None], "softplus", negative_slope=bad)
    with pytest.raises(TypeError, match="real number"):
        manualbp.Linear(3, 4, activation="sin", negative_slope="1")
