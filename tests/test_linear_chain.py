"""Cross-layer activation-gradient fusion: ``manualbp.ops.linear_chain``, held to native.

The oracle is the unfused native pair, ``F.linear`` followed by the activation's native module
(``nn.GELU``, ...) twice, run in the same dtype, with float64 as the exact value: the fused
chain must be as accurate as native for the output and every gradient (``max |ours - exact|
<= 2 max |native - exact| + 8 eps max |exact|``, the criterion of ``tests/test_fused_mlp.py``).
``backend="triton"`` runs the kernels (under the CPU interpreter without a GPU); sizes are
small and odd (13 -> 21 -> 11 features) for the interpreter's sake.
"""

from __future__ import annotations

import copy
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import manualbp
from manualbp.ops.linear_chain import LinearChainFunction, linear_chain
from tests.helpers import (
    ACTIVATION_CASES,
    ACTIVATION_NAMES,
    count_launches,
    make_layout,
    native_activation,
)

_KERNELS_RUN = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in (
    "",
    "0",
)
needs_kernels = pytest.mark.skipif(not _KERNELS_RUN, reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K_, H_, N_ = 13, 21, 11


def _native(x, w1, b1, a1, w2, b2, a2, s1=0.01, s2=0.01):
    h = native_activation(a1, s1)(F.linear(x, w1, b1))
    return native_activation(a2, s2)(F.linear(h, w2, b2))


def _params(dtype, bias=True, layout="contiguous"):
    kw = dict(dtype=torch.float64, device=DEVICE)
    w1 = make_layout((H_, K_), layout, **kw) / K_**0.5
    w2 = make_layout((N_, H_), layout, **kw) / H_**0.5
    b1, b2 = (torch.randn(n, **kw) if bias else None for n in (H_, N_))
    return [None if t is None else t.to(dtype) for t in (w1, b1, w2, b2)]


def _results(fn, x, params):
    """Output and the gradients of every tensor input for ``loss = sum(y * g)``."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, *params)]
    x_, w1, b1, w2, b2 = leaves
    y = fn(x_, w1, b1, w2, b2)
    g = torch.linspace(-1, 1, y.numel(), dtype=torch.float64, device=DEVICE).reshape(y.shape)
    y.backward(g.to(y.dtype))
    return y, [y.detach(), *(t.grad for t in leaves if t is not None)]


def _max_abs(t) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def assert_as_accurate_as_native(x, params, a1, a2, s1=0.01, s2=0.01, backend="triton"):
    def ours(x, w1, b1, w2, b2):
        return linear_chain(x, w1, b1, a1, w2, b2, a2, negative_slope=s1, negative_slope2=s2)

    def native(x, w1, b1, w2, b2):
        return _native(x, w1, b1, a1, w2, b2, a2, s1, s2)

    with manualbp.use_backend(backend):
        y, got = _results(ours, x, params)
    _, want = _results(native, x, params)
    _, exact = _results(native, x.double(), [p if p is None else p.double() for p in params])
    eps = torch.finfo(x.dtype).eps
    for i, (o, nat, ex) in enumerate(zip(got, want, exact, strict=True)):
        assert o.dtype == x.dtype and o.shape == ex.shape, i
        err, err_native = (_max_abs(t.double() - ex) for t in (o, nat))
        bound = 2 * err_native + 8 * eps * max(_max_abs(ex), 1.0)
        assert err <= bound, f"result {i}: error {err:.3g} > {bound:.3g} (native {err_native:.3g})"
    return y


@pytest.fixture
def launches(monkeypatch) -> dict[str, int]:
    """Launch counts of the Linear backward's kernels during the test."""
    from manualbp.kernels import linear as lb

    return count_launches(monkeypatch, lb, ("act_grad_kernel", "chain_grad_kernel"))


# --------------------------------------------------------------------------------------------
# Parity with the unfused native pair, through the kernels
# --------------------------------------------------------------------------------------------
_SECOND = {a: b for a, b in zip(ACTIVATION_NAMES, ACTIVATION_NAMES[1:] + ACTIVATION_NAMES[:1])}


@needs_kernels
@pytest.mark.parametrize("activation, slope", ACTIVATION_CASES)
def test_every_activation_matches_the_unfused_pair(activation, slope):
    """Each activation between the layers (the fused epilogue's) and, rotated, after them."""
    params = _params(torch.float32)
    x = torch.randn(2, 9, K_, device=DEVICE)  # leading dims: 18 rows
    y = assert_as_accurate_as_native(x, params, activation, _SECOND[activation], slope, slope)
    assert type(y.grad_fn).__name__ == "LinearChainFunctionBackward"


@needs_kernels
@pytest.mark.parametrize(
    "dtype, a1, a2, layout",
    [
        (torch.float16, "gelu", "relu", "transposed"),
        (torch.bfloat16, "silu", None, "contiguous"),
        (torch.float64, "tanh", "sigmoid", "noncontig"),
        (torch.float32, "gelu_tanh", "gelu", "transposed"),
    ],
    ids=str,
)
def test_dtypes_and_layouts_match_the_unfused_pair(dtype, a1, a2, layout):
    params = _params(dtype, layout=layout)
    x = make_layout((19, K_), layout, dtype=torch.float64, device=DEVICE).to(dtype)
    if layout != "contiguous":
        x = torch.randn(K_, 19, dtype=torch.float64, device=DEVICE).to(dtype).t()
    assert_as_accurate_as_native(x, params, a1, a2)


@needs_kernels
def test_without_bias_and_with_zero_rows():
    assert_as_accurate_as_native(torch.randn(7, K_, device=DEVICE), _params(torch.float32, False),
                                 "relu", "tanh")  # fmt: skip
    assert_as_accurate_as_native(torch.randn(0, K_, device=DEVICE), _params(torch.float32),
                                 "gelu", None)  # fmt: skip
    assert_as_accurate_as_native(torch.randn(3, 0, K_, device=DEVICE), _params(torch.float32),
                                 "silu", "relu")  # fmt: skip


@needs_kernels
def test_the_lower_activation_gradient_is_fused(launches):
    """Backward: one elementwise pass (the upper layer's act') and one fused GEMM that applies
    the lower layer's act' and its bias partials; no elementwise pass over dZ_1."""
    x = torch.randn(17, K_, device=DEVICE, requires_grad=True)
    w1, b1, w2, b2 = (p.requires_grad_() for p in _params(torch.float32))
    with manualbp.use_backend("triton"):
        y = linear_chain(x, w1, b1, "gelu", w2, b2, "silu")
        y.sum().backward()
    assert launches == {"act_grad_kernel": 1, "chain_grad_kernel": 1}


@needs_kernels
def test_frozen_lower_layer_needs_no_chain(launches):
    """Only the upper layer's parameters train: the lower layer's dZ is never formed."""
    x = torch.randn(17, K_, device=DEVICE)
    w1, b1, w2, b2 = _params(torch.float32)
    w2.requires_grad_()
    with manualbp.use_backend("triton"):
        y = linear_chain(x, w1, b1, "relu", w2, b2, None)
        (dw2,) = torch.autograd.grad(y, w2, torch.ones_like(y))
    assert launches["chain_grad_kernel"] == 0
    h = F.relu(F.linear(x.double(), w1.double(), b1.double()))
    torch.testing.assert_close(dw2.double(), torch.ones(17, N_, dtype=torch.float64).T @ h)


@needs_kernels
def test_gradcheck_through_the_kernels():
    """fp64 gradcheck of every input through the Triton kernels; gradgradcheck (the backward
    is then recorded: it recomputes the forward and runs the reference ops)."""
    kw = dict(dtype=torch.float64, device=DEVICE, requires_grad=True)
    x, w1, b1 = torch.randn(4, 3, **kw), torch.randn(5, 3, **kw), torch.randn(5, **kw)
    w2, b2 = torch.randn(2, 5, **kw), torch.randn(2, **kw)

    def f(x, w1, b1, w2, b2):
        return linear_chain(x, w1, b1, "silu", w2, b2, "tanh")

    with manualbp.use_backend("triton"):
        assert type(f(x, w1, b1, w2, b2).grad_fn).__name__ == "LinearChainFunctionBackward"
        assert torch.autograd.gradcheck(f, (x, w1, b1, w2, b2), fast_mode=True)
        assert torch.autograd.gradgradcheck(f, (x, w1, b1, w2, b2), fast_mode=True)


# --------------------------------------------------------------------------------------------
# The reference backend, the fallbacks and bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a1, a2", [("gelu", "leaky_relu"), ("sigmoid", None)])
def test_reference_backend_matches_the_unfused_pair(a1, a2):
    """The Function on the reference backend (the two layers' plain-torch math), applied
    directly: linear_chain itself runs the layers one by one there."""

    def ours(x, w1, b1, w2, b2):
        return LinearChainFunction.apply(x, w1, b1, w2, b2, a1, 0.01, a2, 0.01)[0]

    params = _params(torch.float32)
    x = torch.randn(23, K_, device=DEVICE)
    with manualbp.use_backend("reference"):
        _, got = _results(ours, x, params)
    _, want = _results(lambda *t: _native(*t[:3], a1, *t[3:], a2), x, params)
    for o, w in zip(got, want, strict=True):
        torch.testing.assert_close(o, w)


def test_runs_layer_by_layer_where_fusion_does_not_apply():
    x = torch.randn(5, K_, device=DEVICE, requires_grad=True)
    w1, b1, w2, b2 = _params(torch.float32)
    with manualbp.use_backend("reference"):
        y = linear_chain(x, w1, b1, "relu", w2, b2, "gelu")
    assert type(y.grad_fn).__name__ == "LinearFunctionBackward"
    torch.testing.assert_close(y, _native(x, w1, b1, "relu", w2, b2, "gelu"))
    with torch.no_grad():
        assert linear_chain(x, w1, b1, "relu", w2, b2, None).grad_fn is None


def test_bad_input_raises_as_native():
    x = torch.randn(5, K_, device=DEVICE)
    w1, b1, w2, b2 = _params(torch.float32)
    with pytest.raises(RuntimeError):  # second layer's in_features != first's out_features
        linear_chain(x, w1, b1, "relu", w2[:, :-1], b2, None)
    with pytest.raises(RuntimeError):
        F.linear(F.linear(x, w1, b1), w2[:, :-1], b2)
    with pytest.raises(ValueError, match="unknown activation"):
        linear_chain(x, w1, b1, "relu6", w2, b2, None)
    with pytest.raises(RuntimeError, match="same dtype"):  # as natively
        linear_chain(x, w1.double(), b1, "relu", w2, b2, None)


# ---------------------------------------------------------------------------------------------
# The container: manualbp.Sequential runs Linear -> act -> Linear pairs through the chain.
# ---------------------------------------------------------------------------------------------
def _stack(widths, acts, dtype=torch.float64):
    layers = []
    for (k, n), act in zip(itertools.pairwise(widths), acts, strict=True):
        layers.append(torch.nn.Linear(k, n, dtype=dtype, device=DEVICE))
        if act is not None:
            layers.append(native_activation(act))
    return torch.nn.Sequential(*layers)


@needs_kernels
@pytest.mark.parametrize("acts", [("gelu", "relu", None), ("silu", None, "tanh")])
def test_sequential_runs_pairs_through_the_chain(acts):
    """Children Linear, act, Linear, act, Linear (fused MLP off, so that the narrow test widths
    take the pair path): the first two layers run as one chain node, the third as a fused
    pair; outputs and every gradient equal the native container's."""
    torch.manual_seed(0)
    native = _stack((K_, H_, N_, 7), acts)
    ours = manualbp.convert(copy.deepcopy(native))
    ours.fuse_mlp = False
    x = torch.randn(9, K_, dtype=torch.float64, device=DEVICE, requires_grad=True)
    x_ = x.detach().clone().requires_grad_()
    with manualbp.use_backend("triton"):
        y = ours(x_)
        nodes = set()
        stack = [y.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and node not in nodes:
                nodes.add(node)
                stack.extend(f for f, _ in node.next_functions)
        assert any(type(n).__name__.startswith("LinearChainFunction") for n in nodes)
        y.sum().backward()
    native(x).sum().backward()
    torch.testing.assert_close(y, native(x))
    torch.testing.assert_close(x_.grad, x.grad)
    for (name, p), (_, q) in zip(ours.named_parameters(), native.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_sequential_chain_pairs_skip_hooked_layers():
    native = _stack((K_, H_, N_), ("gelu", None))
    ours = manualbp.convert(copy.deepcopy(native))
    assert ours.chain_pairs() == []  # narrow: a fused MLP run takes the layers first
    ours.fuse_mlp = False
    assert ours.chain_pairs() == [("0", "2")]
    ours[2].register_forward_hook(lambda *a: None)
    assert ours.chain_pairs() == []
