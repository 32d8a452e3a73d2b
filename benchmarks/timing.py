"""Timing and peak-memory measurement.

On CUDA each repetition is timed with a pair of ``torch.cuda.Event`` s recorded around the
measured call only; before it, untimed, the case's ``prepare`` step runs (e.g. the forward pass
whose graph a backward-only measurement consumes) and the L2 cache is flushed by zeroing a
256 MiB buffer (what ``triton.testing.do_bench`` does). Repetitions rotate among several input
sets, so a call never finds its operands left in cache by the previous one. Warm-up calls (the
first of which pays for compilation / autotuning; its wall time is reported separately as
``first_call_ms``) are excluded.

``triton.testing.do_bench`` is not used for the measured calls because it has no hook for an
untimed per-repetition ``prepare`` step nor for rotating inputs; the CUDA-event scheme above is
the same as its own (and the same on torch 2.11 / triton 3.6 and torch 2.13 / triton 3.9).

On CPU, each repetition is timed with ``time.perf_counter`` around the call; there is no cache
flush and no peak-memory figure (torch keeps no CPU allocator statistics).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "Timing",
    "bench",
    "peak_memory",
    "release_flush_buffers",
    "synchronize",
    "L2_FLUSH_BYTES",
]

L2_FLUSH_BYTES = 256 * 1024 * 1024
_flush_buffers: dict[str, torch.Tensor] = {}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flush(device: torch.device) -> None:
    if device.type != "cuda":
        return
    key = str(device)
    buf = _flush_buffers.get(key)
    if buf is None:
        buf = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        _flush_buffers[key] = buf
    buf.zero_()


def release_flush_buffers() -> None:
    """Free the L2-flush buffers (made again on the next timed call), so that they are not part
    of a peak-memory measurement."""
    _flush_buffers.clear()


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


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
    """Time ``run(prepare(s))`` for ``s`` rotating over ``sets``; only ``run`` is timed.

    The number of warm-up calls and of repetitions is chosen, as ``do_bench`` does, from a
    first estimate of the call's time so that they take about ``warmup_ms`` and ``rep_ms``
    (at least ``min_reps`` repetitions, at most ``max_reps``).
    """
    if not sets:
        raise ValueError("bench needs at least one input set")
    cuda = device.type == "cuda"
    n_sets = len(sets)

    # First call: compilation, autotuning, lazy initialisation. Reported, never counted.
    arg = prepare(sets[0])
    synchronize(device)
    t0 = time.perf_counter()
    run(arg)
    synchronize(device)
    first_call_ms = (time.perf_counter() - t0) * 1e3
    del arg

    # Estimate the steady-state time of one call from a few calls.
    est_times = []
    for k in range(3):
        arg = prepare(sets[(k + 1) % n_sets])
        synchronize(device)
        t0 = time.perf_counter()
        run(arg)
        synchronize(device)
        est_times.append((time.perf_counter() - t0) * 1e3)
        del arg
    est = max(min(est_times), 1e-3)
    n_warmup = max(1, min(max_reps, int(warmup_ms / est)))
    n_reps = max(min_reps, min(max_reps, int(rep_ms / est)))

    for k in range(n_warmup):
        arg = prepare(sets[k % n_sets])
        run(arg)
        del arg
    synchronize(device)

    times: list[float] = []
    if cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_reps)]
        for k in range(n_reps):
            arg = prepare(sets[k % n_sets])
            if flush:
                _flush(device)
            starts[k].record()
            run(arg)
            ends[k].record()
            del arg
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
        method = (
            "cuda events around each call; L2 flushed before each"
            if flush
            else ("cuda events around each call")
        )
    else:
        for k in range(n_reps):
            arg = prepare(sets[k % n_sets])
            t0 = time.perf_counter()
            run(arg)
            times.append((time.perf_counter() - t0) * 1e3)
            del arg
        method = "time.perf_counter around each call (CPU)"
    times.sort()
    return Timing(
        median_ms=statistics.median(times),
        p20_ms=_quantile(times, 0.2),
        p80_ms=_quantile(times, 0.8),
        min_ms=times[0],
        mean_ms=statistics.fmean(times),
        n_reps=n_reps,
        n_warmup=n_warmup,
        n_sets=n_sets,
        first_call_ms=first_call_ms,
        method=method,
    )


def peak_memory(
    run: Callable[[Any], Any], prepare: Callable[[Any], Any], one_set: Any, device: torch.device
) -> dict[str, Any]:
    """Peak CUDA memory of one ``run(prepare(one_set))`` after a warm-up call.

    Returns ``peak_mem_bytes`` (``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats``: everything allocated at that moment, which the runner keeps to
    the provider's parameters (and optimizer state) and the one input set, plus what the call
    adds; the L2-flush buffer is freed first) and ``peak_mem_extra_bytes``
    (the peak minus what was allocated when the measured call began). On CPU
    both are ``None`` with a reason.
    """
    if device.type != "cuda":
        return {
            "peak_mem_bytes": None,
            "peak_mem_extra_bytes": None,
            "peak_mem_note": "not measured on CPU (no allocator statistics)",
        }
    release_flush_buffers()
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
