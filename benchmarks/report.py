"""Terminal table, ``results.json`` and ``summary.md``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from benchmarks.targets import evaluate_targets

__all__ = ["format_case", "format_ceilings", "format_ratios", "format_table", "format_targets",
           "write_outputs"]  # fmt: skip

MIB = 1024 * 1024


def _num(value: float | None, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)


def _rate(res: dict[str, Any]) -> str:
    if "samples_per_s" in res:
        return f"{res['samples_per_s'] / 1e6:.1f} Msamples/s ({res.get('tflops', 0):.2f} TFLOP/s)"
    if "tflops" in res:
        return f"{res['tflops']:.2f} TFLOP/s"
    if "gbps" in res:
        return f"{res['gbps']:.1f} GB/s"
    return "-"


def _ran_row(rec: dict[str, Any], mode: str, provider: str, res: dict[str, Any]) -> list[str]:
    prec = rec["providers"].get(provider, {})
    speed = rec.get("speedups", {}).get(mode, {})
    vs = ", ".join(
        f"{key.split('_vs_')[1]} {value:.2f}x"
        for key, value in speed.items()
        if key.startswith(provider + "_vs_")
    )
    peak = prec.get("peak_mem_bytes")
    check = prec.get("check")
    flag = "" if check is None or check["ok"] else "CHECK-MISMATCH"
    if prec.get("linear_choice") and mode == rec["modes"][0]:
        flag = " ".join(filter(None, (flag, _choice_note(prec["linear_choice"]))))
    return [
        rec["name"],
        mode,
        provider,
        _num(res["median_ms"]),
        _rate(res),
        _num(res.get("pct_of_ceiling"), ".1f"),
        _num(res.get("pct_of_bound"), ".1f"),
        "-" if peak is None else f"{peak / MIB:.0f}",
        vs or "-",
        flag,
    ]


def _choice_note(choices: dict[str, str]) -> str:
    """``kept fwd=cublas dx=triton dw=triton``: the Linear choice's candidates per op."""
    per_op: dict[str, set[str]] = {}
    for key, impl in choices.items():
        per_op.setdefault(key.split("|", 1)[0], set()).add(impl)
    order = sorted(per_op, key=lambda op: ("fwd", "dx", "dw", op).index(op))
    return "kept " + " ".join(f"{op}={'/'.join(sorted(per_op[op]))}" for op in order)


def _all_skipped(rec: dict[str, Any]) -> bool:
    results = (r for per in rec["results"].values() for r in per.values())
    return rec["status"] == "skipped" and not any(r.get("status") == "ran" for r in results)


def _rows(rec: dict[str, Any]) -> list[list[str]]:
    results = [r for per in rec["results"].values() for r in per.values()]
    blank = [""] * 5
    if _all_skipped(rec):
        reason = rec.get("reason") or "; ".join(sorted({str(r.get("reason")) for r in results}))
        return [[rec["name"], "*", "*", "skipped", *blank, reason[:90]]]
    rows = []
    for mode in rec["modes"]:
        for provider, res in rec["results"].get(mode, {}).items():
            if res.get("status") == "ran":
                rows.append(_ran_row(rec, mode, provider, res))
                continue
            prec = rec["providers"].get(provider, {})
            reason = res.get("reason") or prec.get("reason") or ""
            rows.append([rec["name"], mode, provider, res.get("status", "?"), *blank, reason[:90]])
    return rows


HEADER = ["case", "mode", "provider", "median_ms", "rate", "%ceil", "%bound", "peak_MiB"]
HEADER += ["speedup vs (time_other/time_this)", "note"]


def _render(rows: list[list[str]]) -> str:
    table = [HEADER, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_case(rec: dict[str, Any]) -> str:
    """The rows of one case (printed as it finishes)."""
    if _all_skipped(rec):
        return f"  skipped: {rec.get('reason', '')}"
    return "\n".join("  " + "  ".join(c for c in row if c) for row in _rows(rec))


def format_table(doc: dict[str, Any]) -> str:
    """Every case, one row per (case, mode, provider)."""
    rows = [row for rec in doc["cases"] for row in _rows(rec)]
    return f"{doc['label']}\n" + _render(rows)


def format_ceilings(ceilings: dict[str, Any]) -> str:
    parts = [
        f"matmul {name}: {_num(v.get('tflops'), '.2f')} TFLOP/s"
        for name, v in ceilings.get("matmul", {}).items()
    ]
    bw = ceilings.get("bandwidth", {})
    parts.append(f"copy bandwidth: {_num(bw.get('gbps'), '.1f')} GB/s")
    return "measured ceilings: " + "; ".join(parts)


def format_ratios(doc: dict[str, Any]) -> str:
    """The host-overhead / reference-path cases: time ratio manualbp / native against its goal
    (empty when the run has none)."""
    lines = []
    for rec in doc["cases"]:
        goal = rec.get("params", {}).get("goal_ratio")
        if goal is None:
            continue
        for mode in rec["modes"]:
            ratio = rec.get("speedups", {}).get(mode, {}).get("native_vs_manualbp")
            if ratio is None:
                lines.append(f"  {rec['name']} {mode}: not measured ({rec.get('status')})")
                continue
            verdict = "pass" if ratio <= goal else "fall short"
            n = rec["results"][mode]["manualbp"].get("n_reps")
            lines.append(
                f"  {rec['name']} {mode}: manualbp/native {ratio:.3f}x "
                f"(goal <= {goal:g}x): {verdict}  [{n} interleaved reps each]"
            )
    if not lines:
        return ""
    threads = {rec.get("threads") for rec in doc["cases"] if rec.get("params", {}).get("goal")}
    head = f"host overhead and reference path (CPU, {', '.join(map(str, threads))} thread(s)):"
    return "\n".join([head, *lines])


def format_targets(doc: dict[str, Any]) -> str:
    lines = ["targets:"]
    for t in doc.get("targets", []):
        lines.append(f"  [{t['verdict']}] {t['target']}: {t['detail']}")
        if t.get("ceiling"):
            lines.append(f"      ceiling: {t['ceiling']}")
    return "\n".join(lines)


def _markdown(doc: dict[str, Any]) -> str:
    env = doc["environment"]
    out = [
        "# manualbp benchmark summary",
        "",
        f"**{doc['label']}**",
        "",
        f"- date: {env.get('date')}; git commit: {env.get('git_commit')}"
        f"{' (working tree dirty)' if env.get('git_dirty') else ''}",
        f"- device: {env.get('gpu_name') or 'CPU'}; driver: {env.get('driver_version')}; "
        f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}); triton {env.get('triton')}",
        f"- run complete: {doc.get('complete')}; elapsed: {doc.get('elapsed_s', 0):.1f} s; "
        f"settings: {json.dumps(doc['settings'])}",
        "- " + format_ceilings(doc["ceilings"]),
        "",
        "## Targets",
        "",
        "| target | verdict | detail | ceiling |",
        "|---|---|---|---|",
    ]
    for t in doc.get("targets", []):
        out.append(
            f"| {t['target']} | **{t['verdict']}** | {t['detail']} | {t.get('ceiling', '')} |"
        )
    ratios = format_ratios(doc)
    if ratios:
        out += ["", "## Host overhead and reference path", "", "```", ratios, "```"]
    out += ["", "## Notes", ""] + [f"- {n}" for n in doc.get("notes", [])]
    out += ["", "## Results", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for rec in doc["cases"]:
        for row in _rows(rec):
            out.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    work = sorted({(r["group"], r["work_note"]) for r in doc["cases"]})
    out += ["", "## Work counted per case", ""] + [f"- {g}: {n}" for g, n in work]
    return "\n".join(out) + "\n"


def write_outputs(doc: dict[str, Any], out_dir: Path, device: torch.device) -> None:
    """Recompute the target verdicts and (re)write ``results.json`` and ``summary.md``."""
    del device
    doc["targets"] = evaluate_targets(doc)
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, out_dir / "results.json")
    (out_dir / "summary.md").write_text(_markdown(doc))
