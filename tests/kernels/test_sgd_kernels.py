"""The multi-tensor SGD launcher ``triton_kernels.sgd.sgd_step_`` against float64 torch math.

Runs under Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py`` when
there is no GPU) or on CUDA. The tensor list mixes odd sizes, a whole number of blocks, a
1-element and an empty tensor, so there are full (unmasked) blocks, partial (masked) ones and
tensors with no block at all; ``unaligned`` lists hold views at storage offset 1 (the kernel
variant without the 16-byte alignment hints).
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

from manualbp.kernels import _host, sgd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(47, 31), (1,), (0,), (130,), (128,), (3, 5)]  # 128: two whole interpreter blocks
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


def _randn(shape, dtype: torch.dtype, offset: int = 0) -> Tensor:
    """A contiguous tensor of ``shape``; with ``offset``, a view starting ``offset`` elements
    into its storage (not 16-byte aligned for ``offset=1``)."""
    n = torch.Size(shape).numel()
    flat = torch.randn(n + offset, dtype=torch.float64, device=DEVICE).to(dtype)
    return flat[offset:].view(shape)


def _run(dtype: torch.dtype, shapes=SHAPES, steps: int = STEPS, offset: int = 0, **hp):
    params = [_randn(s, dtype, offset) for s in shapes]
    want = [p.double().clone() for p in params]  # clone: .double() of fp64 is p itself
    bufs: list[Tensor | None] = [None] * len(params)
    want_bufs: list[Tensor | None] = [None] * len(params)
    for _ in range(steps):
        grads = [_randn(s, dtype, offset) for s in shapes]
        sgd.sgd_step_(params, grads, bufs, **hp)
        _reference_step(want, [g.double() for g in grads], want_bufs, **hp)
    return params, want, bufs, want_bufs


def _assert_close(got: list[Tensor], want: list[Tensor], dtype: torch.dtype, steps: int) -> None:
    """Each step rounds p (and the buffer) once to ``dtype`` and does a few ops in fp32/fp64:
    allow ``steps`` such roundings, relative to the values' scale, each a whole ulp and more
    (``2 * eps``): in bf16 under Triton's CPU interpreter the kernel's stores truncate
    fp32 -> bf16 where torch rounds to nearest."""
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
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_dtypes(dtype, nesterov, offset):
    hp = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=nesterov,
              maximize=False)  # fmt: skip
    params, want, bufs, want_bufs = _run(dtype, offset=offset, **hp)
    _assert_close(params, want, dtype, STEPS)
    _assert_close(bufs, want_bufs, dtype, STEPS)


@pytest.mark.parametrize(
    "hp", HP_CASES[::3], ids=lambda hp: "-".join(f"{k}={v}" for k, v in hp.items())
)
def test_options_unaligned_fp64(hp):
    params, want, bufs, want_bufs = _run(torch.float64, offset=1, lr=0.1, **hp)
    _assert_close(params, want, torch.float64, STEPS)
    if hp["momentum"] != 0:
        _assert_close(bufs, want_bufs, torch.float64, STEPS)


class _Recording:
    """Stands in for the kernel: records each launch's grid and keyword arguments."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("where", ["none", "param", "grad", "buffer"])
def test_alignment_is_checked_on_the_host(monkeypatch, where):
    """ALIGNED (the 16-byte hints) only when every param, grad and buffer is aligned; the
    unaligned variant gives the same update."""
    rec = _Recording(sgd._sgd_kernel)
    monkeypatch.setattr(sgd, "_sgd_kernel", rec)
    shapes = [(130,), (3, 5)]
    params = [_randn(s, torch.float32, 1 if where == "param" else 0) for s in shapes]
    grads = [_randn(s, torch.float32, 1 if where == "grad" else 0) for s in shapes]
    bufs: list[Tensor | None] = [_randn(s, torch.float32, 1 if where == "buffer" else 0)
                                 for s in shapes]  # fmt: skip
    want = [p.double().clone() for p in params]
    want_bufs: list[Tensor | None] = [b.double().clone() for b in bufs]  # type: ignore[union-attr]
    hp = dict(lr=0.1, weight_decay=0.01, momentum=0.9, dampening=0.1, nesterov=False,
              maximize=False)  # fmt: skip
    sgd.sgd_step_(params, grads, bufs, **hp)
    _reference_step(want, [g.double() for g in grads], want_bufs, **hp)
    assert rec.launches[0][1]["ALIGNED"] is (where == "none")
    _assert_close(params, want, torch.float32, 1)
    _assert_close(bufs, want_bufs, torch.float32, 1)


def test_block_map_rows():
    """One row per block: the block's param/grad/buffer addresses and 2 * elements left + init."""
    block = sgd.launch_config()["BLOCK"]
    params = [torch.zeros(2 * block + 3, device=DEVICE), torch.zeros(5, device=DEVICE)]
    grads = [torch.zeros_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    init = [0, 1]
    stream = sgd._stream_key(params[0].device)
    addrs = [b.data_ptr() for b in bufs]
    rows, n_blocks = sgd._block_map(params, grads, addrs, init, block, stream)
    assert n_blocks == 4 and rows.shape == (4, 4) and rows.dtype == torch.int64
    want = []
    for p, g, b, i in zip(params, grads, bufs, init):
        for start in range(0, p.numel(), block):
            off = start * p.element_size()
            left = p.numel() - start
            want.append([p.data_ptr() + off, g.data_ptr() + off, b.data_ptr() + off, 2 * left + i])
    assert rows.cpu().tolist() == want
    again, _ = sgd._block_map(params, grads, addrs, init, block, stream)
    assert again is rows  # cached


def test_new_buffer_among_existing_ones():
    """A param whose buffer is None while the others have one (e.g. a param that had no grad
    before) is initialised with its gradient alone."""
    hp = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.0, nesterov=False,
              maximize=False)  # fmt: skip
    params = [_randn(s, torch.float32) for s in SHAPES]
    want = [p.double().clone() for p in params]
    bufs: list[Tensor | None] = [None] * len(params)
    want_bufs: list[Tensor | None] = [None] * len(params)
    for step in range(3):
        if step == 2:
            bufs[0] = want_bufs[0] = None
        grads = [_randn(s, torch.float32) for s in SHAPES]
        sgd.sgd_step_(params, grads, bufs, **hp)
        _reference_step(want, [g.double() for g in grads], want_bufs, **hp)
    _assert_close(params, want, torch.float32, 3)
    _assert_close(bufs, want_bufs, torch.float32, 3)


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
    block = sgd.launch_config()["BLOCK"]
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


def _step_on(stream_key: list[int], stream: int, params, grads, **hp) -> tuple[Tensor, Tensor]:
    """One step with the cache's stream key reading ``stream``; the launch's block map and
    hyper-parameter tensors."""
    stream_key[0] = stream
    with _host.observe() as launches:
        sgd.sgd_step_(params, grads, [], **hp)
    (step,) = launches
    return step.args[1], step.args[2]


def test_cached_tensors_are_per_stream(monkeypatch):
    """A step on another stream makes its own block map and hyper-parameters (equal values, new
    tensors) and never reads the first stream's; each stream hits its own entries again."""
    stream_key = [0]
    monkeypatch.setattr(sgd, "_stream_key", lambda device: stream_key[0])
    hp = dict(lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False,
              maximize=False)  # fmt: skip
    params = [_randn(s, torch.float32) for s in SHAPES]
    grads = [_randn(s, torch.float32) for s in SHAPES]
    rows_1, hp_1 = _step_on(stream_key, 1, params, grads, **hp)
    rows_2, hp_2 = _step_on(stream_key, 2, params, grads, **hp)
    assert rows_2 is not rows_1 and hp_2 is not hp_1
    assert torch.equal(rows_2, rows_1) and torch.equal(hp_2, hp_1)
    assert _step_on(stream_key, 1, params, grads, **hp) == (rows_1, hp_1)
    assert _step_on(stream_key, 2, params, grads, **hp) == (rows_2, hp_2)


def test_evicted_entries_were_read_on_their_stream_only(monkeypatch):
    """With a 2-entry LRU and steps over 3 streams and 2 parameter sets (entries hit, evicted
    and remade all along), every cached tensor a launch reads was made for that launch's
    stream: freeing it on eviction is then ordered after all its reads."""
    stream_key = [0]
    monkeypatch.setattr(sgd, "_stream_key", lambda device: stream_key[0])
    monkeypatch.setattr(sgd, "_CACHE_SIZE", 2)
    hp = dict(lr=0.1, weight_decay=0.01, momentum=0.0, dampening=0.0, nesterov=False,
              maximize=False)  # fmt: skip
    sets = [[_randn(s, torch.float32) for s in SHAPES], [_randn((130,), torch.float32)]]
    grads = [[torch.ones_like(p) for p in ps] for ps in sets]
    read_on: dict[int, int] = {}  # id of a cached tensor -> the stream it was read on
    keep = []  # the tensors stay alive, so that no id is reused
    for step in range(24):
        stream, which = (1, 1, 2, 2, 3, 1)[step % 6], (step // 4) % 2
        for cached in _step_on(stream_key, stream, sets[which], grads[which], **hp):
            keep.append(cached)
            assert read_on.setdefault(id(cached), stream) == stream, (step, stream)
    assert 4 < len(read_on) < len(keep)  # entries were hit, and remade after evictions


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


@pytest.mark.cuda
def test_cuda_steps_on_two_streams_match_torch(monkeypatch):
    """Steps alternating between two side streams (a 1-entry cache: every switch evicts the
    other stream's block map and hyper-parameters, and fresh allocations on the stream may take
    their memory at once) against ``torch.optim.SGD`` on the default stream."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(sgd, "_CACHE_SIZE", 1)
    shapes = [(1000, 37), (4096,), (3, 3, 3), (1,)]
    hp = dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True,
              maximize=False)  # fmt: skip
    params = [_randn(s, torch.float32) for s in shapes]
    twins = [torch.nn.Parameter(p.clone()) for p in params]
    reference = torch.optim.SGD(twins, **hp)
    bufs: list[Tensor | None] = [None] * len(params)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for step in range(8):
        grads = [_randn(s, torch.float32) for s in shapes]
        stream = streams[step % 2]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            sgd.sgd_step_(params, grads, bufs, **hp)
            # Memory freed by the eviction above is handed out here, on this stream.
            torch.full((1 << 16,), float("nan"), device=DEVICE)
        for g in grads:
            g.record_stream(stream)
        torch.cuda.current_stream().wait_stream(stream)
        for twin, g in zip(twins, grads):
            twin.grad = g.clone()
        reference.step()
    torch.cuda.synchronize()
    for p, twin in zip(params, twins):
        torch.testing.assert_close(p, twin.detach())
