"""The multi-tensor SGD launcher ``triton_kernels.sgd.sgd_step_`` against float64 torch math.

Runs under Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py`` when
there is no GPU) or on CUDA. The tensor list mixes odd sizes, a 1-element and an empty tensor,
so blocks are partly masked and some tensors have no block at all.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from torch import Tensor

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip(
        "Triton kernels need CUDA or the CPU interpreter (TRITON_INTERPRET=1 before importing "
        "triton)",
        allow_module_level=True,
    )

from manualbp.kernels import sgd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(47, 31), (1,), (0,), (130,), (3, 5)]
STEPS = 4


def _reference_step(params, grads, bufs, *, lr, weight_decay, momentum, dampening, nesterov,
                    maximize):  # fmt: skip
    """torch.optim.SGD's update, written out, on float64 copies."""
    for i, (p, g) in enumerate(zip(params, grads)):
        g = -g if maximize else g
        g = g + weight_decay * p
        if momentum != 0:
            bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + (1 - dampening) * g
            g = g + momentum * bufs[i] if nesterov else bufs[i]
        p.sub_(float(lr) * g)


def _run(dtype: torch.dtype, shapes=SHAPES, steps: int = STEPS, **hp):
    params = [torch.randn(s, dtype=torch.float64, device=DEVICE).to(dtype) for s in shapes]
    want = [p.double().clone() for p in params]  # clone: .double() of fp64 is p itself
    bufs: list[Tensor | None] = [None] * len(params)
    want_bufs: list[Tensor | None] = [None] * len(params)
    for _ in range(steps):
        grads = [torch.randn(s, dtype=torch.float64, device=DEVICE).to(dtype) for s in shapes]
        sgd.sgd_step_(params, grads, bufs, **hp)
        _reference_step(want, [g.double() for g in grads], want_bufs, **hp)
    return params, want, bufs, want_bufs


def _assert_close(got: list[Tensor], want: list[Tensor], dtype: torch.dtype, steps: int) -> None:
    """Each step rounds p (and the buffer) once to ``dtype`` and does a few ops in fp32/fp64:
    allow ``steps`` such roundings, relative to the values' scale."""
    eps = torch.finfo(dtype).eps
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        if w.numel() == 0:
            continue
        scale = w.abs().max().item() + 1.0
        err = (g.double() - w).abs().max().item()
        assert err <= steps * 2 * (eps + 4 * acc_eps) * scale, (err, dtype)


HP_CASES = [
    dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx)
    for m, d, wd, n, mx in itertools.product(
        [0.0, 0.9], [0.0, 0.1], [0.0, 0.01], [False, True], [False, True]
    )
    if not (n and (m == 0 or d != 0))
]


@pytest.mark.parametrize("hp", HP_CASES, ids=lambda hp: "-".join(f"{k}={v}" for k, v in hp.items()))
def test_options_fp32(hp):
    params, want, bufs, want_bufs = _run(torch.float32, lr=0.1, **hp)
    _assert_close(params, want, torch.float32, STEPS)
    if hp["momentum"] != 0:
        _assert_close(bufs, want_bufs, torch.float32, STEPS)
    else:
        assert bufs == [None] * len(params)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=str)  # fmt: skip
@pytest.mark.parametrize("nesterov", [False, True])
def test_dtypes(dtype, nesterov):
    hp = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=nesterov,
              maximize=False)  # fmt: skip
    params, want, bufs, want_bufs = _run(dtype, **hp)
    _assert_close(params, want, dtype, STEPS)
    _assert_close(bufs, want_bufs, dtype, STEPS)


def test_fp64_scalars_keep_full_precision():
    """An fp64 model's hyper-parameters are not rounded to fp32 on their way to the kernel."""
    lr = 0.1 + 1e-12
    p = torch.ones(3, dtype=torch.float64, device=DEVICE)
    g = torch.ones(3, dtype=torch.float64, device=DEVICE)
    sgd.sgd_step_([p], [g], [], lr=lr, weight_decay=0.0, momentum=0.0, dampening=0.0,
                  nesterov=False, maximize=False)  # fmt: skip
    assert torch.equal(p, torch.full_like(p, 1.0 - lr))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_tensor_lr(momentum):
    hp = dict(momentum=momentum, dampening=0.0, weight_decay=0.01, nesterov=False, maximize=True)
    torch.manual_seed(0)
    got = _run(torch.float32, lr=torch.tensor(0.1, device=DEVICE), **hp)
    torch.manual_seed(0)
    ref = _run(torch.float32, lr=0.1, **hp)
    for a, b in zip(got[0], ref[0]):
        assert torch.equal(a, b)


def test_one_launch_per_call(monkeypatch):
    launches = []
    kernel = sgd._sgd_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(sgd, "_sgd_kernel", Counting())
    _run(torch.float32, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
         maximize=False)  # fmt: skip
    assert len(launches) == STEPS
    # One program per (tensor, block) pair.
    block = sgd._cfg()[0]
    assert launches[0] == (sum(-(-torch.Size(s).numel() // block) for s in SHAPES),)


def test_empty_lists_and_empty_tensors():
    sgd.sgd_step_([], [], [], lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0,
                  nesterov=False, maximize=False)  # fmt: skip
    p = torch.empty(0, device=DEVICE)
    bufs: list[Tensor | None] = [None]
    sgd.sgd_step_([p], [p.clone()], bufs, lr=0.1, weight_decay=0.0, momentum=0.9,
                  dampening=0.0, nesterov=False, maximize=False)  # fmt: skip
    assert bufs[0] is not None and bufs[0].shape == (0,)


def test_rejects_mixed_or_strided_or_sparse():
    hp = dict(lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False,
              maximize=False)  # fmt: skip
    a = torch.randn(4, device=DEVICE)
    with pytest.raises(ValueError, match="one floating dtype"):
        sgd.sgd_step_([a, a.double()], [a, a.double()], [], **hp)
    t = torch.randn(4, 3, device=DEVICE).t()
    with pytest.raises(ValueError, match="contiguous"):
        sgd.sgd_step_([t], [t.clone()], [], **hp)
    assert not sgd.supports([t], [t.clone()], [])
    sparse = torch.randn(4, device=DEVICE).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        sgd.sgd_step_([a], [sparse], [], **hp)
    with pytest.raises(ValueError, match="momentum buffers"):
        sgd.sgd_step_([a], [a], [], **{**hp, "momentum": 0.9})


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cuda_real_sizes(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    shapes = [(4096, 4096), (4096,), (1000, 37), (1,), (3, 3, 3)]
    hp = dict(lr=torch.tensor(0.01, device=DEVICE), momentum=0.9, dampening=0.0,
              weight_decay=1e-4, nesterov=True, maximize=False)  # fmt: skip
    params, want, bufs, want_bufs = _run(dtype, shapes=shapes, steps=3, **hp)
    _assert_close(params, want, dtype, 3)
    _assert_close(bufs, want_bufs, dtype, 3)
