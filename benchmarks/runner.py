"""``python -m benchmarks``: run the cases on every provider and write table, JSON, plots.

The cases run pass by pass in priority order (:func:`benchmarks.suites.schedule`,
:mod:`benchmarks.measure`); ``results.json`` and ``summary.md`` are rewritten after every pass,
so a run that is stopped still leaves everything measured so far.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import report
from benchmarks.cases import COMPILE_PROVIDERS
from benchmarks.ceilings import DTYPE_NAMES, measure_ceilings
from benchmarks.environment import REPO_ROOT, collect_environment
from benchmarks.measure import (
    CPU_COMPILE_REASON,
    Context,
    configure_compile,
    new_record,
    run_pass,
    skip_pass,
)
from benchmarks.precompile import unavailable_reason
from benchmarks.suites import Pass, build_cases, schedule

__all__ = ["CPU_COMPILE_REASON", "CPU_LABEL", "main", "parse_args", "run"]

CPU_LABEL = "CPU: reference path, does not measure the Triton kernels"
SCHEMA = "manualbp-benchmarks/2"


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
    p.add_argument(
        "--no-precompile",
        action="store_true",
        help="do not compile a manualbp provider's Triton kernels all at once before measuring it",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--list", action="store_true", help="list the selected passes and exit")
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the CUDA suite's passes in run order with estimated compile and run "
        "times (Triton compiles, autotuning, torch.compile warm-ups) and exit; needs no GPU",
    )
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="measure nothing: re-render table, summary.md and plots from a results.json "
        "(e.g. of a run stopped by a timeout) into its folder (or --out)",
    )
    return p.parse_args(argv)


def _label(device: torch.device) -> str:
    if device.type != "cuda":
        return CPU_LABEL
    try:
        from manualbp._mode import kernels_for

        backend = "triton" if kernels_for(torch.empty(1, device=device)) else "reference"
    except Exception as e:
        return f"CUDA: manualbp backend could not be resolved ({type(e).__name__}: {e})"
    if backend != "triton":
        return f"CUDA: manualbp backend {backend!r}, does not measure the Triton kernels"
    return "CUDA: manualbp runs its Triton kernels"


def _timing_opts(args: argparse.Namespace, device: torch.device) -> tuple[float, float, int]:
    """``(warmup_ms, rep_ms, max_reps)``: the options, or defaults (smaller with --quick; on
    CPU with --quick at most 20 repetitions, which is plenty for a smoke test)."""
    warmup_ms = args.warmup_ms if args.warmup_ms is not None else (10.0 if args.quick else 25.0)
    rep_ms = args.rep_ms if args.rep_ms is not None else (40.0 if args.quick else 100.0)
    max_reps = args.max_reps
    if args.quick and device.type == "cpu":
        max_reps = min(max_reps, 20)
    return warmup_ms, rep_ms, max_reps


def _select(device: torch.device, args: argparse.Namespace) -> list[Pass]:
    cases = build_cases(device, args.quick)
    if args.filter:
        pats = [re.compile(f) for f in args.filter]
        cases = [c for c in cases if any(p.search(c.name) for p in pats)]
    return schedule(cases)


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    name = args.name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return REPO_ROOT / "benchmarks" / "results" / name


def print_plan(args: argparse.Namespace) -> int:
    """``--plan``: the CUDA suite's passes with estimated times (no GPU needed)."""
    from benchmarks.plan import estimate, format_plan

    print(format_plan(estimate(_select(torch.device("cuda"), args))))
    return 0


def rerender(args: argparse.Namespace) -> int:
    """``--from-json``: table, targets, summary.md and plots from an existing results.json."""
    doc = json.loads(args.from_json.read_text())
    out_dir = args.out or args.from_json.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_all(doc, out_dir, torch.device(doc["settings"]["device"]), args)
    print(f"re-rendered into {out_dir} (complete run: {doc.get('complete')})")
    return 0


def _write_all(doc: dict[str, Any], out_dir: Path, device: torch.device, args) -> None:
    """results.json and summary.md, the summary printed, then the plots (and the files again)."""
    report.write_outputs(doc, out_dir, device)
    for part in (report.format_table(doc), report.format_ratios(doc), report.format_targets(doc)):
        if part:  # the ratios: only where the run has host-overhead cases
            print(f"\n{part}")
    if args.no_plots:
        return
    from benchmarks.plots import write_plots

    doc["plots"] = write_plots(doc, out_dir)
    report.write_outputs(doc, out_dir, device)
    print(doc["plots"].get("note") or f"{len(doc['plots']['files'])} plots written")


def _context(device: torch.device, args: argparse.Namespace, label: str, t0: float) -> Context:
    warmup_ms, rep_ms, max_reps = _timing_opts(args, device)
    precompile = (
        not args.no_precompile
        and label.endswith("runs its Triton kernels")
        and unavailable_reason(device) is None
    )
    return Context(
        device=device, label=label, ceilings={}, warmup_ms=warmup_ms, rep_ms=rep_ms,
        min_reps=args.min_reps, max_reps=max_reps, quick=args.quick,
        wanted=set(args.providers.split(",")) if args.providers else None,
        cpu_compile=args.cpu_compile, precompile=precompile, budget=args.budget,
        deadline=None if args.budget is None else t0 + args.budget, t0=t0,
    )  # fmt: skip


def _new_doc(ctx: Context, args: argparse.Namespace, passes: list[Pass]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "label": ctx.label,
        "environment": collect_environment(ctx.device),
        "settings": {
            "device": str(ctx.device),
            **{k: getattr(args, k) for k in ("quick", "filter", "providers")},
            "budget_s": args.budget,
            **{k: getattr(args, k) for k in ("warmup_ms", "rep_ms", "min_reps", "max_reps")},
            "cpu_compile": args.cpu_compile,
            "precompile": ctx.precompile,
            "argv": sys.argv[1:],
            "torch_threads": torch.get_num_threads(),
            "effective_warmup_ms_rep_ms_max_reps": [ctx.warmup_ms, ctx.rep_ms, ctx.max_reps],
            "passes": [[p.priority, p.case.name, list(p.providers)] for p in passes],
        },
        "notes": _notes(ctx.device, args),
        "ceilings": ctx.ceilings,
        "cases": [],
        "targets": [],
        "complete": False,
    }


def _estimates(ctx: Context, passes: list[Pass]) -> list[float | None]:
    """The plan's estimate of each pass (CUDA only: the plan models the H100 / H200 runs)."""
    if ctx.device.type != "cuda":
        return [None] * len(passes)
    try:
        from benchmarks.plan import estimate

        return [e.total_s for e in estimate(passes)]
    except Exception:
        return [None] * len(passes)


def _run_passes(ctx: Context, passes: list[Pass], doc: dict[str, Any], out_dir: Path) -> int:
    status, records = 0, {}
    estimates = _estimates(ctx, passes)
    last = {p.case.name: i for i, p in enumerate(passes)}
    for i, p in enumerate(passes):
        name = p.case.name
        if p.first:
            records[name] = new_record(p.case, ctx.label)
            doc["cases"].append(records[name])
        rec = records[name]
        if estimates[i] is not None:
            rec["plan_estimate_s"] = rec.get("plan_estimate_s", 0.0) + estimates[i]
        if ctx.deadline is not None and time.perf_counter() > ctx.deadline:
            skip_pass(p, rec, f"time budget of {ctx.budget:g} s exhausted")
        else:
            which = "" if p.first else f" [{', '.join(p.providers)}]"
            print(f"[{i + 1}/{len(passes)}] {name}{which} ...", flush=True)
            run_pass(p, ctx, rec)
            print(report.format_case(rec), flush=True)
        if i == last[name]:
            ctx.refs.pop(name, None)
        status |= rec["status"] == "error"
        doc["elapsed_s"] = time.perf_counter() - ctx.t0
        report.write_outputs(doc, out_dir, ctx.device)
    return int(status)


def run(args: argparse.Namespace) -> int:
    """Run the selected cases; returns the exit status (1 if any provider errored)."""
    if args.from_json is not None:
        return rerender(args)
    if args.plan:
        return print_plan(args)
    t0 = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        threads = args.cpu_threads or (1 if args.quick else None)
        if threads:
            torch.set_num_threads(threads)
    passes = _select(device, args)
    if args.list:
        for p in passes:
            later = "" if p.first else "  (later pass)"
            print(f"{p.priority}  {p.case.name}  [{', '.join(p.providers)}]{later}")
        return 0
    out_dir = _out_dir(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = _context(device, args, _label(device), t0)
    print(f"manualbp benchmarks on {device}: {ctx.label}")
    n_cases = len({p.case.name for p in passes})
    print(f"{n_cases} cases in {len(passes)} passes; results in {out_dir}")
    if device.type == "cpu" and not args.cpu_compile:
        print(f"note: {CPU_COMPILE_REASON}")
    if (device.type == "cuda" or args.cpu_compile) and any(
        set(COMPILE_PROVIDERS) & set(p.providers) for p in passes
    ):
        configure_compile()  # once; dynamo is not reset between cases
    dtypes = sorted({p.case.dtype for p in passes}, key=lambda d: DTYPE_NAMES[d])
    tc = time.perf_counter()
    ctx.ceilings.update(measure_ceilings(device, dtypes, rep_ms=50.0 if args.quick else 100.0))
    ctx.ceilings["elapsed_s"] = time.perf_counter() - tc
    print(report.format_ceilings(ctx.ceilings))
    doc = _new_doc(ctx, args, passes)
    status = _run_passes(ctx, passes, doc, out_dir)
    doc["complete"] = True
    doc["elapsed_s"] = time.perf_counter() - t0
    _write_all(doc, out_dir, device, args)
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
        "pct_of_bound: the case's best achievable time, max(FLOPs / matmul ceiling, least bytes "
        "/ copy bandwidth) (benchmarks/bounds.py), over the measured time.",
        "manualbp runs the default manualbp backend ('auto': Triton on CUDA, reference on CPU).",
        "On the Triton backend each Linear GEMM (forward, dX, dW) is the faster of two "
        "candidates, timed at the first call of its shape bucket and kept (manualbp."
        "backends.linear_choice; the manualbp provider's record lists what it kept): "
        "manualbp_triton and manualbp_cublas force one candidate each (the fused Triton "
        "kernels; cuBLAS plus Triton elementwise passes) so that each is compared with native.",
        "Host-overhead / reference-path cases (CPU) time native and manualbp side by side "
        "(interleaved repetitions, one thread); their ratio is time(manualbp) / time(native).",
    ]
    if device.type == "cpu":
        notes.insert(0, CPU_LABEL + "; sizes are small and the numbers say nothing about GPUs.")
        if not args.cpu_compile:
            notes.append(CPU_COMPILE_REASON)
    return notes


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))
