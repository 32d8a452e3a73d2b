"""Measure one pass of a case (some or all of its providers) into the case's record.

Providers are measured one after another, so that only that provider's model exists while its
peak memory is measured; interleaved cases (:attr:`Case.interleaved`) bind all their providers
first and time them side by side. Dynamo is never reset between cases
(:func:`configure_compile`), only after a compile provider failed.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from benchmarks.bounds import best_time_s
from benchmarks.cases import (
    COMPILE_PROVIDERS,
    NATIVE,
    TRITON_PROVIDERS,
    Bound,
    Case,
    UnavailableError,
)
from benchmarks.ceilings import DTYPE_NAMES
from benchmarks.precompile import precompile_provider
from benchmarks.suites import Pass
from benchmarks.timing import Timing, bench, bench_interleaved, peak_memory

__all__ = ["CPU_COMPILE_REASON", "Context", "configure_compile", "new_record", "run_pass",
           "skip_pass"]  # fmt: skip

CPU_COMPILE_REASON = (
    "torch.compile not run on CPU: inductor's C++ compile takes tens of seconds per case "
    "(pass --cpu-compile to include it)"
)
# dynamo's per-function recompile limits, raised once per run: every case shape is one more
# static graph of the same forward (nn.Sequential.forward, F.mse_loss, ...).
COMPILE_CACHE_LIMIT = 1024
# Interleaved (host-overhead / reference-path) cases: per provider, about REP_MS of repetitions.
INTERLEAVED = {"warmup_ms": 50.0, "rep_ms": 500.0, "min_reps": 40, "max_reps": 5000}


@dataclass
class Context:
    """What every pass of a run shares."""

    device: torch.device
    label: str
    ceilings: dict[str, Any]
    warmup_ms: float
    rep_ms: float
    min_reps: int
    max_reps: int
    quick: bool = False
    wanted: set[str] | None = None  # --providers
    cpu_compile: bool = False
    precompile: bool = False
    budget: float | None = None
    deadline: float | None = None
    t0: float = 0.0  # when the run started (perf_counter)
    refs: dict[str, torch.Tensor] = field(default_factory=dict)  # native outputs, on the host


def configure_compile() -> dict[str, int]:
    """Raise dynamo's recompile limits (instead of resetting dynamo before every case)."""
    import torch._dynamo as dynamo

    cfg, out = dynamo.config, {}
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):  # fmt: skip
        if hasattr(cfg, name):
            with contextlib.suppress(Exception):
                setattr(cfg, name, max(getattr(cfg, name), COMPILE_CACHE_LIMIT))
                out[name] = getattr(cfg, name)
    return out


def _reset_compile() -> None:
    import torch._dynamo as dynamo

    dynamo.reset()
    configure_compile()


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[int]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    scale = ref.abs().max().item()
    return (out - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def _n_sets(case: Case, ctx: Context) -> int:
    """Enough input sets that together they are well over the L2 cache (>= 256 MiB), within
    2..8 sets and at most a quarter of the free device memory."""
    if ctx.device.type != "cuda":
        return 2
    want = math.ceil((256 << 20) / max(case.set_bytes, 1))
    n = max(2, min(8 if not ctx.quick else 4, want))
    free, _ = torch.cuda.mem_get_info(ctx.device)
    while n > 1 and n * case.set_bytes > free // 4:
        n -= 1
    return n


# ---- Records


def new_record(case: Case, label: str, reason: str | None = None) -> dict[str, Any]:
    """A case's record before any provider ran: providers of a later pass are marked deferred;
    with ``reason``, every provider is skipped for it."""
    first = min(case.priority_of(p) for p in case.providers)
    providers: dict[str, dict[str, Any]] = {}
    for p in case.providers:
        deferred = f"deferred to a priority-{case.priority_of(p)} pass, which did not run"
        if reason is not None or case.priority_of(p) != first:
            providers[p] = {"status": "skipped", "reason": deferred if reason is None else reason}
    rec = {"name": case.name, "group": case.group, "params": case.params, "label": label}
    keys = ("metric", "work", "work_note", "min_bytes", "samples", "modes")
    rec |= {k: getattr(case, k) for k in keys}
    rec["plot"] = {"key": case.plot_key, "x": case.plot_x, "x_label": case.plot_x_label}
    rec |= {"providers": providers, "status": "ran", "results": {m: {} for m in case.modes}}
    rec["elapsed_s"] = 0.0
    return finish_record(rec)


def finish_record(rec: dict[str, Any]) -> dict[str, Any]:
    """Results of providers that did not run, speedups, and the case's status."""
    for provider, prec in rec["providers"].items():
        if prec["status"] != "ran":
            for mode in rec["modes"]:
                missing = {"status": prec["status"], "reason": prec.get("reason")}
                rec["results"][mode].setdefault(provider, missing)
    rec["speedups"] = _speedups(rec)
    statuses = {p["status"] for p in rec["providers"].values()}
    rec.pop("reason", None)
    rec["status"] = "error" if "error" in statuses else "ran"
    if statuses == {"skipped"}:
        rec["status"] = "skipped"
        rec["reason"] = "; ".join(sorted({p["reason"] for p in rec["providers"].values()}))
    return rec


def _speedups(rec: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per mode, ``"A_vs_B" = time(B) / time(A)``: above 1 means A is faster."""
    out: dict[str, dict[str, float]] = {}
    for mode, per in rec["results"].items():
        times = {p: r["median_ms"] for p, r in per.items() if r.get("status") == "ran"}
        out[mode] = {f"{a}_vs_{b}": times[b] / times[a] for a in times for b in times if a != b}
    return out


def _ceiling(case: Case, ceilings: dict[str, Any], metric: str) -> float | None:
    if metric == "tflops":
        return ceilings.get("matmul", {}).get(DTYPE_NAMES[case.dtype], {}).get("tflops")
    return ceilings.get("bandwidth", {}).get("gbps")


def _result(case: Case, mode: str, t: Timing, ceilings: dict[str, Any]) -> dict[str, Any]:
    """One measured (mode, provider): time, rate, % of ceiling and, where the case has byte
    counts, % of its bound (benchmarks.bounds)."""
    res: dict[str, Any] = {"status": "ran", **asdict(t)}
    rate = case.work[mode] / (t.median_ms * 1e-3)
    ceiling = _ceiling(case, ceilings, case.metric)
    key, scale = ("tflops", 1e12) if case.metric == "tflops" else ("gbps", 1e9)
    res[key] = rate / scale
    res["pct_of_ceiling"] = None if not ceiling else 100 * res[key] / ceiling
    if case.samples:
        res["samples_per_s"] = case.samples / (t.median_ms * 1e-3)
    if case.min_bytes and mode in case.min_bytes:
        flops = case.work[mode] if case.metric == "tflops" else 0.0
        best = best_time_s(
            flops,
            case.min_bytes[mode],
            _ceiling(case, ceilings, "tflops"),
            _ceiling(case, ceilings, "gbps"),
        )
        res["bound_ms"] = None if best is None else best * 1e3
        res["pct_of_bound"] = None if best is None else 100 * best * 1e3 / t.median_ms
    return res


# ---- Passes


def skip_pass(p: Pass, rec: dict[str, Any], reason: str) -> dict[str, Any]:
    """Mark the pass's providers skipped (``reason``) in ``rec``."""
    for provider in p.providers:
        rec["providers"][provider] = {"status": "skipped", "reason": reason}
        for mode in rec["modes"]:
            rec["results"][mode].pop(provider, None)
    return finish_record(rec)


def run_pass(p: Pass, ctx: Context, rec: dict[str, Any]) -> dict[str, Any]:
    """Measure the pass's providers into ``rec``; never raises (errors are recorded)."""
    t0 = time.perf_counter()
    case = p.case
    for provider in p.providers:
        rec["providers"][provider] = {"status": "ran"}
        for mode in case.modes:
            rec["results"][mode].pop(provider, None)
    if case.interleaved:
        with _torch_threads(case.threads) as threads:
            rec["threads"] = threads
            _run_interleaved(case, p.providers, ctx, rec)
    else:
        for provider in p.providers:
            _run_provider(case, provider, ctx, rec)
    rec["elapsed_s"] = rec.get("elapsed_s", 0.0) + time.perf_counter() - t0
    rec["ceiling"] = _ceiling(case, ctx.ceilings, case.metric)
    return finish_record(rec)


def _skip_reason(provider: str, ctx: Context) -> str | None:
    if ctx.wanted is not None and provider not in ctx.wanted:
        return "not selected (--providers)"
    if provider in COMPILE_PROVIDERS and ctx.device.type == "cpu" and not ctx.cpu_compile:
        return CPU_COMPILE_REASON
    if ctx.deadline is not None and time.perf_counter() > ctx.deadline:
        return f"time budget of {ctx.budget:g} s exhausted"
    return None


def _check(
    case: Case, provider: str, bound: Bound, one_set: Any, ctx: Context, prec: dict[str, Any]
) -> None:
    """Compare the provider's forward result on set 0 with native's into ``prec["check"]``
    (native's is kept on the host: nothing but the provider's own tensors stays on the device
    while its peak memory is measured)."""
    if bound.output is None:
        return
    out = bound.output(one_set).float().cpu()
    if provider == NATIVE:
        ctx.refs[case.name] = out
    elif case.name in ctx.refs:
        err = _rel_err(out, ctx.refs[case.name])
        prec["check"] = {"max_rel_err_vs_native": err, "tolerance": case.tol, "ok": err <= case.tol}


def _run_provider(case: Case, provider: str, ctx: Context, rec: dict[str, Any]) -> None:
    prec: dict[str, Any] = rec["providers"][provider]
    reason = _skip_reason(provider, ctx)
    if reason is not None:
        prec.update(status="skipped", reason=reason)
        return
    bound, sets = None, []
    try:
        if ctx.precompile and provider in TRITON_PROVIDERS:
            prec["precompile"] = precompile_provider(case, provider, ctx.device)
            _cleanup(ctx.device)  # the throw-away pass's tensors, before peak memory is measured
        t_setup = time.perf_counter()
        torch.manual_seed(0)
        bound = case.bind(provider)
        prec["label"] = bound.label
        sets.append(case.make_set(0))
        _check(case, provider, bound, sets[0], ctx, prec)
        if case.memory_mode is not None and case.memory_mode in bound.modes:
            prepare, run = bound.modes[case.memory_mode]
            prec.update(peak_memory(run, prepare, sets[0], ctx.device))
            prec["peak_mem_mode"] = case.memory_mode
        # bind + check + memory: includes torch.compile's compilation / Triton autotuning.
        prec["setup_s"] = time.perf_counter() - t_setup
        sets += [case.make_set(i) for i in range(1, _n_sets(case, ctx))]
        _time_modes(case, provider, bound, sets, ctx, rec)
        if bound.details is not None:
            prec.update(bound.details())
    except UnavailableError as e:
        prec.update(status="skipped", reason=str(e))
    except Exception as e:
        _record_error(prec, e)
        if provider in COMPILE_PROVIDERS:
            _reset_compile()  # drop whatever the failed compile left half built
    finally:
        del bound, sets
        _cleanup(ctx.device)


def _record_error(prec: dict[str, Any], e: Exception) -> None:
    prec.update(
        status="error",
        reason=f"{type(e).__name__}: {str(e)[:500]}",
        traceback=traceback.format_exc()[-3000:],
    )


def _time_modes(
    case: Case, provider: str, bound: Bound, sets: list[Any], ctx: Context, rec: dict[str, Any]
) -> None:
    for mode in case.modes:
        if mode not in bound.modes:
            reason = bound.unavailable.get(mode, "mode not offered")
            rec["results"][mode][provider] = {"status": "skipped", "reason": reason}
            continue
        prepare, run = bound.modes[mode]
        t = bench(
            run, prepare, sets, ctx.device, warmup_ms=ctx.warmup_ms, rep_ms=ctx.rep_ms,
            min_reps=ctx.min_reps, max_reps=ctx.max_reps,
        )  # fmt: skip
        rec["results"][mode][provider] = _result(case, mode, t, ctx.ceilings)


def _run_interleaved(
    case: Case, providers: tuple[str, ...], ctx: Context, rec: dict[str, Any]
) -> None:
    """Bind every provider, check each against native, then time them side by side."""
    bounds: dict[str, Bound] = {}
    sets = [case.make_set(i) for i in range(2)]
    for provider in sorted(providers, key=lambda p: p != NATIVE):  # native first: the reference
        prec = rec["providers"][provider]
        reason = _skip_reason(provider, ctx)
        if reason is not None:
            prec.update(status="skipped", reason=reason)
            continue
        try:
            torch.manual_seed(0)
            bounds[provider] = case.bind(provider)
            prec["label"] = bounds[provider].label
            _check(case, provider, bounds[provider], sets[0], ctx, prec)
        except UnavailableError as e:
            prec.update(status="skipped", reason=str(e))
        except Exception as e:
            _record_error(prec, e)
    for mode in case.modes:
        ready = [p for p in providers if p in bounds and mode in bounds[p].modes]
        if not ready:
            continue
        try:
            timings = bench_interleaved(
                [bounds[p].modes[mode] for p in ready], sets, ctx.device, **INTERLEAVED
            )
        except Exception as e:
            for p in ready:
                _record_error(rec["providers"][p], e)
            continue
        for p, t in zip(ready, timings, strict=True):
            rec["results"][mode][p] = _result(case, mode, t, ctx.ceilings)
    del bounds, sets
    _cleanup(ctx.device)
