"""Smoke test of the benchmark runner: ``python -m benchmarks --quick --device cpu`` in a
subprocess (on the CPU even where a GPU exists: the GPU run is ``benchmarks/gpu_run.sh``'s job).

It must exit 0 and leave a ``results.json`` where every case ran or is explicitly skipped with a
reason, every measured figure is present, and the targets carry a verdict; plus ``summary.md``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300  # the quick run takes ~15 s on 2 idle CPU cores; generous for loaded CI boxes

ENV_KEYS = {"date", "torch", "triton", "git_commit", "gpu_name", "driver_version", "device_type"}
VERDICTS = {"pass", "fall short", "not measured"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return proc, out


@pytest.mark.slow
def test_quick_run_exits_zero(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "results.json").is_file()
    assert (out / "summary.md").is_file()
    assert "CPU: reference path, does not measure the Triton kernels" in proc.stdout


@pytest.mark.slow
def test_quick_run_json(quick_run):
    _, out = quick_run
    doc = json.loads((out / "results.json").read_text())
    for key in ("schema", "label", "environment", "settings", "ceilings", "cases", "targets"):
        assert key in doc, key
    assert doc["complete"] is True
    assert set(doc["environment"]) >= ENV_KEYS
    assert doc["ceilings"]["bandwidth"]["gbps"] > 0
    assert all(v["tflops"] > 0 for v in doc["ceilings"]["matmul"].values())
    assert doc["label"].startswith("CPU: reference path")

    groups = {c["group"] for c in doc["cases"]}
    assert groups == {"linear", "mse", "sgd", "linear_mse", "mlp_step"}
    for case in doc["cases"]:
        assert case["status"] in ("ran", "skipped"), (case["name"], case)
        assert case["label"] == doc["label"]
        for provider, prec in case["providers"].items():
            assert prec["status"] in ("ran", "skipped"), (case["name"], provider, prec)
            if prec["status"] == "skipped":
                assert prec.get("reason"), (case["name"], provider)
            else:
                assert prec.get("check", {"ok": True})["ok"], (case["name"], provider, prec)
        for mode in case["modes"]:
            for provider, res in case["results"][mode].items():
                if res["status"] == "skipped":
                    assert res.get("reason"), (case["name"], mode, provider)
                    continue
                assert res["status"] == "ran"
                assert res["median_ms"] > 0 and res["n_reps"] >= 1
                rate = res.get("tflops", res.get("gbps"))
                assert rate is not None and math.isfinite(rate) and rate > 0
                assert "pct_of_ceiling" in res
        # manualbp and native ran everywhere except where manualbp's API is missing.
        assert case["providers"]["native"]["status"] == "ran", case["name"]

    assert len(doc["targets"]) == 10
    for t in doc["targets"]:
        assert t["verdict"] in VERDICTS
        assert t["detail"]
    # A CPU run does not measure the Triton kernels, so it judges no target.
    assert {t["verdict"] for t in doc["targets"]} == {"not measured"}


def _case(group, params, mode, times, pct=None, mem=None):
    pct, mem = pct or {}, mem or {}
    results = {
        p: {"status": "ran", "median_ms": t, "pct_of_ceiling": pct.get(p)} for p, t in times.items()
    }
    speedups = {f"{a}_vs_{b}": times[b] / times[a] for a in times for b in times if a != b}
    providers = {p: {"status": "ran", "peak_mem_bytes": mem.get(p)} for p in times}
    return {
        "name": f"{group}/x",
        "group": group,
        "params": params,
        "modes": [mode],
        "results": {mode: results},
        "speedups": {mode: speedups},
        "providers": providers,
    }


def test_targets_verdicts_on_synthetic_results():
    """The target judge on hand-made figures (no measurement): pass, fall short, not measured."""
    from benchmarks.targets import evaluate_targets

    gelu = {"activation": "gelu"}
    doc = {
        "label": "CUDA: manualbp runs its Triton kernels",
        "cases": [
            _case("linear", gelu, "fwd+bwd", {"native": 1.2, "compile": 1.0, "manualbp": 1.0}),
            _case(
                "mse", {"numel": 1 << 26}, "fwd+bwd", {"native": 3.0, "manualbp": 1.0},
                pct={"manualbp": 90.0},
            ),
            _case(
                "linear_mse", {"N": 4096}, "fwd+bwd", {"native": 1.0, "manualbp": 1.0},
                mem={"native": 1000, "manualbp": 800},
            ),
        ],
    }  # fmt: skip
    verdicts = {t["key"]: t["verdict"] for t in evaluate_targets(doc)}
    assert verdicts["linear_gelu_vs_native"] == "pass"  # 1.2x >= 1.15x
    assert verdicts["linear_gelu_vs_compile"] == "pass"  # 1.0x >= 1.0x
    assert verdicts["mse_vs_native"] == "pass"
    assert verdicts["mse_bandwidth"] == "pass"
    assert verdicts["linear_mse_peak_memory"] == "fall short"  # 0.8x > 0.7x
    assert verdicts["sgd_vs_fused"] == "not measured"
    assert verdicts["mlp_step_vs_native"] == "not measured"
    doc["label"] = "CPU: reference path, does not measure the Triton kernels"
    assert {t["verdict"] for t in evaluate_targets(doc)} == {"not measured"}
