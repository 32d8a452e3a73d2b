"""torch.compile: manualbp models compile with fullgraph=True and match eager."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import manualbp

pytestmark = pytest.mark.slow


def _model(dtype):
    torch.manual_seed(0)
    native = nn.Sequential(
        nn.Linear(13, 32), nn.GELU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8),
        nn.Tanh(), nn.Linear(8, 3),
    ).to(dtype)  # fmt: skip
    return manualbp.convert(native)


def _loss(model, x, y):
    return manualbp.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fullgraph_compile_matches_eager(dtype):
    eager = _model(dtype)
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(_loss, fullgraph=True)  # raises on any graph break
    x, y = torch.randn(37, 13, dtype=dtype), torch.randn(37, 3, dtype=dtype)
    loss_e = _loss(eager, x, y)
    loss_c = compiled(compiled_model, x, y)
    assert_close(loss_c, loss_e)
    loss_e.backward()
    loss_c.backward()
    if dtype == torch.float64:  # Inductor reorders float ops; in float64 that is invisible
        for pc, pe in zip(compiled_model.parameters(), eager.parameters()):
            assert_close(pc.grad, pe.grad)


def test_compiled_backward_is_the_hand_written_one(monkeypatch):
    # If the compiled graph runs manualbp's backward, a change to it must show.
    from manualbp import activations

    act = activations.ACTIVATIONS["tanh"]
    wrong = dataclasses.replace(act, grad=lambda g, y, s: 2 * g)
    monkeypatch.setitem(activations.ACTIVATIONS, "tanh", wrong)
    monkeypatch.setattr(activations, "_BOUND", {})  # bind() made anew from the registry
    torch._dynamo.reset()
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 4, dtype=torch.float64)
    f = torch.compile(
        lambda x, w: manualbp.functional.linear(x, w, None, "tanh").sum(), fullgraph=True
    )
    f(x, w).backward()
    assert_close(w.grad, 2 * torch.ones(5, 3, dtype=torch.float64).mT @ x)
    torch._dynamo.reset()


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the Triton path needs a GPU or TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backend_choice_is_respected_under_compile(backend, monkeypatch):
    # The choice is made when the graph is traced: count the Triton path's uses then.
    from manualbp.kernels import library

    calls = []
    real = library.linear_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(library, "linear_forward", counting)
    torch._dynamo.reset()
    f = torch.compile(lambda x, w: manualbp.functional.linear(x, w, None, "relu"), fullgraph=True)
    x, w = torch.randn(4, 3), torch.randn(2, 3)
    with manualbp.use_backend(backend):
        assert_close(f(x, w), torch.relu(x @ w.T))
    assert bool(calls) == (backend == "triton")
    torch._dynamo.reset()
