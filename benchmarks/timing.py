"""Timing and peak-memory measurement (the scheme: benchmarks/README.md, "How it measures").

On CUDA each repetition is timed with CUDA events around the measured call only, after its
untimed ``prepare`` and an L2 flush, rotating among the input sets; on CPU with
``time.perf_counter`` (no flush, no peak memory). ``triton.testing.do_bench`` is not used: it
has no hook for an untimed per-repetition ``prepare`` nor for rotating inputs.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Timing", "bench", "bench_interleaved", "peak_memory", "synchronize"]

L2_FLUSH_BYTES = 256 * 1024 * 1024
_flush_buffers: dict[str, torch.Tensor] = {}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flush(device: torch.device) -> None:
    if device.type == "cuda":
        key = str(device)
        if key not in _flush_buffers:
            _flush_buffers[key] = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        _flush_buffers[key].zero_()


@dataclass
class Timing:
    """Per-call times of one measured function, in milliseconds (warm-up excluded)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    mean_ms: float
    n_reps: int
    n_warmup: int
    n_sets: int
    first_call_ms: float
    method: str


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _time_once(
    run: Callable[[Any], Any], prepare: Callable[[Any], Any], s: Any, device: torch.device
) -> float:
    """Wall time (ms) of one ``run(prepare(s))``, ``prepare`` untimed, device synchronised."""
    arg = prepare(s)
    synchronize(device)
    t0 = time.perf_counter()
    run(arg)
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def _estimate(
    run: Callable[[Any], Any], prepare: Callable[[Any], Any], sets: Sequence[Any], device
) -> tuple[float, float]:
    """``(first_call_ms, estimate_ms)``: the first call (compilation, autotuning, lazy
    initialisation: reported, never counted) and the least of the next three."""
    first = _time_once(run, prepare, sets[0], device)
    est = min(_time_once(run, prepare, sets[(k + 1) % len(sets)], device) for k in range(3))
    return first, max(est, 1e-3)


def _counts(
    est_ms: float, warmup_ms: float, rep_ms: float, min_reps: int, max_reps: int, min_warmup: int
) -> tuple[int, int]:
    """``(n_warmup, n_reps)`` for calls of ``est_ms``: about ``warmup_ms`` and ``rep_ms`` worth
    (at least ``min_warmup`` and ``min_reps``, at most ``max_reps``), as ``do_bench`` does."""
    n_warmup = max(min_warmup, min(max_reps, int(warmup_ms / est_ms)))
    return n_warmup, max(min_reps, min(max_reps, int(rep_ms / est_ms)))


def _timed_cuda(run, prepare, sets, device, n_reps: int, flush: bool) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_reps)]
    for k in range(n_reps):
        arg = prepare(sets[k % len(sets)])
        if flush:
            _flush(device)
        starts[k].record()
        run(arg)
        ends[k].record()
        del arg
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def _timed_cpu(run, prepare, sets, n_reps: int) -> list[float]:
    times = []
    for k in range(n_reps):
        arg = prepare(sets[k % len(sets)])
        t0 = time.perf_counter()
        run(arg)
        times.append((time.perf_counter() - t0) * 1e3)
        del arg
    return times


def _timing(times: list[float], n_warmup: int, n_sets: int, first: float, method: str) -> Timing:
    times = sorted(times)
    return Timing(
        median_ms=statistics.median(times),
        p20_ms=_quantile(times, 0.2),
        p80_ms=_quantile(times, 0.8),
        min_ms=times[0],
        mean_ms=statistics.fmean(times),
        n_reps=len(times),
        n_warmup=n_warmup,
        n_sets=n_sets,
        first_call_ms=first,
        method=method,
    )


def bench(
    run: Callable[[Any], Any],
    prepare: Callable[[Any], Any],
    sets: Sequence[Any],
    device: torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 5,
    max_reps: int = 200,
    flush: bool = True,
) -> Timing:
    """Time ``run(prepare(s))`` for ``s`` rotating over ``sets``; only ``run`` is timed, its
    warm-up and repetitions sized from a first estimate of the call's time (:func:`_counts`)."""
    if not sets:
        raise ValueError("bench needs at least one input set")
    first, est = _estimate(run, prepare, sets, device)
    n_warmup, n_reps = _counts(est, warmup_ms, rep_ms, min_reps, max_reps, min_warmup=1)
    for k in range(n_warmup):
        run(prepare(sets[k % len(sets)]))
    synchronize(device)
    if device.type == "cuda":
        times = _timed_cuda(run, prepare, sets, device, n_reps, flush)
        method = "cuda events around each call" + ("; L2 flushed before each" if flush else "")
    else:
        times = _timed_cpu(run, prepare, sets, n_reps)
        method = "time.perf_counter around each call (CPU)"
    return _timing(times, n_warmup, len(sets), first, method)


def bench_interleaved(
    entries: Sequence[tuple[Callable[[Any], Any], Callable[[Any], Any]]],
    sets: Sequence[Any],
    device: torch.device,
    *,
    warmup_ms: float = 50.0,
    rep_ms: float = 500.0,
    min_reps: int = 40,
    max_reps: int = 5000,
) -> list[Timing]:
    """Time several ``(prepare, run)`` entries side by side: every repetition runs each entry
    once on the same input set, in reverse order every other repetition, so that drifts and
    order effects hit all alike (wall clock, device synchronised, gc off); one :class:`Timing`
    per entry. Warm-up and repetitions: :func:`_counts` of the slowest entry."""
    if not sets or not entries:
        raise ValueError("bench_interleaved needs input sets and entries")
    firsts, ests = zip(*(_estimate(run, prep, sets, device) for prep, run in entries), strict=True)
    n_warmup, n_reps = _counts(max(ests), warmup_ms, rep_ms, min_reps, max_reps, min_warmup=2)
    times: list[list[float]] = [[] for _ in entries]
    order = list(range(len(entries)))
    gc.collect()
    gc.disable()
    try:
        for k in range(n_warmup + n_reps):
            s = sets[k % len(sets)]
            for i in order if k % 2 == 0 else order[::-1]:
                prepare, run = entries[i]
                t = _time_once(run, prepare, s, device)
                if k >= n_warmup:
                    times[i].append(t)
    finally:
        gc.enable()
    method = (
        f"interleaved with {len(entries) - 1} other(s), order alternating; wall clock around "
        "each call, device synchronised; gc off"
    )
    return [_timing(t, n_warmup, len(sets), f, method) for t, f in zip(times, firsts, strict=True)]


def peak_memory(
    run: Callable[[Any], Any], prepare: Callable[[Any], Any], one_set: Any, device: torch.device
) -> dict[str, Any]:
    """Peak CUDA memory of one ``run(prepare(one_set))`` after a warm-up call, the L2-flush
    buffer freed first: ``peak_mem_bytes`` (``max_memory_allocated`` after
    ``reset_peak_memory_stats``) and ``peak_mem_extra_bytes`` (less what was allocated when the
    call began). On CPU both are ``None`` with a reason."""
    if device.type != "cuda":
        return {
            "peak_mem_bytes": None,
            "peak_mem_extra_bytes": None,
            "peak_mem_note": "not measured on CPU (no allocator statistics)",
        }
    _flush_buffers.clear()  # made again on the next timed call: not part of the peak
    arg = prepare(one_set)
    run(arg)
    del arg
    arg = prepare(one_set)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run(arg)
    del arg
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mem_bytes": int(peak), "peak_mem_extra_bytes": int(peak - base)}
