"""Terminal table, ``results.json`` and ``summary.md``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from benchmarks.targets import evaluate_targets

__all__ = [
    "format_case",
    "format_ceilings",
    "format_table",
    "format_targets",
    "write_outputs",
]

MIB = 1024 * 1024


def _num(value: float | None, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)


def _rate(res: dict[str, Any]) -> str:
    if "tflops" in res:
        return f"{res['tflops']:.2f} TFLOP/s"
    if "gbps" in res:
        return f"{res['gbps']:.1f} GB/s"
    return "-"


def _rows(rec: dict[str, Any]) -> list[list[str]]:
    results = [r for per in rec["results"].values() for r in per.values()]
    if rec["status"] == "skipped" and not any(r.get("status") == "ran" for r in results):
        reason = rec.get("reason") or "; ".join(sorted({str(r.get("reason")) for r in results}))
        return [[rec["name"], "*", "*", "skipped", "", "", "", "", reason[:90]]]
    rows = []
    for mode in rec["modes"]:
        speed = rec.get("speedups", {}).get(mode, {})
        for provider, res in rec["results"].get(mode, {}).items():
            prec = rec["providers"].get(provider, {})
            if res.get("status") != "ran":
                reason = res.get("reason") or prec.get("reason") or ""
                rows.append(
                    [
                        rec["name"],
                        mode,
                        provider,
                        res.get("status", "?"),
                        "",
                        "",
                        "",
                        "",
                        reason[:90],
                    ]
                )
                continue
            vs = ", ".join(
                f"{key.split('_vs_')[1]} {value:.2f}x"
                for key, value in speed.items()
                if key.startswith(provider + "_vs_")
            )
            peak = prec.get("peak_mem_bytes")
            check = prec.get("check")
            flag = "" if check is None else ("" if check["ok"] else " CHECK-MISMATCH")
            rows.append(
                [
                    rec["name"],
                    mode,
                    provider,
                    _num(res["median_ms"]),
                    _rate(res),
                    _num(res.get("pct_of_ceiling"), ".1f"),
                    "-" if peak is None else f"{peak / MIB:.0f}",
                    vs or "-",
                    flag.strip(),
                ]
            )
    return rows


HEADER = [
    "case",
    "mode",
    "provider",
    "median_ms",
    "rate",
    "%ceil",
    "peak_MiB",
    "speedup vs (time_other/time_this)",
    "note",
]


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
    if rec["status"] == "skipped" and not any(
        r.get("status") == "ran" for per in rec["results"].values() for r in per.values()
    ):
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


def format_targets(doc: dict[str, Any]) -> str:
    lines = ["targets:"]
    for t in doc.get("targets", []):
        lines.append(f"  [{t['verdict']}] {t['target']}: {t['detail']}")
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
        "| target | verdict | detail |",
        "|---|---|---|",
    ]
    for t in doc.get("targets", []):
        out.append(f"| {t['target']} | **{t['verdict']}** | {t['detail']} |")
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
