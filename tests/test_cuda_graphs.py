"""A whole training step with manualbp captured in a CUDA graph replays as eager runs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import manualbp

pytestmark = pytest.mark.cuda


def _setup():
    torch.manual_seed(0)
    model = manualbp.convert(
        nn.Sequential(
            nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 16)
        )
    ).cuda()
    opt = manualbp.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt


def _step(model, opt, loss_fn, x, y):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss


def test_captured_training_step_replays_like_eager():
    model, opt = _setup()
    eager_model, eager_opt = copy.deepcopy(model), None
    eager_opt = manualbp.optim.SGD(eager_model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = manualbp.MSELoss()
    data = [(torch.randn(256, 128, device="cuda"), torch.randn(256, 16, device="cuda"))
            for _ in range(8)]  # fmt: skip
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    # Warm up on a side stream (autotuning, momentum buffers, the SGD pointer table).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in data[:3]:
            static_x.copy_(x)
            static_y.copy_(y)
            _step(model, opt, loss_fn, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in data[:3]:
        _step(eager_model, eager_opt, loss_fn, x, y)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = loss_fn(model(static_x), static_y)
        static_loss.backward()
        opt.step()

    for x, y in data[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        eager_loss = _step(eager_model, eager_opt, loss_fn, x, y)
        assert_close(static_loss, eager_loss)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        assert_close(p, q)
