"""The benchmark plan (``python -m benchmarks --plan``), run order, bounds and precompile wiring.

All on the CPU: the plan records, on meta tensors, what the kernels would launch on the H100 /
H200 runs of ``benchmarks/gpu_run.sh``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from manualbp.kernels import _host, _tuning
from manualbp.kernels._host import Decision, Launch

import manualbp
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
    TRITON_PROVIDERS,
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
    totals = plan.priority_totals(_estimates())
    assert plan.PRIORITY0_CAP_S == 165
    assert totals[0] <= plan.PRIORITY0_CAP_S, totals
    # The window: gpu_run.sh's total less its environment and test phases and reserves.
    window = plan.GPU_RUN_TOTAL_S - plan.GPU_RUN_ENV_S - plan.GPU_RUN_TEST_S
    assert window - plan.GPU_RUN_RESERVE_S - plan.RUNNER_STOP_MARGIN_S >= plan.PRIORITY0_CAP_S


def test_gpu_run_defaults_match_plan():
    script = (ROOT / "benchmarks" / "gpu_run.sh").read_text()

    def default(var: str) -> str:
        m = re.search(rf"^{var}=\$\{{{var}:-([^}}]+)\}}", script, re.M)
        assert m, var
        return m.group(1)

    assert int(default("TOTAL_BUDGET_S")) == plan.GPU_RUN_TOTAL_S
    limits = re.findall(r'^    "\w+\|(\d+)\|', script, re.M)  # FIRST_RUN: name|limit|args
    assert len(limits) >= 8 and sum(map(int, limits)) == plan.GPU_RUN_TEST_S
    assert int(default("TOTAL_BUDGET_S")) < 600  # the device machine's limit per command
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


def _estimates() -> list[plan.PassEstimate]:
    return plan.estimate(_passes(), measured={})


def _est(name: str, providers: tuple[str, ...] | None = None) -> plan.PassEstimate:
    return next(e for e in _estimates()
                if e.name == name and (providers is None or e.providers == providers))  # fmt: skip


def _launches(name: str, provider: str = MANUALBP) -> list[Launch]:
    return [e for e in plan.recorded(name, provider) if isinstance(e, Launch)]


def _decisions(name: str, provider: str = MANUALBP) -> list[str]:
    return [e.key for e in plan.recorded(name, provider) if isinstance(e, Decision)]


def test_plan_records_what_manualbp_linear_launches():
    """The first case's meta twin records what a bare manualbp.Linear of its shapes launches
    and decides for a forward and backward (its modes add nothing new)."""
    x = torch.empty(8192, 4096, device="meta", dtype=torch.bfloat16, requires_grad=True)
    lin = manualbp.Linear(4096, 4096, activation="gelu", device="meta", dtype=torch.bfloat16)
    with manualbp.use_backend("triton"), _host.simulate(90, 132), _host.record() as entries:
        lin(x).backward(torch.empty(8192, 4096, device="meta", dtype=torch.bfloat16))
    name = "linear/gelu/bf16/M8192_K4096_N4096"
    direct = {plan.compile_key(e) for e in entries if isinstance(e, Launch)}
    assert direct == {plan.compile_key(e) for e in _launches(name)}
    assert {e.key for e in entries if isinstance(e, Decision)} == set(_decisions(name))


def test_compile_key_specialises_as_triton_does():
    """Two arguments of the suite's launches specialise alike for the plan exactly when they
    do for Triton (its own specialisation function, where this triton exposes it)."""
    specialise = pytest.importorskip("triton._C.libtriton").__dict__.get("native_specialize_impl")
    if specialise is None:
        pytest.skip("this triton has no native_specialize_impl")
    from triton.backends.compiler import BaseBackend

    pairs = set()
    for e in _estimates():
        for provider in set(e.providers) & set(TRITON_PROVIDERS):
            for launch in _launches(e.name, provider):
                for arg in launch.args:
                    ours = plan._spec(arg, bucket=False)
                    pairs.add((repr(ours), repr(specialise(BaseBackend, arg, False, True, True))))
    ours, theirs = {a for a, _ in pairs}, {b for _, b in pairs}
    assert len(pairs) == len(ours) == len(theirs), sorted(pairs)


def test_tuning_key_partitions_as_the_launchers_keys(monkeypatch):
    """The plan's stand-in for the tuning key groups the suite's tuned launches exactly as the
    keys the launchers pass ``tuned_launch`` do (those spied on here)."""
    estimates = _estimates()  # imports every launcher module first
    real: dict[int, tuple[str, str]] = {}
    tuned_launch = _tuning.tuned_launch

    def spy(kernel, key, configs, make, device, **kwargs):
        start = len(_host._recorders[-1])
        chosen = tuned_launch(kernel, key, configs, make, device, **kwargs)
        real.update({id(e): (kernel.__name__, key) for e in _host._recorders[-1][start:]})
        return chosen

    for module in [m for n, m in sys.modules.items() if n.startswith("manualbp.kernels.")]:
        if module is not _tuning and getattr(module, "tuned_launch", None) is tuned_launch:
            monkeypatch.setattr(module, "tuned_launch", spy)
    pairs, entries = set(), []  # entries: keeps the recorded launches (and their ids) alive
    for e in estimates:
        for provider in set(e.providers) & set(TRITON_PROVIDERS):
            with _host.simulate(90, 132), manualbp.use_backend("triton"):
                entries.append(plan.record_modes(plan._meta_suite()[e.name], provider))
            pairs |= {(real[id(lz)], plan.tuning_key(lz)) for lz in entries[-1]
                      if isinstance(lz, Launch) and len(lz.candidates) > 1}  # fmt: skip
    assert len({r for r, _ in pairs}) == len({k for _, k in pairs}) == len(pairs) > 10


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
    first = _estimates()[0]  # Linear+GELU bf16 M8192 K4096 N4096
    assert first.name == "linear/gelu/bf16/M8192_K4096_N4096"
    assert first.triton_compiles == n_epi + 2 * n_plain + 3
    assert first.compiled == {"matmul_tma_kernel": n_epi + 2 * n_plain, "act_grad_kernel": 1,
                              "bias_grad_kernel": 1, "linear_epilogue_kernel": 1}  # fmt: skip
    assert first.triton_s == pytest.approx(
        (n_epi + 2 * n_plain) * plan.TRITON_COMPILE_S + 3 * plan.ELEMENTWISE_COMPILE_S
    )
    assert first.tuned_configs == n_epi + 2 * n_plain
    assert first.choices == 3 and 0 < first.choice_s < 1
    assert first.torch_compiles == 1
    # forward: x row-major, W read through its transpose; dX: both row-major; dW: dZ^T.
    tma = {(len(lz.candidates), lz.kwargs["A_T"], lz.kwargs["B_T"])
           for lz in _launches(first.name) if lz.name == "matmul_tma_kernel"}  # fmt: skip
    assert tma == {(n_epi, False, True), (n_plain, False, False), (n_plain, True, False)}
    # IEEE fp32 stays on the pointer kernels.
    fp32 = {lz.name for lz in _launches("linear/gelu/fp32/M8192_K4096_N4096")}
    assert "matmul_tma_kernel" not in fp32
    assert {"linear_forward_kernel", "matmul_kernel"} <= fp32
    # The same shape class later compiles nothing new: only its tuning runs again.
    gelu_1024 = _est("linear/gelu/bf16/M8192_K1024_N4096", (NATIVE, COMPILE, MANUALBP))
    assert gelu_1024.triton_compiles == 0 and gelu_1024.tuned_configs > 0


def test_plan_counts_split_k_exactly_when_plan_splits():
    """dW's split-K (partial kernel + fixed-order reduction) is recorded for a Linear case
    exactly when _splitk.plan_splits cuts its reduction over the 132 SMs of an H100 / H200,
    into that many slices."""
    from manualbp.kernels._splitk import CHUNK_ALIGN, MIN_CHUNK, plan_splits, splitk_config_for

    seen = set()
    for case in {p.case.name: p.case for p in _passes()}.values():
        if case.group != "linear":
            continue
        M, K, N = case.params["M"], case.params["K"], case.params["N"]
        precision = "tf32" if torch.get_float32_matmul_precision() != "highest" else "ieee"
        cfg = splitk_config_for(90, case.dtype, precision)
        tiles = -(-N // cfg["BLOCK_M"]) * -(-K // cfg["BLOCK_N"])
        splits = plan_splits(tiles, M, 132, min_chunk=MIN_CHUNK["cuda"],
                             align=CHUNK_ALIGN["cuda"]).splits  # fmt: skip
        launches = _launches(case.name)
        partials = [lz for lz in launches if lz.name == "splitk_partial_kernel"]
        assert {lz.grid[1] for lz in partials} == ({splits} if splits > 1 else set()), case.name
        assert bool(partials) == any(lz.name == "splitk_reduce_kernel" for lz in launches)
        seen.add(splits > 1)
    assert seen == {True, False}


def test_plan_counts_candidates_per_provider():
    """manualbp (auto) compiles both candidates and times each bucket once; a forced
    candidate compiles only its own kernels and times nothing."""
    name = "linear/gelu/bf16/M8192_K4096_N16384"
    auto, triton, cublas = ({lz.name for lz in _launches(name, p)}
                            for p in (MANUALBP, MANUALBP_TRITON, MANUALBP_CUBLAS))  # fmt: skip
    assert [k.split("|")[0] for k in dict.fromkeys(_decisions(name))] == ["fwd", "dx", "dw"]
    assert not _decisions(name, MANUALBP_TRITON) and not _decisions(name, MANUALBP_CUBLAS)
    assert not {"matmul_tma_kernel", "matmul_kernel", "splitk_partial_kernel"} & cublas
    assert "linear_epilogue_kernel" in cublas - triton  # the bias is in addmm, not GELU
    assert auto >= triton | cublas
    # Plain bf16 Linear: addmm's output is y, no elementwise pass.
    assert "linear_epilogue_kernel" not in {
        lz.name for lz in _launches("linear/none/bf16/M8192_K4096_N4096", MANUALBP_CUBLAS)
    }
    # The forced passes compile, tune and time nothing new.
    for e in _estimates():
        if set(e.providers) <= set(LINEAR_CANDIDATES):
            assert (e.triton_compiles, e.tuned_configs, e.choices) == (0, 0, 0), e.name


def test_plan_counts_chain_kernel_in_mlp_step():
    """The MLP step through convert: manualbp.Sequential runs the 4 layers as 2 Linear -> GELU
    -> Linear pairs, each backward with one chain GEMM (act' and db in its epilogue), chosen
    against cuBLAS and tuned over chain_configs: compiled once, tuned per size bucket."""
    from manualbp.kernels.linear import chain_configs

    name = "mlp_step/bf16/M8192_1024-4096-4096-4096-1024"
    assert len({k for k in _decisions(name) if k.startswith("chain|")}) == 2
    chains = [lz for lz in _launches(name) if lz.name == "chain_grad_kernel"]
    n_configs = len(chain_configs(90, torch.bfloat16, "ieee"))
    assert {len(lz.candidates) for lz in chains} == {n_configs}
    assert len({plan.compile_key(lz) for lz in chains}) == n_configs
    assert len({plan.tuning_key(lz) for lz in chains}) == 2
    assert _est(name, (NATIVE, MANUALBP)).compiled["chain_grad_kernel"] == n_configs


def test_every_provider_records_and_the_tables_name_launched_kernels():
    """Every manualbp provider of the suite binds and runs on meta tensors under the recorder,
    and the compile-time tables name kernels it launches (kept in step with the kernels)."""
    assert not [e.problems for e in _estimates() if e.problems]
    launched = set()
    for e in _estimates():
        for provider in set(e.providers) & set(TRITON_PROVIDERS):
            assert _launches(e.name, provider), (e.name, provider)
            launched |= {lz.name for lz in _launches(e.name, provider)}
    assert launched >= plan.ELEMENTWISE_KERNELS | plan.FUSED_MLP_KERNELS


def test_plan_uses_measured_compile_times(tmp_path):
    """A GPU run's measured compile seconds replace the constants for the kernels it has; a
    file of another format, or none, leaves the constants."""
    path = tmp_path / "compile_times.json"
    doc = {"format": "manualbp.compile-times", "schema": 1, "device": "NVIDIA H100",
           "triton": "3.6.0", "seconds": {"matmul_tma_kernel": 1.0}}  # fmt: skip
    path.write_text(json.dumps(doc))
    measured = plan.load_compile_times(path)
    assert measured == {"matmul_tma_kernel": 1.0}
    first = plan.estimate(_passes()[:1], measured=measured)[0]
    assert first.triton_s == pytest.approx(
        first.compiled["matmul_tma_kernel"] * 1.0 + 3 * plan.ELEMENTWISE_COMPILE_S
    )
    assert "measured for matmul_tma_kernel" in plan.format_plan([first], measured)
    path.write_text(json.dumps({**doc, "format": "other"}))
    assert plan.load_compile_times(path) == {}
    assert plan.load_compile_times(tmp_path / "missing.json") == {}


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
    assert "RECORD FAILED" not in proc.stdout
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


def test_precompile_warms_up_each_specialisation_once():
    """The precompile step warms up one launch per specialisation of the provider's record
    (the plan's compile count), each with triton's AsyncCompileMode active (only then)."""
    triton = pytest.importorskip("triton")
    from triton.runtime import _async_compile

    from benchmarks.precompile import compile_all, unique_launches

    name = "linear/gelu/bf16/M8192_K4096_N4096"
    launches = unique_launches(plan.recorded(name, MANUALBP))
    assert len(launches) == _estimates()[0].triton_compiles
    seen = []

    class Kernel:
        def warmup(self, *args, grid, **kwargs):
            seen.append((_async_compile.active_mode.get(), grid, args, kwargs))

    fakes = [Launch(Kernel(), lz.grid, lz.args, lz.kwargs) for lz in launches]
    compile_all(fakes, workers=2)
    assert _async_compile.active_mode.get() is None
    assert [(g, a, k) for _, g, a, k in seen] == [(f.grid, f.args, f.kwargs) for f in fakes]
    assert all(isinstance(mode, triton.AsyncCompileMode) for mode, *_ in seen)


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
    est = {(e.name, e.providers): e for e in _estimates()}
    step = est[("fused_mlp_step/bf16/w64x4_M2^18", (NATIVE, MANUALBP))]
    # bf16 SGD was compiled by the MLP step before; the MSE forward specialises anew (its
    # segment_blocks argument is 1 here: 2^22 elements, 2048 blocks of 2048, one a segment).
    assert step.triton_compiles == 5
    assert set(step.compiled) == {"mlp_forward_kernel", "mlp_backward_kernel", "mlp_wgrad_kernel",
                                  "mlp_wgrad_reduce_kernel", "_mse_fwd_kernel"}  # fmt: skip
    seconds = 3 * plan.FUSED_MLP_COMPILE_S[64] + 2 * plan.ELEMENTWISE_COMPILE_S
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


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")  # fmt: skip
def test_gpu_run_stops_at_a_cuda_fault(tmp_path):
    """A first-run test group whose log shows a CUDA fault stops the run before any benchmark
    (every later process would time or test a faulting kernel). A fake python3 stands in:
    its pytest 'passes' the first group and reports an illegal address in the second."""
    fake = tmp_path / "python3"
    fake.write_text(
        textwrap.dedent("""\
        #!/usr/bin/env bash
        if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then
            n=$(cat "$FAKE_COUNT" 2>/dev/null || echo 0); echo $((n + 1)) >"$FAKE_COUNT"
            if [ "$n" -ge 1 ]; then
                echo "RuntimeError: CUDA error: an illegal memory access was encountered"; exit 1
            fi
            echo "1 passed"; exit 0
        fi
        if [ "$1" = "-m" ] && [ "$2" = "benchmarks" ]; then echo BENCHMARK-RAN; exit 0; fi
        cat >/dev/null; exit 0
        """)
    )
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "FAKE_COUNT": str(tmp_path / "count")}
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "CUDA FAULT in group 'mse'" in proc.stdout and "BENCHMARK-RAN" not in proc.stdout
    assert (out / "tests-tma_gemm.log").exists() and not (out / "tests-cuda_graphs.log").exists()
