"""With torch.use_deterministic_algorithms(True), two runs give bitwise-identical gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import manualbp

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _grads(device: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = manualbp.convert(
        nn.Sequential(
            nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 128), nn.SiLU(), nn.Linear(128, 8)
        )
    ).to(device)
    head = manualbp.LinearMSELoss(8, 512).to(device)
    x = torch.randn(1024, 64, device=device)
    y = torch.randn(1024, 8, device=device)
    t = torch.randn(1024, 512, device=device)
    loss = manualbp.functional.mse_loss(model(x), y) + head(model(x), t)
    loss.backward()
    params = [*model.parameters(), *head.parameters()]
    return [p.grad.detach().clone() for p in params]


@pytest.mark.parametrize("device", DEVICES)
def test_two_runs_are_bitwise_identical(device):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _grads(device), _grads(device)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
