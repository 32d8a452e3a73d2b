"""Two runs give bitwise-identical gradients, on the reference path and through the Triton
kernels (whose reductions - db, the MSE loss, the fused head's dW - use a fixed order and no
atomics). On CPU the kernels run under the interpreter, which runs programs one at a time, so
this shows the kernels' arithmetic is repeatable; the CUDA case shows it with real concurrency."""

from __future__ import annotations

import pytest
import torch
from manualbp.kernels._host import interpreting as interpreter_enabled
from torch import nn

import manualbp

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
BACKENDS = ["reference", "triton"]


def _grads(device: str, small: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    # Under the CPU interpreter each Triton program runs in Python: smaller, still many blocks.
    rows, width = (96, 48) if small else (1024, 256)
    model = manualbp.convert(
        nn.Sequential(
            nn.Linear(64, width), nn.GELU(), nn.Linear(width, 128), nn.SiLU(), nn.Linear(128, 8)
        )
    ).to(device)
    head = manualbp.LinearMSELoss(8, 512).to(device)
    x = torch.randn(rows, 64, device=device)
    y = torch.randn(rows, 8, device=device)
    t = torch.randn(rows, 512, device=device)
    loss = manualbp.functional.mse_loss(model(x), y) + head(model(x), t)
    loss.backward()
    params = [*model.parameters(), *head.parameters()]
    return [p.grad.detach().clone() for p in params]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_two_runs_are_bitwise_identical(device, backend):
    if backend == "triton" and device == "cpu" and not interpreter_enabled():
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with manualbp.use_backend(backend):
            small = device == "cpu" and backend == "triton"
            first, second = _grads(device, small), _grads(device, small)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
