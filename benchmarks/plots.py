"""PNG plots: throughput against size, one line per provider, one file per series (samples/s
where a case counts samples, else TFLOP/s or GB/s). Without matplotlib nothing is drawn and the
run says so."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["write_plots"]


def write_plots(doc: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write one PNG per (plot series, mode) under ``out_dir/plots``; returns what was done."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return {"files": [], "note": f"plots skipped: matplotlib unavailable ({e})"}

    series: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for rec in doc["cases"]:
        for mode in rec["modes"]:
            series[(rec["plot"]["key"], mode)].append(rec)
    plot_dir = out_dir / "plots"
    files: list[str] = []
    for (key, mode), recs in sorted(series.items()):
        recs = sorted(recs, key=lambda r: r["plot"]["x"])
        metric = recs[0]["metric"]
        field = "tflops" if metric == "tflops" else "gbps"
        if recs[0].get("samples"):
            field = "samples_per_s"
        providers = sorted({p for r in recs for p in r["results"][mode]})
        lines = {}
        for p in providers:
            pts = [
                (i, r["results"][mode][p][field])
                for i, r in enumerate(recs)
                if r["results"][mode].get(p, {}).get("status") == "ran"
            ]
            if pts:
                lines[p] = pts
        if not lines:
            continue
        plot_dir.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for p, pts in lines.items():
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
        ceiling = recs[0].get("ceiling") if field != "samples_per_s" else None
        if ceiling:
            ax.axhline(ceiling, color="gray", linestyle="--", linewidth=1, label="measured ceiling")
        ax.set_xticks(range(len(recs)))
        ax.set_xticklabels([r["plot"]["x_label"] for r in recs], rotation=20, fontsize=8)
        ax.set_ylabel({"tflops": "TFLOP/s", "gbps": "GB/s", "samples_per_s": "samples/s"}[field])
        ax.set_title(f"{key} {mode}\n{doc['label']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = plot_dir / f"{key}_{mode.replace('+', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path.relative_to(out_dir)))
    return {"files": files, "note": None}
