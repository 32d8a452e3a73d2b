"""Smoke test of the benchmark runner: ``python -m benchmarks --quick --device cpu`` in a
subprocess (on the CPU even where a GPU exists: the GPU run is ``benchmarks/gpu_run.sh``'s job).

It must exit 0 and leave a ``results.json`` where every case ran or is explicitly skipped with a
reason, every measured figure is present, and the targets carry a verdict; plus ``summary.md``.
The host-overhead and reference-path cases are timed side by side and judged against their goals
(pass or fall short: the ratios depend on the machine, so only that they were measured is
checked).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300  # the quick run takes ~25 s on 2 idle CPU cores; generous for loaded CI boxes

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
    assert groups == {
        "host_overhead", "reference", "linear", "mse", "sgd", "linear_mse", "mlp_step",
        "fused_mlp_step", "fused_mlp_infer", "second_order_step",
    }  # fmt: skip
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

    from benchmarks.targets import REFERENCE_GOALS, TARGETS

    assert len(doc["targets"]) == len(TARGETS)
    for t in doc["targets"]:
        assert t["verdict"] in VERDICTS
        assert t["detail"]
    # A CPU run does not measure the Triton kernels, so it judges no GPU target; it judges
    # every host-overhead / reference-path goal (pass or fall short, depending on the machine).
    gpu = {t["verdict"] for t in doc["targets"] if t["path"] == "triton"}
    assert gpu == {"not measured"}
    reference = {t["key"]: t for t in doc["targets"] if t["path"] == "reference"}
    assert set(reference) == set(REFERENCE_GOALS)
    for key, t in reference.items():
        assert t["verdict"] in ("pass", "fall short"), (key, t)
        assert t["bound"] == REFERENCE_GOALS[key]


@pytest.mark.slow
def test_quick_run_host_overhead_cases(quick_run):
    """Cases C1-C5: native and manualbp timed side by side (interleaved, same repetition count),
    on one thread, with their ratio printed against the goal."""
    proc, out = quick_run
    doc = json.loads((out / "results.json").read_text())
    host = [c for c in doc["cases"] if c["params"].get("goal")]
    assert len(host) == 5
    for case in host:
        assert case["threads"] == 1
        native = case["results"]["fwd+bwd"]["native"]
        mine = case["results"]["fwd+bwd"]["manualbp"]
        assert native["status"] == mine["status"] == "ran", case["name"]
        assert native["n_reps"] == mine["n_reps"] >= 40
        assert native["method"].startswith("interleaved")
        ratio = case["speedups"]["fwd+bwd"]["native_vs_manualbp"]
        assert math.isclose(ratio, mine["median_ms"] / native["median_ms"])
        assert f"{case['name']} fwd+bwd: manualbp/native {ratio:.3f}x" in proc.stdout
    zstd8 = next(c for c in host if c["params"].get("z_std") == 8.0)
    assert zstd8["params"]["K"] == 1024 and zstd8["params"]["N"] == 1024


def _case(group, params, mode, times, pct=None, mem=None, bound=None):
    pct, mem, bound = pct or {}, mem or {}, bound or {}
    results = {
        p: {"status": "ran", "median_ms": t, "pct_of_ceiling": pct.get(p),
            "pct_of_bound": bound.get(p)}
        for p, t in times.items()
    }  # fmt: skip
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
                mem={"native": 1000, "manualbp": 1100},
            ),
        ],
    }  # fmt: skip
    verdicts = {t["key"]: t["verdict"] for t in evaluate_targets(doc)}
    assert verdicts["linear_gelu_vs_native"] == "pass"  # 1.2x >= 1.0x
    assert verdicts["linear_gelu_vs_compile"] == "pass"  # 1.0x >= 1.0x
    assert verdicts["mse_vs_native"] == "pass"
    assert verdicts["mse_bandwidth"] == "pass"
    assert verdicts["linear_mse_peak_memory"] == "fall short"  # 1.1x > 1.0x
    assert verdicts["sgd_vs_fused"] == "not measured"
    assert verdicts["mlp_step_vs_native"] == "not measured"
    doc["label"] = "CPU: reference path, does not measure the Triton kernels"
    assert {t["verdict"] for t in evaluate_targets(doc)} == {"not measured"}


def test_every_target_states_its_ceiling():
    """A target no kernel could meet is a wrong target: each states the best any could do (by
    bytes and FLOPs), and a speedup target's bound is at most the ceiling's figure."""
    from benchmarks.targets import TARGETS

    for t in TARGETS:
        assert t.ceiling, t.key
        stated = re.match(r"[>~]?\s*([\d.]+)x", t.ceiling)  # the speedup ceiling, if a figure
        if stated and t.unit == "x" and not t.lower_is_better:
            assert t.bound <= float(stated.group(1)), (t.key, t.bound, t.ceiling)


def test_gemm_target_and_reference_goals_on_synthetic_results():
    """GEMM efficiency is judged on mode ``gemms`` alone (torch.matmul time / manualbp time);
    the reference-path goals on time(manualbp) / time(native), lower is better, on any run."""
    from benchmarks.targets import REFERENCE_GOALS, evaluate_targets

    gemm = _case("linear", {"activation": "gelu"}, "gemms", {"native": 0.96, "manualbp": 1.0})
    fast = _case("reference", {"goal": "ref_mse_4m"}, "fwd+bwd", {"native": 1.0, "manualbp": 1.04})
    slow = _case("host_overhead", {"goal": "host_mse_tiny"}, "fwd+bwd",
                 {"native": 1.0, "manualbp": 1.5})  # fmt: skip
    doc = {"label": "CUDA: manualbp runs its Triton kernels", "cases": [gemm, fast, slow]}
    by_key = {t["key"]: t for t in evaluate_targets(doc)}
    assert by_key["gemm_pct_of_matmul"]["verdict"] == "pass"  # 96% >= 95%
    assert math.isclose(by_key["gemm_pct_of_matmul"]["worst"]["value"], 96.0)
    assert by_key["ref_mse_4m"]["verdict"] == "pass"  # 1.04x <= 1.05x
    assert by_key["host_mse_tiny"]["verdict"] == "fall short"  # 1.5x > 1.3x
    assert by_key["host_linear_tiny"]["verdict"] == "not measured"
    doc["label"] = "CPU: reference path, does not measure the Triton kernels"
    by_key = {t["key"]: t for t in evaluate_targets(doc)}
    assert by_key["gemm_pct_of_matmul"]["verdict"] == "not measured"
    assert by_key["host_mse_tiny"]["verdict"] == "fall short"
    assert set(REFERENCE_GOALS) <= set(by_key)


def test_fused_mlp_cases_run_on_cpu(monkeypatch):
    """The fused narrow MLP's training step and inference cases, tiny, on the CPU (reference
    path): every non-compile provider runs, matches native (loss and every gradient), and
    reports samples/s, TFLOP/s and % of the bound; torch.compile is skipped with a reason."""
    import torch

    from benchmarks import measure

    # One thread (the shared CI cores), and no gc.collect between providers (~0.4 s each in a
    # full pytest process; it only matters for a GPU's peak-memory figure).
    monkeypatch.setattr(measure, "_cleanup", lambda device: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_fused_mlp_cases(torch)
    finally:
        torch.set_num_threads(threads)


def _run_fused_mlp_cases(torch):
    from benchmarks.cases import (
        COMPILE_PROVIDERS,
        MANUALBP,
        MANUALBP_CONVERT,
        NATIVE,
        fused_mlp_infer_case,
        fused_mlp_step_case,
    )
    from benchmarks.measure import Context, new_record, run_pass
    from benchmarks.report import format_case
    from benchmarks.suites import schedule

    cpu = torch.device("cpu")
    # Made-up ceilings: only that % of ceiling and of the bound are computed is checked here.
    ceilings = {"matmul": {"fp32": {"tflops": 0.1}}, "bandwidth": {"gbps": 10.0}}
    ctx = Context(device=cpu, label="cpu", ceilings=ceilings, warmup_ms=1.0, rep_ms=5.0,
                  min_reps=2, max_reps=3)  # fmt: skip
    step = fused_mlp_step_case(48, 64, torch.float32, cpu, 0)
    infer = fused_mlp_infer_case(48, 64, torch.float32, cpu, 0)
    assert step.params["dims"] == [32, 64, 64, 64, 64, 16]
    for case, mode, ran in ((step, "step", (NATIVE, MANUALBP, MANUALBP_CONVERT)),
                            (infer, "infer", (NATIVE, MANUALBP))):  # fmt: skip
        (p,) = schedule([case])
        rec = new_record(case, ctx.label)
        run_pass(p, ctx, rec)
        assert rec["status"] == "ran" and rec["samples"] == 48
        for provider in case.providers:
            prec = rec["providers"][provider]
            if provider in COMPILE_PROVIDERS:
                assert prec["status"] == "skipped" and "torch.compile" in prec["reason"]
                continue
            assert provider in ran and prec["status"] == "ran", (provider, prec)
            res = rec["results"][mode][provider]
            assert math.isclose(res["samples_per_s"], 48 / (res["median_ms"] * 1e-3))
            for key in ("tflops", "pct_of_ceiling", "bound_ms", "pct_of_bound"):
                assert res[key] is not None and math.isfinite(res[key]) and res[key] > 0, key
            if provider != NATIVE:
                assert prec["check"]["ok"], prec["check"]
                assert f"{provider}_vs_native" in rec["speedups"][mode]
        assert "Msamples/s" in format_case(rec)


def test_fused_mlp_targets_on_synthetic_results():
    """The fused-MLP goals are judged at width 64, 4 hidden layers, 2^18 rows only: training
    >= 3x eager and >= 2x torch.compile (each compile mode measured), inference >= 4x eager."""
    from benchmarks.targets import evaluate_targets

    shape = {"width": 64, "num_hidden_layers": 4, "M": 1 << 18}
    step = _case(
        "fused_mlp_step",
        shape,
        "step",
        {"native": 3.3, "compile": 2.4, "compile_max_autotune": 1.8, "manualbp": 1.0},
    )
    other = _case(
        "fused_mlp_step",
        {**shape, "M": 1 << 16},
        "step",
        {"native": 1.0, "compile": 1.0, "manualbp": 1.0},
    )
    infer = _case("fused_mlp_infer", shape, "infer", {"native": 3.0, "manualbp": 1.0})
    doc = {"label": "CUDA: manualbp runs its Triton kernels", "cases": [step, other, infer]}
    by_key = {t["key"]: t for t in evaluate_targets(doc)}
    assert by_key["fused_mlp_train_vs_native"]["verdict"] == "pass"  # 3.3x >= 3x
    assert by_key["fused_mlp_train_vs_native"]["n_measured"] == 1  # 2^16 rows not judged
    vs_compile = by_key["fused_mlp_train_vs_compile"]
    assert vs_compile["verdict"] == "fall short" and vs_compile["n_measured"] == 2
    assert "compile_max_autotune" in vs_compile["worst"]["where"]  # 1.8x < 2x
    assert by_key["fused_mlp_infer_vs_native"]["verdict"] == "fall short"  # 3x < 4x


def test_linear_targets_on_synthetic_results():
    """The "Linear on the GPU" goals: Linear+GELU never slower than eager, and at the two
    stated shapes >= 1.0x eager and compile (GEMM-bound) and >= 1.15x eager (fusion-bound);
    plain Linear fwd+bwd >= 1.0x native; every Linear case >= 85% of its bound. Only the
    ``manualbp`` provider (the per-shape choice) is judged, not the forced candidates."""
    from benchmarks.targets import evaluate_targets

    def linear(act, M, K, N, times, bound=None):
        c = _case("linear", {"activation": act, "M": M, "K": K, "N": N}, "fwd+bwd", times,
                  bound=bound)  # fmt: skip
        c["name"] = f"linear/{act}/M{M}_K{K}_N{N}"
        return c

    gemm_bound = linear("gelu", 8192, 4096, 16384,
                        {"native": 1.01, "compile": 0.99, "manualbp": 1.0,
                         "manualbp_cublas": 0.9},  # a forced candidate slower: not judged
                        bound={"manualbp": 90.0})  # fmt: skip
    fusion_bound = linear("gelu", 65536, 1024, 1024, {"native": 1.1, "manualbp": 1.0},
                          bound={"manualbp": 80.0})  # fmt: skip
    plain = linear(None, 8192, 4096, 4096, {"native": 1.0, "manualbp": 1.0})
    doc = {"label": "CUDA: manualbp runs its Triton kernels",
           "cases": [gemm_bound, fusion_bound, plain]}  # fmt: skip
    by_key = {t["key"]: t for t in evaluate_targets(doc)}
    assert by_key["linear_gelu_vs_native"]["verdict"] == "pass"  # 1.01x and 1.1x >= 1.0x
    gemm = by_key["linear_gelu_gemm_bound"]
    assert gemm["verdict"] == "fall short" and gemm["n_measured"] == 2  # vs native and compile
    assert gemm["worst"]["where"].endswith("vs compile")  # 0.99x < 1.0x
    fusion = by_key["linear_gelu_fusion_bound"]
    assert fusion["verdict"] == "fall short" and fusion["n_measured"] == 1  # 1.1x < 1.15x
    assert by_key["linear_plain_vs_native"]["verdict"] == "pass"  # 1.0x >= 1.0x
    pct = by_key["linear_pct_of_bound"]
    assert pct["verdict"] == "fall short" and pct["n_measured"] == 2  # 80% < 85%
    assert "65536" in pct["worst"]["where"]


def _linear_candidate_case(torch, device):
    from benchmarks.cases import linear_case

    # Odd, tiny: the Triton kernels run under the CPU interpreter here.
    return linear_case(24, 40, 16, "gelu", torch.float32, device, 0, candidates=True)


def test_linear_candidates_skip_on_reference_path(monkeypatch):
    """On the CPU's reference path there is no candidate to force: the forced providers are
    skipped with the reason, the rest of the case runs."""
    import torch

    from benchmarks import measure
    from benchmarks.cases import LINEAR_CANDIDATES, MANUALBP, NATIVE
    from benchmarks.measure import Context, new_record, run_pass
    from benchmarks.suites import schedule

    monkeypatch.setattr(measure, "_cleanup", lambda device: None)
    cpu = torch.device("cpu")
    case = _linear_candidate_case(torch, cpu)
    (p,) = schedule([case])
    ctx = Context(device=cpu, label="cpu", ceilings={}, warmup_ms=1.0, rep_ms=2.0, min_reps=1,
                  max_reps=2, wanted={NATIVE, MANUALBP, *LINEAR_CANDIDATES})  # fmt: skip
    rec = new_record(case, ctx.label)
    run_pass(p, ctx, rec)
    assert rec["status"] == "ran"
    assert rec["providers"][MANUALBP]["check"]["ok"]
    for provider in LINEAR_CANDIDATES:
        prec = rec["providers"][provider]
        assert prec["status"] == "skipped" and "reference" in prec["reason"], prec
        assert rec["results"]["fwd+bwd"][provider]["status"] == "skipped"


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernels under the interpreter"
)
def test_linear_candidates_force_their_candidate(monkeypatch):
    """On the Triton backend each forced provider runs its own candidate for every forward,
    dX and dW (prepare, timed run and output check alike) and matches native; outside its
    calls nothing stays forced."""
    import torch
    from manualbp.kernels import _tuning
    from manualbp.kernels import linear as lc

    import manualbp
    from benchmarks.cases import LINEAR_CANDIDATES, NATIVE

    monkeypatch.delenv(lc.IMPL_ENV, raising=False)
    ran: list[str] = []
    for op, table in (("fwd", lc.FORWARDS), ("dx", lc.GEMMS["dx"]), ("dw", lc.GEMMS["dw"])):
        for impl, fn in list(table.items()):

            def spy(*args, _fn=fn, _tag=f"{op}:{impl}"):
                ran.append(_tag)
                return _fn(*args)

            monkeypatch.setitem(table, impl, spy)
    cpu = torch.device("cpu")
    case = _linear_candidate_case(torch, cpu)
    one = case.make_set(0)
    ref = case.bind(NATIVE).output(one)
    _tuning.clear()
    with manualbp.use_backend("triton"):
        for provider, impl in LINEAR_CANDIDATES.items():
            ran.clear()
            bound = case.bind(provider)
            assert f"force({impl!r})" in bound.label
            out = bound.output(one)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            prepare, run = bound.modes["fwd+bwd"]
            run(prepare(one))
            prepare, run = bound.modes["bwd"]
            run(prepare(one))
            assert one["x"].grad is not None
            assert set(ran) == {f"{op}:{impl}" for op in ("fwd", "dx", "dw")}, ran
            assert lc.mode() == "auto"  # restored after each call
    assert _tuning.decisions() == {}  # nothing was chosen
    # manualbp itself chooses (here with a timer that prefers cuBLAS); its record lists what
    # it kept for the case's forward, dX and dW buckets.
    from benchmarks.cases import MANUALBP, _choices_of
    from benchmarks.report import _choice_note

    def timer(run, impl):
        run()
        return 1.0 if impl == "cublas" else 2.0

    with manualbp.use_backend("triton"), _tuning.use_timer(timer):
        prepare, run = case.bind(MANUALBP).modes["fwd+bwd"]
        run(prepare(one))
    kept = _choices_of(24, 40, 16, "gelu", torch.float32)
    assert sorted(k.split("|")[0] for k in kept) == ["dw", "dx", "fwd"]
    assert set(kept.values()) == {"cublas"}
    assert _choices_of(24, 40, 16, None, torch.float32).keys() == kept.keys() - {
        k for k in kept if k.startswith("fwd")
    }  # dX and dW buckets do not depend on the activation
    assert _choice_note(kept) == "kept fwd=cublas dx=cublas dw=cublas"
    _tuning.clear()
