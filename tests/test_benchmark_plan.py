"""The benchmark plan (``python -m benchmarks --plan``), run order, bounds and precompile wiring.

All on the CPU: the plan models the H200 runs of ``benchmarks/gpu_run.sh`` without a GPU.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import plan
from benchmarks.bounds import (
    best_time_s,
    linear_min_bytes,
    mlp_flops,
    mlp_infer_min_bytes,
    mlp_step_min_bytes,
)
from benchmarks.cases import (
    COMPILE,
    COMPILE_MAX_AUTOTUNE,
    MANUALBP,
    MANUALBP_CONVERT,
    NATIVE,
)
from benchmarks.suites import (
    GPU_BOUND_SHAPES,
    GPU_NARROW_LOG2_M,
    GPU_NARROW_WIDTHS,
    P_BOUND,
    P_DEFERRED,
    build_cases,
    schedule,
)

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")  # only names the suite: nothing is allocated


def _passes():
    return schedule(build_cases(CUDA, quick=False))


def test_priority0_fits_gpu_run_window():
    """Every priority-0 pass, with all its Triton compiles, autotuning and torch.compile
    warm-ups (estimated serially), ends before the runner stops starting passes."""
    totals = plan.priority_totals(plan.estimate(_passes()))
    assert plan.PRIORITY0_CAP_S == 160
    assert totals[0] <= plan.PRIORITY0_CAP_S, totals
    # The window: gpu_run.sh's 6 minutes less its test phase and reserves.
    assert plan.PRIORITY0_CAP_S + plan.GPU_RUN_TEST_S <= 6 * 60


def test_gpu_run_defaults_match_plan():
    script = (ROOT / "benchmarks" / "gpu_run.sh").read_text()

    def default(var: str) -> str:
        m = re.search(rf"^{var}=\$\{{{var}:-([^}}]+)\}}", script, re.M)
        assert m, var
        return m.group(1)

    assert int(default("TOTAL_BUDGET_S")) == plan.GPU_RUN_TOTAL_S
    assert int(default("TEST_LIMIT_S")) == plan.GPU_RUN_TEST_S
    assert int(default("RESERVE_S")) == plan.GPU_RUN_RESERVE_S
    assert int(default("STOP_MARGIN_S")) == plan.RUNNER_STOP_MARGIN_S
    assert "PY=${PYTHON:-python3}" in script  # the GPU machine has python3, no python
    assert "runner_budget=$((left - STOP_MARGIN_S))" in script


def test_priority0_order_most_valuable_first():
    first = [p for p in _passes() if p.priority == 0]
    groups = [(p.case.group, p.case.params.get("activation")) for p in first]
    assert groups[0] == ("linear", "gelu") and first[0].case.dtype == torch.bfloat16
    assert COMPILE in first[0].providers  # a target compares Linear+GELU with torch.compile
    order = ["linear", "mlp_step", "mse", "linear_mse", "fused_mlp_step", "fused_mlp_infer"]
    seen = [g for g, _ in groups]
    assert sorted(set(seen), key=seen.index) == order
    assert ("linear", None) in groups  # plain Linear
    # torch.compile of the other priority-0 cases runs in a later pass, not dropped.
    deferred = {
        p.case.name for p in _passes() if p.priority == P_DEFERRED and COMPILE in p.providers
    }
    assert deferred == {p.case.name for p in first if COMPILE not in p.providers}


def test_section5_cases_after_priority0():
    passes = _passes()
    bound = [p for p in passes if p.priority == P_BOUND]
    shapes = {(p.case.params["M"], p.case.params["K"], p.case.params["N"]) for p in bound}
    assert shapes == set(GPU_BOUND_SHAPES)
    for p in bound:
        assert p.case.params["activation"] == "gelu" and p.case.dtype == torch.bfloat16
        assert "gemms" in p.case.modes and p.case.min_bytes["gemms"] > 0
        assert set(p.providers) >= {"native", COMPILE, MANUALBP}
    first_bound = min(passes.index(p) for p in bound)
    assert all(i < first_bound for i, p in enumerate(passes) if p.priority == 0)


def test_plan_counts_compiles_from_config_lists():
    from manualbp.kernels._matmul import configs_for

    est = plan.estimate(_passes())
    first = est[0]  # Linear+GELU bf16: forward (epilogue configs), dX and dW GEMMs, 2 fixed
    n_epi = len(configs_for(90, torch.bfloat16, "ieee", epilogue=True))
    n_mm = len(configs_for(90, torch.bfloat16, "ieee"))
    assert first.triton_compiles == n_epi + 2 * n_mm + 2
    assert first.torch_compiles == 1
    # The same shape class later compiles nothing new: only its autotuning runs again.
    gelu_1024 = next(e for e in est if e.name == "linear/gelu/bf16/M8192_K1024_N4096")
    assert gelu_1024.triton_compiles == 0 and gelu_1024.autotune_configs > 0


def test_plan_kernels_exist():
    """The launch model names kernels that exist (kept in step with triton_kernels/)."""
    for ref in plan.KERNELS:
        module, attr = ref.split(":")
        mod = importlib.import_module(f"manualbp.kernels.{module}")
        assert hasattr(mod, attr), ref


@pytest.mark.slow
def test_plan_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--plan"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TRITON_COMPILE_S=2.5" in proc.stdout
    m = re.search(r"priority-0 total ([\d.]+) s; cap (\d+) s", proc.stdout)
    assert m and float(m.group(1)) <= float(m.group(2)), proc.stdout[-1500:]
    assert "linear/gelu/bf16/M8192_K4096_N16384" in proc.stdout


def test_bound_is_roofline_max():
    b = linear_min_bytes(8, 4, 16, "gelu", 2, gemms=True)
    # fwd: X 32 + W 64 + b 16 + Y 128 + Z 128; bwd: dY 128 + Z 128 + X 32 + W 64 + dX 32
    # + dW 64 + db 16 (elements, 2 bytes each)
    assert b["fwd"] == 2 * (32 + 64 + 16 + 128 + 128)
    assert b["bwd"] == 2 * (128 + 128 + 32 + 64 + 32 + 64 + 16)
    assert b["fwd+bwd"] == b["fwd"] + b["bwd"]
    assert b["gemms"] == 2 * 3 * (32 + 64 + 128)
    assert linear_min_bytes(8, 4, 16, None, 2)["fwd"] == 2 * (32 + 64 + 16 + 128)
    assert best_time_s(2e12, 1e9, 1000.0, 1000.0) == pytest.approx(2e-3)  # compute-bound
    assert best_time_s(1e9, 4e9, 1000.0, 1000.0) == pytest.approx(4e-3)  # memory-bound
    assert best_time_s(1e9, 1e9, None, 1000.0) is None


def test_precompile_warms_up_instead_of_tuning():
    """Under the patch an autotuned launch submits every config's warm-up with triton's
    AsyncCompileMode active (only then), launches nothing, and the patch is undone after."""
    import triton
    import triton.language as tl
    from triton.runtime import _async_compile
    from triton.runtime.autotuner import Autotuner

    from benchmarks.precompile import _warm_up_instead_of_tuning

    @triton.jit
    def kernel(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)

    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64)]
    tuned = triton.autotune(configs=configs, key=[])(kernel)
    seen = []

    def fake_warmup(*args, **kwargs):
        seen.append((_async_compile.active_mode.get(), args, kwargs))
        return [object()] * len(configs)

    tuned.warmup = fake_warmup
    original = Autotuner.run
    mode, counter = object(), [0]
    with _warm_up_instead_of_tuning(mode, counter):
        assert tuned[(1,)]("x", 7) is None
        assert _async_compile.active_mode.get() is None
    assert Autotuner.run is original
    assert counter == [3]
    (active, args, kwargs), = seen  # fmt: skip
    assert active is mode and args == ("x", 7)
    assert kwargs == {"grid": (1,)}


def test_precompile_skips_without_cuda():
    from benchmarks.precompile import precompile_provider

    case = build_cases(torch.device("cpu"), quick=True)[0]
    out = precompile_provider(case, MANUALBP, torch.device("cpu"))
    assert out["status"] == "skipped" and "CUDA" in out["reason"]


def _ctx(**kw):
    from benchmarks.measure import Context

    opts = dict(warmup_ms=1.0, rep_ms=2.0, min_reps=3, max_reps=5)
    return Context(device=torch.device("cpu"), label="cpu", ceilings={}, **opts, **kw)


def test_deferred_provider_pass_completes_the_record():
    """A provider deferred to a later pass is marked so until that pass runs, then measured
    and checked against the native output of the first pass."""
    from benchmarks.cases import NATIVE, mse_case
    from benchmarks.measure import new_record, run_pass

    case = mse_case(10, torch.float32, torch.device("cpu"), 0, provider_priority={MANUALBP: 2})
    passes = schedule([case])
    assert [(p.priority, p.providers, p.first) for p in passes] == [
        (0, (NATIVE, COMPILE), True),
        (2, (MANUALBP,), False),
    ]
    ctx = _ctx()
    rec = new_record(case, ctx.label)
    run_pass(passes[0], ctx, rec)
    assert rec["providers"][MANUALBP]["status"] == "skipped"
    assert "deferred" in rec["providers"][MANUALBP]["reason"]
    assert rec["results"]["fwd+bwd"][NATIVE]["status"] == "ran"
    run_pass(passes[1], ctx, rec)
    assert rec["status"] == "ran"
    assert rec["providers"][MANUALBP]["check"]["ok"]
    assert rec["results"]["fwd+bwd"][MANUALBP]["status"] == "ran"
    assert "manualbp_vs_native" in rec["speedups"]["fwd+bwd"]


def test_skipped_deferred_pass_says_why():
    from benchmarks.cases import mse_case
    from benchmarks.measure import new_record, run_pass, skip_pass

    case = mse_case(10, torch.float32, torch.device("cpu"), 0, provider_priority={MANUALBP: 2})
    first, later = schedule([case])
    ctx = _ctx()
    rec = new_record(case, ctx.label)
    run_pass(first, ctx, rec)
    skip_pass(later, rec, "time budget of 1 s exhausted")
    assert rec["results"]["fwd+bwd"][MANUALBP] == {
        "status": "skipped",
        "reason": "time budget of 1 s exhausted",
    }
    assert rec["status"] == "ran"  # native ran


# ---------------------------------------------------------------------------------------------
# The fused narrow MLP (issue 15)
# ---------------------------------------------------------------------------------------------


def test_fused_mlp_headline_in_priority0():
    """The goals' shape (width 64, 4 hidden layers, 2^18 rows, bf16): the training step with
    eager and torch.compile and the inference with eager at priority 0; convert, max-autotune
    and inference's torch.compile later, not dropped."""
    passes = _passes()
    step = [p for p in passes if p.case.name == "fused_mlp_step/bf16/w64x4_M2^18"]
    infer = [p for p in passes if p.case.name == "fused_mlp_infer/bf16/w64x4_M2^18"]
    assert step[0].priority == 0 and set(step[0].providers) == {NATIVE, MANUALBP, COMPILE}
    later = {prov: p.priority for p in step[1:] for prov in p.providers}
    assert set(later) == {MANUALBP_CONVERT, COMPILE_MAX_AUTOTUNE} and min(later.values()) > 0
    assert infer[0].priority == 0 and set(infer[0].providers) == {NATIVE, MANUALBP}
    assert [(p.priority, p.providers) for p in infer[1:]] == [(P_DEFERRED, (COMPILE,))]
    params = step[0].case.params
    assert params["dims"] == [32, 64, 64, 64, 64, 16] and params["num_hidden_layers"] == 4
    assert params["M"] == 1 << 18 and step[0].case.samples == 1 << 18


def test_fused_mlp_sweep_covers_widths_batches_dtypes():
    cases = {p.case.name: p.case for p in _passes() if p.case.group == "fused_mlp_step"}
    seen = {(c.params["width"], c.params["log2_M"], c.params["dtype"]) for c in cases.values()}
    want = {(w, m, d) for w in GPU_NARROW_WIDTHS for m in GPU_NARROW_LOG2_M
            for d in ("bf16", "fp16")}  # fmt: skip
    assert seen == want
    # max-autotune (~90 s a shape) only at 2^18 rows.
    tuned = {c.params["log2_M"] for c in cases.values() if COMPILE_MAX_AUTOTUNE in c.providers}
    assert tuned == {18}
    assert all(COMPILE in c.providers and MANUALBP in c.providers for c in cases.values())


def test_plan_counts_fused_mlp_compiles():
    """Training compiles the forward, backward chain, weight-gradient and reduction kernels
    once per (dtype, width), inference one forward more; max-autotune is estimated as such."""
    est = {(e.name, e.providers): e for e in plan.estimate(_passes())}
    step = est[("fused_mlp_step/bf16/w64x4_M2^18", (NATIVE, MANUALBP, COMPILE))]
    assert step.triton_compiles == 4  # bf16 MSE and SGD were compiled by the MLP step before
    assert step.torch_compiles == 2  # model + loss, and optimizer.step
    seconds = 3 * plan.FUSED_MLP_COMPILE_S[64] + plan.FUSED_MLP_REDUCE_COMPILE_S
    assert step.triton_s == pytest.approx(seconds)
    infer = est[("fused_mlp_infer/bf16/w64x4_M2^18", (NATIVE, MANUALBP))]
    assert infer.triton_compiles == 1 and infer.torch_compiles == 0
    tuned = est[("fused_mlp_step/bf16/w64x4_M2^18", (COMPILE_MAX_AUTOTUNE,))]
    assert tuned.torch_compile_s >= plan.TORCH_COMPILE_MAX_AUTOTUNE_S >= 60
    # The sweep: other batches of a compiled (dtype, width) compile nothing new.
    other = next(e for (n, _), e in est.items() if n == "fused_mlp_step/bf16/w64x4_M2^20")
    assert other.triton_compiles == 0


def test_fused_mlp_bound_model():
    dims = (32, 64, 64, 64, 64, 16)
    kn = 32 * 64 + 3 * 64 * 64 + 64 * 16
    assert mlp_flops(10, dims, train=False) == 2 * 10 * kn
    assert mlp_flops(10, dims, train=True) == 6 * 10 * kn - 2 * 10 * 32 * 64
    assert mlp_flops(10, dims, train=True, input_grad=True) == 6 * 10 * kn
    w, b = kn, 4 * 64 + 16
    # rows: X 32 + T 16 read; 4 saved hidden tensors of 64 and the prediction (16), each
    # written and read; parameters: forward W+b, backward W, gradients W+b, SGD 5(W+b).
    rows = 32 + 16 + 2 * 4 * 64 + 2 * 16
    assert mlp_step_min_bytes(10, dims, 2, momentum=True) == 2 * (
        10 * rows + w + b + w + 6 * (w + b)
    )
    assert mlp_step_min_bytes(10, dims, 2) == 2 * (10 * rows + w + b + w + 4 * (w + b))
    assert mlp_infer_min_bytes(10, dims, 2) == 2 * (10 * (32 + 16) + w + b)
