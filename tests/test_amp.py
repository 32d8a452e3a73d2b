"""Autocast and GradScaler: manualbp computes in the dtypes native ops do."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import manualbp

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _autocast_dtypes(device):
    return [torch.bfloat16] if device == "cpu" else [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("device", DEVICES)
def test_linear_runs_in_the_autocast_dtype_and_mse_in_float32(device):
    for dtype in _autocast_dtypes(device):
        x = torch.randn(7, 5, device=device)
        w = torch.randn(3, 5, device=device, requires_grad=True)
        b = torch.randn(3, device=device, requires_grad=True)
        t = torch.randn(7, 3, device=device)
        with torch.autocast(device, dtype=dtype):
            y = manualbp.functional.linear(x, w, b, "gelu")
            y_ref = F.gelu(F.linear(x, w, b))
            loss = manualbp.functional.mse_loss(y, t)
            loss_ref = F.mse_loss(y_ref, t)
        assert y.dtype == y_ref.dtype == dtype
        assert loss.dtype == loss_ref.dtype == torch.float32
        assert_close(y, y_ref)
        assert_close(loss, loss_ref)
        loss.backward()
        assert w.grad.dtype == torch.float32  # the cast back to the parameter's dtype


def test_float64_is_left_alone_by_autocast():
    x, w = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert manualbp.functional.linear(x, w).dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_training_loop_matches_native(device):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    torch.manual_seed(0)
    native = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    ours = manualbp.convert(copy.deepcopy(native))
    runs = []
    for model, loss_fn in ((native, nn.MSELoss()), (ours, manualbp.MSELoss())):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
        gen = torch.Generator(device="cpu").manual_seed(1)
        losses = []
        for _ in range(10):
            x = torch.randn(32, 16, generator=gen).to(device)
            y = torch.randn(32, 4, generator=gen).to(device)
            opt.zero_grad()
            with torch.autocast(device, dtype=dtype):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.detach())
        runs.append((torch.stack(losses), scaler.get_scale()))
    # Same casts, same low-precision GEMMs and ReLU: the same numbers.
    assert_close(runs[1][0], runs[0][0])
    assert runs[1][1] == runs[0][1]
