"""The kernels as torch.library custom ops: opcheck, and torch.compile over the Triton path."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from manualbp.kernels import library as ops
from torch._dynamo.backends.common import aot_autograd
from torch.testing import assert_close

import manualbp

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the Triton kernels need a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _t(*shape, dtype=torch.float32):
    return torch.randn(shape, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("store_preact", [True, False])
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_opcheck_linear_forward(activation, store_preact):
    args = (_t(9, 5), _t(7, 5), _t(7), activation, 0.01, store_preact)
    torch.library.opcheck(ops.linear_forward_op, args)


@pytest.mark.parametrize("needs", [[True, True, True], [True, False, False], [False, True, True]])
def test_opcheck_linear_backward(needs):
    args = (_t(9, 7), _t(9, 5), _t(7, 5), _t(9, 7), "gelu", 0.01, needs)
    torch.library.opcheck(ops.linear_backward_op, args)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opcheck_mse(reduction):
    x, t = _t(6, 5), _t(1, 5).expand(6, 5)
    torch.library.opcheck(ops.mse_forward_op, (x, t, reduction, True))
    g = _t(6, 5) if reduction == "none" else _t()
    torch.library.opcheck(ops.mse_backward_op, (g, x, t, reduction))


@pytest.mark.slow
def test_fullgraph_compile_on_the_triton_path():
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        manualbp.Linear(6, 16, activation="gelu"), manualbp.Linear(16, 3)
    ).to(DEVICE, torch.float64)
    x, y = _t(11, 6, dtype=torch.float64), _t(11, 3, dtype=torch.float64)

    def loss_fn(x, y):
        return manualbp.functional.mse_loss(model(x), y)

    traced_ops = []

    def record(gm, example_inputs):
        traced_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    capture = aot_autograd(fw_compiler=record, bw_compiler=record)

    with manualbp.use_backend("triton"):
        compiled = torch.compile(loss_fn, fullgraph=True)
        loss = compiled(x, y)
        loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    w0, b0, w1, b1 = (p.detach().requires_grad_() for p in model.parameters())
    want = F.mse_loss(F.linear(F.gelu(F.linear(x, w0, b0)), w1, b1), y)
    want.backward()
    assert_close(loss, want)
    for got, ref in zip(grads, (w0.grad, b0.grad, w1.grad, b1.grad)):
        assert_close(got, ref)
    # The kernels are opaque custom-op nodes in the traced graphs, not traced launch code.
    torch._dynamo.reset()
    with manualbp.use_backend("triton"):
        torch.compile(loss_fn, fullgraph=True, backend=capture)(x, y).backward()
    for op in ("linear_forward", "linear_backward", "mse_forward"):
        assert f"manualbp.{op}.default" in traced_ops, traced_ops
    torch._dynamo.reset()
