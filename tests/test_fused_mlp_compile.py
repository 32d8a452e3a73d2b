"""The fused MLP under ``torch.compile``: its kernels are ``torch.library`` custom ops
(``manualbp::mlp_forward``, ``mlp_mse_forward``, ``mlp_backward``), so a compiled model keeps
them. Parity is checked against the same model run eagerly and against native; the graphs
that AOTAutograd hands to its compilers must hold the custom ops (no layer-by-layer
fallback). ``backend="aot_eager"``-style compilers run the graphs without Inductor: cheap on
CPU, where the kernels run under Triton's interpreter.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from manualbp.kernels import library as ops
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch.testing import assert_close

import manualbp
from tests.test_fused_mlp import DEVICE, needs_kernels

pytestmark = [needs_kernels, pytest.mark.slow]


def _recording_backend() -> tuple[object, list[set[str]]]:
    """An aot_eager backend that records the ops of each forward / backward graph."""
    graphs: list[set[str]] = []

    def compiler(gm, _example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler), graphs


def _grads(fn, model, *args):
    x = args[0].detach().clone().requires_grad_()
    model.zero_grad()
    out = fn(model, x, *args[1:])
    out.backward(torch.ones_like(out))
    return [out.detach(), x.grad, *(p.grad.clone() for p in model.parameters())]


def _compiled_matches_eager(fn, model, *args, forward_op: str):
    backend, graphs = _recording_backend()
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    with manualbp.use_backend("triton"):
        got = _grads(compiled, model, *args)
        want = _grads(fn, model, *args)
    torch._dynamo.reset()
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)
    forward, backward = graphs
    assert f"manualbp.{forward_op}.default" in forward, forward
    assert "manualbp.mlp_backward.default" in backward, backward
    assert not any("linear" in op for op in forward | backward)  # no layer-by-layer path
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_compiled_fused_mlp_keeps_the_kernels(dtype):
    mlp = manualbp.FusedMLP(3, 16, 2, 2, "gelu", "tanh", device=DEVICE, dtype=dtype)
    x = torch.randn(37, 3, device=DEVICE).to(dtype)
    got = _compiled_matches_eager(lambda m, x: m(x), mlp, x, forward_op="mlp_forward")
    native = mlp.to_sequential()
    assert_close(got[0], native(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_compiled_folded_loss_keeps_the_kernels(dtype):
    mlp = manualbp.FusedMLP(3, 16, 2, 2, "silu", "sigmoid", device=DEVICE, dtype=dtype)
    x = torch.randn(37, 3, device=DEVICE).to(dtype)
    t = torch.randn(37, 2, device=DEVICE).to(dtype)
    got = _compiled_matches_eager(lambda m, x, t: m.mse_loss(x, t), mlp, x, t,
                                  forward_op="mlp_mse_forward")  # fmt: skip
    assert_close(got[0], F.mse_loss(mlp.to_sequential()(x), t))


def test_compiled_sequential_with_a_loss_matches_native():
    native = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                           nn.Linear(16, 2)).to(DEVICE)  # fmt: skip
    ours = manualbp.convert(copy.deepcopy(nn.Sequential(*native, nn.MSELoss())))
    x, t = torch.randn(37, 3, device=DEVICE), torch.randn(37, 2, device=DEVICE)
    got = _compiled_matches_eager(lambda m, x, t: m(x, t), ours, x, t,
                                  forward_op="mlp_mse_forward")  # fmt: skip
    want = _grads(lambda m, x, t: F.mse_loss(m(x), t), native, x, t)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("store", [True, False])
def test_opcheck_mlp_ops(store):
    x, t = torch.randn(9, 3, device=DEVICE), torch.randn(9, 2, device=DEVICE)
    ws = [torch.randn(16, 3, device=DEVICE), torch.randn(2, 16, device=DEVICE)]
    bs = [torch.randn(16, device=DEVICE), None]
    acts = ("silu", "gelu")  # both derivatives read z: every saved tensor is kept
    flags = [store, True, store]  # hidden saved, hidden z, the last layer's z
    torch.library.opcheck(ops.mlp_forward_op, (x, ws, bs, *acts, [0.01, 0.01], flags))
    mode = "y" if store else "value"
    torch.library.opcheck(ops.mlp_mse_forward_op, (x, t, ws, bs, *acts, [0.01, 0.01], "mean",
                                                   torch.float32, mode, [True, True]))  # fmt: skip
    if store:
        y, *saved = ops.mlp_forward_op(x, ws, bs, *acts, [0.01, 0.01], flags)
        args = (torch.randn_like(y), x, ws, saved[:-1], saved[-1], *acts, [0.01, 0.01],
                [True, False], True, [True, True], None, None, "mean")  # fmt: skip
        torch.library.opcheck(ops.mlp_backward_op, args)
