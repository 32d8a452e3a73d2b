"""Decisions made by timing (``manualbp.kernels._tuning``): kernel configs and the Linear
choice. What only a GPU would show is tested here with fakes: two threads tuning at once, CUDA
graph capture, several ranks, and what a tuned launch sizes by its config."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from manualbp.kernels import _host, _tuning

import manualbp

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CONFIGS = [dict(BLOCK_M=32, num_warps=4), dict(BLOCK_M=64, num_warps=8)]


class FakeKernel:
    """Stands for a jitted kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    __name__ = "fake_kernel"

    def __init__(self) -> None:
        self.calls: list[tuple[int, tuple, dict]] = []
        self.compiled: list[dict] = []
        self.lock = threading.Lock()

    def warmup(self, *args, grid, **kwargs) -> None:
        with self.lock:
            self.compiled.append(kwargs)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            time.sleep(0.002)  # a launch takes time: threads interleave
            with self.lock:
                self.calls.append((threading.get_ident(), args, kwargs))

        return run


class Timer:
    """An injected timer: ``costs[config label or candidate]``; records what it timed."""

    def __init__(self, costs: dict[str, float]) -> None:
        self.costs, self.calls = costs, []

    def __call__(self, run, name: str) -> float:
        run()
        self.calls.append(name)
        time.sleep(0.005)
        return self.costs.get(name, 1.0)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(_tuning.CACHE_ENV, raising=False)
    _tuning.clear()
    yield
    _tuning.clear()


def test_two_threads_launch_with_their_own_arguments():
    kernel = FakeKernel()
    timer = Timer({_tuning.label(CONFIGS[1]): 0.5})
    barrier = threading.Barrier(2, timeout=10)
    chosen: dict[int, dict] = {}
    errors = []

    def worker(tag: str) -> None:
        try:
            barrier.wait()
            for i in range(5):
                cfg = _tuning.tuned_launch(
                    kernel, "key", CONFIGS, lambda c, i=i: ((1,), (tag, i), dict(c)),
                    torch.device("cpu"),
                )  # fmt: skip
                chosen[threading.get_ident()] = cfg
        except Exception as e:  # pragma: no cover (reported below)
            errors.append(e)

    with _tuning.use_timer(timer):
        threads = [threading.Thread(target=worker, args=(t,)) for t in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    # The key was tuned once (each config timed once), under the lock, whoever got there.
    assert sorted(timer.calls) == sorted(_tuning.label(c) for c in CONFIGS)
    assert sorted(kernel.compiled, key=str) == sorted(CONFIGS, key=str)  # compiled up front, once
    assert all(cfg == CONFIGS[1] for cfg in chosen.values())
    # Every launch carried its own thread's arguments and the config it was given.
    by_thread: dict[int, set[str]] = {}
    for ident, args, kwargs in kernel.calls:
        by_thread.setdefault(ident, set()).add(args[0])
        assert kwargs in CONFIGS
    assert sorted(len(tags) for tags in by_thread.values()) == [1, 1]


def test_nothing_is_timed_during_graph_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    kernel = FakeKernel()
    timer = Timer({_tuning.label(CONFIGS[1]): 0.5})
    with _tuning.use_timer(timer):
        cfg = _tuning.tuned_launch(kernel, "key", CONFIGS, lambda c: ((1,), (), dict(c)),
                                   torch.device("cpu"))  # fmt: skip
    assert cfg == CONFIGS[0] and timer.calls == [] and _tuning.decisions() == {}
    assert [kw for _, _, kw in kernel.calls] == [CONFIGS[0]]  # launched once, the default


@pytest.mark.skipif(not _INTERPRET, reason="the Triton path on CPU tensors")
def test_the_linear_choice_times_nothing_during_graph_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    timer = Timer({"cublas": 0.1})
    x, w = torch.randn(6, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    with manualbp.use_backend("triton"), _tuning.use_timer(timer):
        manualbp.functional.linear(x, w, None, "gelu").sum().backward()
    assert timer.calls == [] and _tuning.decisions() == {}


def test_a_margin_keeps_near_ties_with_the_fused_candidate():
    from manualbp.kernels import linear

    def decide(cublas_cost: float) -> str:
        _tuning.clear()
        with _tuning.use_timer(Timer({"triton": 1.0, "cublas": cublas_cost})):
            return _tuning.choose("fwd|x", torch.device("cpu"), linear.IMPLS,
                                  lambda name: lambda: None, default="triton",
                                  margins={"cublas": linear.CUBLAS_MARGIN})  # fmt: skip

    assert decide(0.97) == "triton"  # 3 % faster: within the margin
    assert decide(0.90) == "cublas"  # 10 % faster: clearly


@pytest.mark.skipif(not _INTERPRET, reason="records the Triton path on CPU tensors")
def test_the_chains_bias_partials_are_sized_by_the_config_each_launch_is_given():
    # The chain GEMM's partials (one row per row block of BLOCK_M) are made by each config's
    # launch for that config: none is read back from a tuner after the fact.
    from manualbp.kernels import linear

    g, h = torch.randn(300, 48), torch.randn(300, 64)
    w, saved = torch.randn(48, 64), torch.randn(300, 64)
    with _host.simulate(90, 132), _host.record() as launches, linear.force("triton"):
        linear.backward_chain(g, h, w, None, None, 0.0, saved, "gelu", 0.0,
                              needs_grad=(True, True, True, True))  # fmt: skip
    chain = [entry for entry in launches if getattr(entry, "name", "") == "chain_grad_kernel"]
    assert len(chain) == len(chain[0].candidates) > 1
    for entry in chain:
        part = entry.args[4]
        assert part.shape[0] == -(-300 // entry.kwargs["BLOCK_M"]), (part.shape, entry.kwargs)


# ---------------------------------------------------------------------------------------------
# Several ranks: one decision for all
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        # Each rank's timer favours another candidate, and the ranks decide at different
        # moments: without agreement they would keep different kernels.
        favoured = "triton" if rank == 0 else "cublas"
        time.sleep(0.2 * rank)
        timer = Timer({favoured: 0.1})
        x = torch.randn(12, 5, requires_grad=True)
        w = torch.randn(7, 5, requires_grad=True)
        with manualbp.use_backend("triton"), _tuning.use_timer(timer):
            manualbp.functional.linear(x, w, None, "relu").sum().backward()
        queue.put((rank, sorted((k, v) for (_, k), v in _tuning.decisions().items())))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.slow
@pytest.mark.skipif(not (_INTERPRET and dist.is_available()), reason="gloo, the Triton path")
def test_every_rank_runs_the_same_decision():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_rank_worker, args=(_free_port(), queue), nprocs=2, join=True)
    results = dict(queue.get(timeout=10) for _ in range(2))
    assert results[0] == results[1] and len(results[0]) == 3, results  # fwd, dx, dw


@pytest.mark.skipif(not _INTERPRET, reason="the Triton GEMM on CPU tensors")
def test_an_accumulating_gemm_adds_once_while_its_configs_are_timed(monkeypatch):
    """Timing runs every config on the call's own tensors: ``out += a @ b`` (the fused head's dW
    accumulator) must come out added once, not once per timing run."""
    from manualbp.kernels import _matmul

    base = _matmul.INTERPRETER_CONFIG
    configs = [dict(base), {**base, "BLOCK_N": base["BLOCK_N"] * 2}]
    monkeypatch.setattr(_matmul, "gemm_configs", lambda *args, **kwargs: configs)
    a, b = torch.randn(20, 12), torch.randn(12, 24)
    out = torch.ones(20, 24)
    timer = Timer({_tuning.label(configs[1]): 0.5})
    with _tuning.use_timer(timer):
        _matmul.matmul(a, b, out=out, accumulate=True)
    assert sorted(timer.calls) == sorted(_tuning.label(c) for c in configs)  # both timed
    torch.testing.assert_close(out, 1 + a.double().mm(b.double()).float())
