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
    LINEAR_CANDIDATES,
    MANUALBP,
    MANUALBP_CONVERT,
    MANUALBP_CUBLAS,
    MANUALBP_TRITON,
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
        p.case.name
        for p in _passes()
        if p.priority in (P_BOUND, P_DEFERRED) and not p.first and COMPILE in p.providers
    }
    early = [p for p in _passes() if p.priority in (0, P_BOUND) and p.first]
    assert deferred == {p.case.name for p in early if COMPILE not in p.providers}
    assert {p.case.name for p in first if COMPILE not in p.providers} <= deferred


def test_issue13_shapes_in_the_window():
    """Linear+GELU at the decisive shapes runs in priority 0 against eager (its torch.compile
    pass right after priority 0); plain Linear there right after too."""
    passes = _passes()
    by_shape = [p for p in passes if p.case.group == "linear"
                and (p.case.params["M"], p.case.params["K"], p.case.params["N"])
                in set(GPU_BOUND_SHAPES) and p.priority <= P_BOUND]  # fmt: skip
    acts = {(p.case.params["activation"], (p.case.params["M"], p.case.params["K"],
             p.case.params["N"])) for p in by_shape}  # fmt: skip
    assert acts == {(a, shape) for a in ("gelu", None) for shape in GPU_BOUND_SHAPES}
    for p in by_shape:
        assert p.case.dtype == torch.bfloat16
        if p.case.params["activation"] == "gelu":  # judged against eager and torch.compile
            assert "gemms" in p.case.modes and p.case.min_bytes["gemms"] > 0
            assert set(p.case.providers) >= {"native", COMPILE, MANUALBP}
            if p.first:
                assert p.priority == 0 and {"native", MANUALBP} <= set(p.providers)
            else:
                assert p.priority == P_BOUND and COMPILE in p.providers
        else:
            assert p.priority == P_BOUND and MANUALBP in p.providers
    first_bound = min(passes.index(p) for p in passes if p.priority == P_BOUND)
    assert all(i < first_bound for i, p in enumerate(passes) if p.priority == 0)


def test_linear_candidates_forced_later():
    """Every bf16 plain / GELU Linear case also measures each Linear candidate forced on its
    own, in a later pass than its own providers (so priority 0 keeps its cap)."""
    passes = _passes()
    cases = {p.case.name: p.case for p in passes}
    bf16 = [c for c in cases.values() if c.group == "linear" and c.dtype == torch.bfloat16
            and c.params["activation"] in (None, "gelu")]  # fmt: skip
    assert {(c.params["M"], c.params["K"], c.params["N"]) for c in bf16} >= set(GPU_BOUND_SHAPES)
    for c in bf16:
        assert set(LINEAR_CANDIDATES) <= set(c.providers), c.name
        assert min(c.priority_of(p) for p in LINEAR_CANDIDATES) > c.priority_of(MANUALBP)
    for p in passes:
        if p.priority == 0:
            assert not set(LINEAR_CANDIDATES) & set(p.providers), p.case.name
    deferred = {p.case.name for p in passes if p.priority == P_DEFERRED
                and set(LINEAR_CANDIDATES) <= set(p.providers)}  # fmt: skip
    first = {p.case.name for p in passes if p.priority in (0, P_BOUND) and p.case.group == "linear"}
    assert deferred == first


def _est(name: str, providers: tuple[str, ...] | None = None) -> plan.PassEstimate:
    return next(e for e in plan.estimate(_passes())
                if e.name == name and (providers is None or e.providers == providers))  # fmt: skip


def _case(name: str):
    return next(p.case for p in _passes() if p.case.name == name)


def test_plan_counts_hopper_configs_for_bf16():
    """On sm_90 the bf16 Linear GEMMs are the persistent TMA kernel's: the forward with its
    activation over the epilogue list, dX and dW over the uncapped list (each from
    _matmul_hopper); the first pass compiles those, the elementwise act' and bias passes and
    the cuBLAS candidate's epilogue pass, and times 3 choices (forward, dX, dW)."""
    from manualbp.kernels._matmul_hopper import hopper_configs_for

    bf16 = torch.bfloat16
    n_epi = len(hopper_configs_for(90, bf16, "ieee", epilogue=True))
    n_plain = len(hopper_configs_for(90, bf16, "ieee", epilogue=False))
    assert n_epi and n_plain
    first = plan.estimate(_passes())[0]  # Linear+GELU bf16 M8192 K4096 N4096
    assert first.name == "linear/gelu/bf16/M8192_K4096_N4096"
    assert first.triton_compiles == n_epi + 2 * n_plain + 3
    assert first.triton_s == pytest.approx(
        (n_epi + 2 * n_plain) * plan.TRITON_COMPILE_S + 3 * plan.ELEMENTWISE_COMPILE_S
    )
    assert first.autotune_configs == n_epi + 2 * n_plain
    assert first.choices == 3 and 0 < first.choice_s < 1
    assert first.torch_compiles == 1
    launches = plan.triton_launches(_case(first.name), MANUALBP)
    tma = [(lz.n_configs, lz.variant[-2:]) for lz in launches if lz.kernel == plan.K_TMA]
    # forward: x row-major, W read through its transpose; dX: both row-major; dW: dZ^T.
    assert tma == [(n_epi, (False, True)), (n_plain, (False, False)), (n_plain, (True, False))]
    assert not {plan.K_FWD, plan.K_MATMUL} & {lz.kernel for lz in launches}
    # IEEE fp32 stays on the pointer kernels.
    fp32 = plan.triton_launches(_case("linear/gelu/fp32/M8192_K4096_N4096"), MANUALBP)
    assert plan.K_TMA not in {lz.kernel for lz in fp32}
    assert {plan.K_FWD, plan.K_MATMUL} <= {lz.kernel for lz in fp32}
    # The same shape class later compiles nothing new: only its autotuning runs again.
    gelu_1024 = _est("linear/gelu/bf16/M8192_K1024_N4096", (NATIVE, COMPILE, MANUALBP))
    assert gelu_1024.triton_compiles == 0 and gelu_1024.autotune_configs > 0


def test_plan_counts_split_k_exactly_when_plan_splits():
    """dW's split-K (partial kernel + fixed-order reduction) is counted for a Linear case
    exactly when _splitk.plan_splits cuts its reduction over the 132 SMs of an H200."""
    from manualbp.kernels._splitk import CHUNK_ALIGN, MIN_CHUNK, plan_splits, splitk_config_for

    seen = set()
    for case in {p.case.name: p.case for p in _passes()}.values():
        if case.group != "linear":
            continue
        M, K, N = case.params["M"], case.params["K"], case.params["N"]
        precision = "tf32" if plan._precision(case.dtype) == "tf32" else "ieee"
        cfg = splitk_config_for(90, case.dtype, precision)
        tiles = -(-N // cfg["BLOCK_M"]) * -(-K // cfg["BLOCK_N"])
        splits = plan_splits(tiles, M, 132, min_chunk=MIN_CHUNK["cuda"],
                             align=CHUNK_ALIGN["cuda"]).splits  # fmt: skip
        assert plan.dw_splits(M, K, N, case.dtype) == splits
        kernels = [lz.kernel for lz in plan.triton_launches(case, MANUALBP)]
        n = kernels.count(plan.K_SPLITK)
        assert n == (0 if splits == 1 else 1 + ("gemms" in case.modes)), case.name
        assert kernels.count(plan.K_SPLITK_REDUCE) == n
        seen.add(splits > 1)
    assert seen == {True, False}
    # The narrow layer: 8 x 8 output tiles for 132 SMs.
    assert plan.dw_splits(65536, 1024, 1024, torch.bfloat16) > 1
    assert plan.dw_splits(8192, 4096, 4096, torch.bfloat16) == 1


def test_plan_counts_candidates_per_provider():
    """manualbp (auto) compiles both candidates and times each bucket once; a forced
    candidate compiles only its own kernels and times nothing."""
    case = _case("linear/gelu/bf16/M8192_K4096_N16384")
    auto = plan.provider_work(case, MANUALBP)
    triton = plan.provider_work(case, MANUALBP_TRITON)
    cublas = plan.provider_work(case, MANUALBP_CUBLAS)
    assert [c.key.split("|")[0] for c in auto.choices] == ["fwd", "dx", "dw"]
    assert all(c.seconds > 0 for c in auto.choices)
    assert not triton.choices and not cublas.choices
    gemm_kernels = {plan.K_TMA, plan.K_FWD, plan.K_MATMUL, plan.K_SPLITK}
    assert not gemm_kernels & {lz.kernel for lz in cublas.launches}
    assert plan.K_EPILOGUE in {lz.kernel for lz in cublas.launches}  # bias is in addmm
    assert plan.K_EPILOGUE not in {lz.kernel for lz in triton.launches}
    assert {lz.kernel for lz in auto.launches} >= {lz.kernel for lz in triton.launches} | {
        lz.kernel for lz in cublas.launches
    }
    # Plain bf16 Linear: addmm's output is y, no elementwise pass.
    plain = plan.provider_work(_case("linear/none/bf16/M8192_K4096_N4096"), MANUALBP_CUBLAS)
    assert plan.K_EPILOGUE not in {lz.kernel for lz in plain.launches}
    # The forced passes compile and time nothing new.
    for e in plan.estimate(_passes()):
        if set(e.providers) <= set(LINEAR_CANDIDATES):
            assert (e.triton_compiles, e.autotune_configs, e.choices) == (0, 0, 0), e.name


def test_plan_counts_chain_kernel_in_mlp_step():
    """The MLP step through convert: manualbp.Sequential runs the 4 layers as 2 Linear -> GELU
    -> Linear pairs, each backward with one chain GEMM (act' and db in its epilogue)."""
    from manualbp.kernels.linear_backward import chain_configs

    case = _case("mlp_step/bf16/M8192_1024-4096-4096-4096-1024")
    assert plan.chain_pairs(4) == [(0, 1), (2, 3)] and plan.chain_pairs(3) == [(0, 1), (2,)]
    chains = [lz for lz in plan.triton_launches(case, MANUALBP) if lz.kernel == plan.K_CHAIN]
    assert len(chains) == 2
    assert all(lz.n_configs == len(chain_configs(90, torch.bfloat16, "ieee")) for lz in chains)
    assert chains[0].variant == chains[1].variant  # compiled once, tuned per size bucket
    assert chains[0].tune_key != chains[1].tune_key
    step = _est(case.name, (NATIVE, MANUALBP))
    assert step.triton_compiles >= len(chain_configs(90, torch.bfloat16, "ieee"))


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
    assert "TRITON_COMPILE_S=2.5" in proc.stdout and "choose_s" in proc.stdout
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
    """The goals' shape (width 64, 4 hidden layers, 2^18 rows, bf16): the training step and
    the inference with eager at priority 0, the step's torch.compile first thing after it;
    convert, max-autotune and inference's torch.compile later, not dropped."""
    passes = _passes()
    step = [p for p in passes if p.case.name == "fused_mlp_step/bf16/w64x4_M2^18"]
    infer = [p for p in passes if p.case.name == "fused_mlp_infer/bf16/w64x4_M2^18"]
    assert step[0].priority == 0 and set(step[0].providers) == {NATIVE, MANUALBP}
    later = {prov: p.priority for p in step[1:] for prov in p.providers}
    assert set(later) == {COMPILE, MANUALBP_CONVERT, COMPILE_MAX_AUTOTUNE}
    assert later[COMPILE] == P_BOUND and min(later.values()) > 0
    assert passes.index(step[1]) == min(i for i, p in enumerate(passes) if p.priority > 0)
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
    step = est[("fused_mlp_step/bf16/w64x4_M2^18", (NATIVE, MANUALBP))]
    assert step.triton_compiles == 4  # bf16 MSE and SGD were compiled by the MLP step before
    seconds = 3 * plan.FUSED_MLP_COMPILE_S[64] + plan.FUSED_MLP_REDUCE_COMPILE_S
    assert step.triton_s == pytest.approx(seconds)
    compiled = est[("fused_mlp_step/bf16/w64x4_M2^18", (COMPILE,))]
    assert compiled.torch_compiles == 2  # model + loss, and optimizer.step
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
