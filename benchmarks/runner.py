"""``python -m benchmarks``: run the cases on every provider and write table, JSON, plots.

Each case is run provider by provider (only that provider's model exists at a time): bind,
check its forward result against ``native`` on input set 0, measure peak memory with that one
input set, then make the other input sets and time every mode rotating among them. Results are
written to ``results.json`` and ``summary.md`` after every case, so a run that is stopped
(``--budget`` or an outer ``timeout``) still leaves everything measured so far.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks import report
from benchmarks.cases import COMPILE, MANUALBP, NATIVE, Case, UnavailableError, build_cases
from benchmarks.ceilings import DTYPE_NAMES, measure_ceilings
from benchmarks.environment import REPO_ROOT, collect_environment
from benchmarks.timing import bench, peak_memory

__all__ = ["main", "parse_args", "run"]

CPU_LABEL = "CPU: reference path, does not measure the Triton kernels"
CPU_COMPILE_REASON = (
    "torch.compile not run on CPU: inductor's C++ compile takes tens of seconds per case "
    "(pass --cpu-compile to include it)"
)
SCHEMA = "manualbp-benchmarks/1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark manualbp against eager PyTorch and torch.compile.",
    )
    p.add_argument("--quick", action="store_true", help="a small subset (small sizes on CPU)")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="REGEX",
        help="run only cases whose name matches (re.search); repeatable (any may match)",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder")
    p.add_argument("--name", default=None, help="folder name under benchmarks/results/")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument(
        "--providers",
        default=None,
        help="comma-separated subset of providers to run (default: all of each case)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop starting new cases after this many seconds (rest marked skipped)",
    )
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None)
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=200)
    p.add_argument("--cpu-compile", action="store_true", help="also run torch.compile on CPU")
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="torch threads on CPU (default: 1 with --quick, torch's default otherwise)",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="measure nothing: re-render table, summary.md and plots from a results.json "
        "(e.g. of a run stopped by a timeout) into its folder (or --out)",
    )
    return p.parse_args(argv)


def _device(arg: str | None) -> torch.device:
    if arg:
        return torch.device(arg)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _label(device: torch.device) -> str:
    if device.type != "cuda":
        return CPU_LABEL
    try:
        from manualbp._dispatch import resolve

        backend = resolve(torch.empty(1, device=device))
    except Exception as e:
        return f"CUDA: manualbp backend could not be resolved ({type(e).__name__}: {e})"
    if backend != "triton":
        return f"CUDA: manualbp backend {backend!r}, does not measure the Triton kernels"
    return "CUDA: manualbp runs its Triton kernels"


def _n_sets(case: Case, device: torch.device, quick: bool) -> int:
    """Enough input sets that together they are well over the L2 cache (>= 256 MiB), within
    2..8 sets and at most a quarter of the free device memory."""
    if device.type != "cuda":
        return 2
    want = math.ceil((256 << 20) / max(case.set_bytes, 1))
    n = max(2, min(8 if not quick else 4, want))
    free, _ = torch.cuda.mem_get_info(device)
    while n > 1 and n * case.set_bytes > free // 4:
        n -= 1
    return n


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    scale = ref.abs().max().item()
    return (out - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _reset_compile() -> None:
    import torch._dynamo as dynamo

    dynamo.reset()
    cfg = dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))


def run_case(
    case: Case,
    device: torch.device,
    args: argparse.Namespace,
    ceilings: dict[str, Any],
    deadline: float | None,
    label: str,
) -> dict[str, Any]:
    """Measure one case on all its providers; never raises (errors are recorded)."""
    rec: dict[str, Any] = {
        **_record_header(case, label),
        "providers": {},
        "results": {m: {} for m in case.modes},
        "plot": {"key": case.plot_key, "x": case.plot_x, "x_label": case.plot_x_label},
        "status": "ran",
    }
    wanted = set(args.providers.split(",")) if args.providers else None
    warmup_ms, rep_ms, max_reps = _timing_opts(args, device)
    ceiling = _ceiling(case, ceilings)
    ref_out: torch.Tensor | None = None
    t_case = time.perf_counter()
    if COMPILE in case.providers:
        _reset_compile()
    for provider in case.providers:
        prec: dict[str, Any] = {"status": "ran"}
        rec["providers"][provider] = prec
        if wanted is not None and provider not in wanted:
            prec.update(status="skipped", reason="not selected (--providers)")
            continue
        if provider == COMPILE and device.type == "cpu" and not args.cpu_compile:
            prec.update(status="skipped", reason=CPU_COMPILE_REASON)
            continue
        if deadline is not None and time.perf_counter() > deadline:
            prec.update(status="skipped", reason=f"time budget of {args.budget:g} s exhausted")
            continue
        sets: list[Any] = []
        bound = None
        t_setup = time.perf_counter()
        try:
            torch.manual_seed(0)
            bound = case.bind(provider)
            prec["label"] = bound.label
            sets.append(case.make_set(0))
            if bound.output is not None:
                # Kept on the host: nothing but the provider's own tensors stays on the device
                # while the next provider's peak memory is measured.
                out = bound.output(sets[0]).float().cpu()
                if provider == NATIVE:
                    ref_out = out
                elif ref_out is not None:
                    err = _rel_err(out, ref_out)
                    prec["check"] = {
                        "max_rel_err_vs_native": err,
                        "tolerance": case.tol,
                        "ok": bool(err <= case.tol),
                    }
                del out
            if case.memory_mode is not None and case.memory_mode in bound.modes:
                prepare, run = bound.modes[case.memory_mode]
                prec.update(peak_memory(run, prepare, sets[0], device))
                prec["peak_mem_mode"] = case.memory_mode
            # bind + check + memory: includes torch.compile's compilation / Triton autotuning.
            prec["setup_s"] = time.perf_counter() - t_setup
            n = _n_sets(case, device, args.quick)
            sets += [case.make_set(i) for i in range(1, n)]
            for mode in case.modes:
                if mode not in bound.modes:
                    rec["results"][mode][provider] = {
                        "status": "skipped",
                        "reason": "mode not offered",
                    }
                    continue
                prepare, run = bound.modes[mode]
                t = bench(
                    run,
                    prepare,
                    sets,
                    device,
                    warmup_ms=warmup_ms,
                    rep_ms=rep_ms,
                    min_reps=args.min_reps,
                    max_reps=max_reps,
                )
                res: dict[str, Any] = {"status": "ran", **t.as_dict()}
                rate = case.work[mode] / (t.median_ms * 1e-3)
                if case.metric == "tflops":
                    res["tflops"] = rate / 1e12
                    res["pct_of_ceiling"] = None if not ceiling else 100 * res["tflops"] / ceiling
                else:
                    res["gbps"] = rate / 1e9
                    res["pct_of_ceiling"] = None if not ceiling else 100 * res["gbps"] / ceiling
                rec["results"][mode][provider] = res
        except UnavailableError as e:
            prec.update(status="skipped", reason=str(e))
        except Exception as e:
            prec.update(
                status="error",
                reason=f"{type(e).__name__}: {str(e)[:500]}",
                traceback=traceback.format_exc()[-3000:],
            )
        finally:
            del bound, sets
            if provider == COMPILE:
                _reset_compile()  # drop compiled graphs (and anything they hold)
            _cleanup(device)
        for mode in case.modes:
            if provider not in rec["results"][mode] and prec["status"] != "ran":
                rec["results"][mode][provider] = {
                    "status": prec["status"],
                    "reason": prec.get("reason"),
                }
    rec["speedups"] = _speedups(rec)
    rec["ceiling"] = ceiling
    rec["elapsed_s"] = time.perf_counter() - t_case
    statuses = {p["status"] for p in rec["providers"].values()}
    if "error" in statuses:
        rec["status"] = "error"
    elif statuses == {"skipped"}:
        rec["status"] = "skipped"
        rec["reason"] = "; ".join(sorted({p["reason"] for p in rec["providers"].values()}))
    return rec


def _timing_opts(args: argparse.Namespace, device: torch.device) -> tuple[float, float, int]:
    """``(warmup_ms, rep_ms, max_reps)``: the options, or defaults (smaller with --quick; on
    CPU with --quick at most 20 repetitions, which is plenty for a smoke test)."""
    warmup_ms = args.warmup_ms if args.warmup_ms is not None else (10.0 if args.quick else 25.0)
    rep_ms = args.rep_ms if args.rep_ms is not None else (40.0 if args.quick else 100.0)
    max_reps = args.max_reps
    if args.quick and device.type == "cpu":
        max_reps = min(max_reps, 20)
    return warmup_ms, rep_ms, max_reps


def _ceiling(case: Case, ceilings: dict[str, Any]) -> float | None:
    if case.metric == "tflops":
        return ceilings.get("matmul", {}).get(DTYPE_NAMES[case.dtype], {}).get("tflops")
    return ceilings.get("bandwidth", {}).get("gbps")


def _speedups(rec: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per mode, ``"A_vs_B" = time(B) / time(A)``: above 1 means A is faster."""
    out: dict[str, dict[str, float]] = {}
    for mode, per in rec["results"].items():
        times = {p: r["median_ms"] for p, r in per.items() if r.get("status") == "ran"}
        out[mode] = {f"{a}_vs_{b}": times[b] / times[a] for a in times for b in times if a != b}
    return out


def _record_header(case: Case, label: str) -> dict[str, Any]:
    """What every record of a case says about the case itself."""
    return {
        "name": case.name,
        "group": case.group,
        "params": case.params,
        "label": label,
        "metric": case.metric,
        "work": case.work,
        "work_note": case.work_note,
        "modes": case.modes,
    }


def _skipped_record(case: Case, reason: str, label: str) -> dict[str, Any]:
    return {
        **_record_header(case, label),
        "status": "skipped",
        "reason": reason,
        "providers": {p: {"status": "skipped", "reason": reason} for p in case.providers},
        "results": {
            m: {p: {"status": "skipped", "reason": reason} for p in case.providers}
            for m in case.modes
        },
        "plot": {"key": case.plot_key, "x": case.plot_x, "x_label": case.plot_x_label},
        "speedups": {},
    }


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    name = args.name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return REPO_ROOT / "benchmarks" / "results" / name


def rerender(args: argparse.Namespace) -> int:
    """``--from-json``: table, targets, summary.md and plots from an existing results.json."""
    doc = json.loads(args.from_json.read_text())
    out_dir = args.out or args.from_json.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    print(report.format_table(doc))
    report.write_outputs(doc, out_dir, torch.device(doc["settings"]["device"]))
    print()
    print(report.format_targets(doc))
    if not args.no_plots:
        from benchmarks.plots import write_plots

        doc["plots"] = write_plots(doc, out_dir)
        report.write_outputs(doc, out_dir, torch.device(doc["settings"]["device"]))
        print(doc["plots"].get("note") or f"{len(doc['plots']['files'])} plots written")
    print(f"re-rendered into {out_dir} (complete run: {doc.get('complete')})")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the selected cases; returns the exit status (1 if any provider errored)."""
    if args.from_json is not None:
        return rerender(args)
    t0 = time.perf_counter()
    deadline = None if args.budget is None else t0 + args.budget
    device = _device(args.device)
    if device.type == "cpu":
        threads = args.cpu_threads or (1 if args.quick else None)
        if threads:
            torch.set_num_threads(threads)
    cases = build_cases(device, args.quick)
    if args.filter:
        pats = [re.compile(f) for f in args.filter]
        cases = [c for c in cases if any(p.search(c.name) for p in pats)]
    if args.list:
        for c in cases:
            print(f"{c.priority}  {c.name}  [{', '.join(c.providers)}]")
        return 0
    out_dir = _out_dir(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = _label(device)
    print(f"manualbp benchmarks on {device}: {label}")
    print(f"{len(cases)} cases; results in {out_dir}")
    if device.type == "cpu" and not args.cpu_compile:
        print(f"note: {CPU_COMPILE_REASON}")

    env = collect_environment(device)
    dtypes = sorted({c.dtype for c in cases}, key=lambda d: DTYPE_NAMES[d])
    tc = time.perf_counter()
    ceilings = measure_ceilings(device, dtypes, rep_ms=50.0 if args.quick else 100.0)
    ceilings["elapsed_s"] = time.perf_counter() - tc
    print(report.format_ceilings(ceilings))

    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "label": label,
        "environment": env,
        "settings": {
            "device": str(device),
            "quick": args.quick,
            "filter": args.filter,
            "providers": args.providers,
            "budget_s": args.budget,
            "warmup_ms": args.warmup_ms,
            "rep_ms": args.rep_ms,
            "min_reps": args.min_reps,
            "max_reps": args.max_reps,
            "cpu_compile": args.cpu_compile,
            "argv": sys.argv[1:],
            "torch_threads": torch.get_num_threads(),
            "effective_warmup_ms_rep_ms_max_reps": _timing_opts(args, device),
        },
        "notes": _notes(device, args),
        "ceilings": ceilings,
        "cases": [],
        "targets": [],
        "complete": False,
    }
    status = 0
    for i, case in enumerate(cases):
        if deadline is not None and time.perf_counter() > deadline:
            rec = _skipped_record(case, f"time budget of {args.budget:g} s exhausted", label)
        else:
            print(f"[{i + 1}/{len(cases)}] {case.name} ...", flush=True)
            rec = run_case(case, device, args, ceilings, deadline, label)
        if rec["status"] == "error":
            status = 1
        doc["cases"].append(rec)
        if rec["status"] != "skipped" or i == len(cases) - 1:
            print(report.format_case(rec), flush=True)
        doc["elapsed_s"] = time.perf_counter() - t0
        report.write_outputs(doc, out_dir, device)
    doc["complete"] = True
    doc["elapsed_s"] = time.perf_counter() - t0
    report.write_outputs(doc, out_dir, device)
    print()
    print(report.format_table(doc))
    print()
    print(report.format_targets(doc))
    if not args.no_plots:
        from benchmarks.plots import write_plots

        doc["plots"] = write_plots(doc, out_dir)
        report.write_outputs(doc, out_dir, device)
        print(doc["plots"].get("note") or f"{len(doc['plots']['files'])} plots written")
    print(
        f"\nwrote {out_dir / 'results.json'} and {out_dir / 'summary.md'}; {doc['elapsed_s']:.1f} s"
    )
    return status


def _notes(device: torch.device, args: argparse.Namespace) -> list[str]:
    notes = [
        "Every figure is measured in this run; nothing is estimated or copied.",
        "Times are medians over repetitions, warm-up excluded; the first call (compilation, "
        "autotuning) is reported as first_call_ms.",
        "speedups: 'A_vs_B' = time(B) / time(A); above 1 means A is faster.",
        "pct_of_ceiling: TFLOP/s against torch.matmul's measured rate in the case's dtype, or "
        "GB/s against the measured device-to-device copy bandwidth.",
        f"{MANUALBP} runs the default manualbp backend ('auto': Triton on CUDA, reference on CPU).",
    ]
    if device.type == "cpu":
        notes.insert(0, CPU_LABEL + "; sizes are small and the numbers say nothing about GPUs.")
        if not args.cpu_compile:
            notes.append(CPU_COMPILE_REASON)
    return notes


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))
