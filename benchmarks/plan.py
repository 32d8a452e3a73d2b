"""``python -m benchmarks --plan``: the CUDA suite's run order and how long each pass should take.

No GPU, and no model of the kernels kept here: the kernels are asked. In run order, each
provider of a pass that runs manualbp's kernels is bound on the case's twin built on ``meta``
tensors and its modes run once under ``manualbp.use_backend("triton")``,
``_host.simulate(ARCH, SMS)`` and ``_host.record()`` (:func:`recorded`). From the recorded
launches and decisions, carried over from pass to pass, it counts Triton compiles
(:func:`compile_key`), configs timed by tuned launches (:func:`tuning_key`), Linear choices
timed and torch.compile warm-ups, with the estimated seconds below (benchmarks/README.md,
"Compile time"). A CPU test keeps the priority-0 total within ``gpu_run.sh``'s window.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from manualbp.kernels import _host
from manualbp.kernels._host import Decision, Launch
from manualbp.kernels._tuning import TIMED_RUNS, WARMUP_RUNS

import manualbp
from benchmarks.cases import (
    COMPILE,
    COMPILE_MAX_AUTOTUNE,
    COMPILE_PROVIDERS,
    LINEAR_CANDIDATES,
    TRITON_PROVIDERS,
    Case,
)
from benchmarks.suites import Pass, build_cases

__all__ = ["ARCH", "COMPILE_TIMES", "PRIORITY0_CAP_S", "SMS", "PassEstimate", "compile_key",
           "estimate", "format_plan", "load_compile_times", "priority_totals", "record_modes",
           "recorded", "tuning_key"]  # fmt: skip

ARCH, SMS = 90, 132  # the H100 / H200 of the GPU runs: sm_90, 132 SMs

# ---- Estimates (seconds), on the slow side: no GPU run has been measured yet (its records
# ---- carry ``plan_estimate_s`` next to ``elapsed_s``, to refine them with).
# One GEMM config (TMA / pointer GEMMs, split-K partials, chain GEMM) for sm_90: the compile
# audit (``manualbp.kernels.audit``, triton 3.9, one core of a loaded 2-core VM) took medians
# of 2.1 s (TMA; 2.4 s at most), 1.9-2.2 s (pointer GEMMs), 2.1 s (chain), 1.2 s (split-K) per
# bf16 config; elementwise kernels 0.1-0.6 s. Counted serially (they compile in parallel).
TRITON_COMPILE_S, ELEMENTWISE_COMPILE_S = 2.5, 1.0
ELEMENTWISE_KERNELS = frozenset({
    "linear_epilogue_kernel", "act_grad_kernel", "bias_grad_kernel", "splitk_reduce_kernel",
    "_mse_fwd_kernel", "_grad_scale_kernel", "_sgd_kernel", "mlp_wgrad_reduce_kernel",
})  # fmt: skip
# Fused-MLP kernels unroll every layer: the audit, 4 GELU layers in bf16, width 64: 1.6 / 1.8 /
# 2.5 s, width 128: 3.4 / 3.9 / 2.5 s (forward / backward / wgrad); 5 layers here: rounded up.
FUSED_MLP_COMPILE_S = {16: 3.0, 32: 3.0, 64: 3.5, 128: 5.5}
FUSED_MLP_KERNELS = frozenset(
    {"mlp_forward_kernel", "mlp_backward_kernel", "mlp_wgrad_kernel", "mlp_rop_kernel"}
)
# Timing one candidate config (``_tuning.cuda_event_timer``: WARMUP_RUNS + TIMED_RUNS runs and a
# sync): ~3 ms for the bf16 GEMMs here, ~35 ms for IEEE fp32 at 8192x4096x4096, ~130 ms at 8192^3.
TUNE_S_PER_CONFIG = 0.05
# A Linear choice (Decision): per candidate WARMUP_RUNS + TIMED_RUNS runs of the key's GEMM (M
# rounded up to a power of two there), each max(2MNK / rate, bytes / bandwidth) + overhead,
# bytes = both operands and three output-sized passes; rates by the key's dtype, well under an
# H100's (dense bf16 989 TFLOP/s, TF32 494, fp32 / fp64 67).
CHOICE_TFLOPS = {"bfloat16": 400.0, "float16": 400.0, "float32-high": 200.0,
                 "float32-medium": 200.0, "float32-highest": 25.0, "float64": 20.0}  # fmt: skip
CHOICE_GBPS = 3000.0
CHOICE_RUN_OVERHEAD_S = 50e-6  # launches, two CUDA events, the host's share of a sync
# torch.compile: one new shape (dynamo, AOTAutograd, inductor's forward and backward and its
# Triton kernels), inductor's start-up once per run, the fused-MLP step's ``optimizer.step``
# (twice: the first step makes the momentum buffers), a shape under max-autotune (GEMM templates
# timed against cuBLAS for every GEMM, CUDA graphs; deliberately slow).
TORCH_COMPILE_WARMUP_S, TORCH_COMPILE_FIRST_S = 10.0, 15.0
TORCH_COMPILE_OPTIMIZER_S, TORCH_COMPILE_MAX_AUTOTUNE_S = 10.0, 90.0
RUN_START_S = 20.0  # once: imports, CUDA context, environment, the ceilings
SETUP_S_PER_PROVIDER = 0.5  # bind, output check, peak memory, input sets (up to 8 x 32 MiB+)
# Per provider and mode: gpu_run.sh's --warmup-ms 10 --rep-ms 50, the first call, three
# estimate calls, each repetition's untimed prepare and L2 flush.
MEASURE_S_PER_MODE = 0.4

# ---- gpu_run.sh's window (keep in step with its defaults; a test reads them from the script).
GPU_RUN_TOTAL_S = 560  # TOTAL_BUDGET_S: the whole script, under the 10-minute command limit
GPU_RUN_ENV_S = 10  # phase 1: nvidia-smi and versions
GPU_RUN_TEST_S = 315  # phase 2, the first-run GPU tests: the sum of their groups' limits
GPU_RUN_RESERVE_S = 40  # RESERVE_S: phase 4 (re-render, 30 s) and the kill grace (10 s)
RUNNER_STOP_MARGIN_S = 30  # STOP_MARGIN_S: the runner's --budget ends this much before phase 3
BENCH_WINDOW_S = GPU_RUN_TOTAL_S - GPU_RUN_ENV_S - GPU_RUN_TEST_S - GPU_RUN_RESERVE_S
# Every priority-0 pass must have finished when the runner stops starting new ones.
PRIORITY0_CAP_S = BENCH_WINDOW_S - RUNNER_STOP_MARGIN_S

COMPILE_TIMES = Path(__file__).resolve().parent / "results" / "compile_times.json"


def load_compile_times(path: Path = COMPILE_TIMES) -> dict[str, float]:
    """Measured compile seconds per kernel name from a GPU run's file (:data:`COMPILE_TIMES`),
    else ``{}``::

        {"format": "manualbp.compile-times", "schema": 1, "device": "NVIDIA H100 80GB HBM3",
         "triton": "3.6.0", "seconds": {"matmul_tma_kernel": 1.7, "act_grad_kernel": 0.2}}

    ``seconds``: the median wall time of compiling one specialisation of each kernel (one
    config) on that machine. Anything else (missing, not JSON, another format) is ignored."""
    try:
        data = json.loads(path.read_text())
        seconds = data["seconds"] if data.get("format") == "manualbp.compile-times" else {}
        return {str(k): float(v) for k, v in seconds.items() if float(v) > 0}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


# ---------------------------------------------------------------------------------------------
def record_modes(case: Case, provider: str) -> list[Launch | Decision]:
    """What ``provider``'s first calls on ``case`` launch and decide: each of its modes run once
    on input set 0 under ``_host.record()`` (nothing runs; on the tensors' own device)."""
    with _host.record() as entries:
        one_set = case.make_set(0)
        torch.manual_seed(0)
        bound = case.bind(provider)
        for prepare, run in bound.modes.values():
            run(prepare(one_set))
    return entries


@functools.cache
def _meta_suite() -> dict[str, Case]:
    return {c.name: c for c in build_cases(torch.device("meta"), quick=False)}


@functools.cache
def recorded(case_name: str, provider: str) -> tuple[Launch | Decision, ...]:
    """:func:`record_modes` of the case named ``case_name`` of the CUDA suite, built on ``meta``
    tensors, as the Triton backend plans it for sm_90 with 132 SMs."""
    with _host.simulate(ARCH, SMS), manualbp.use_backend("triton"):
        return tuple(record_modes(_meta_suite()[case_name], provider))


def _spec(value: Any, bucket: bool) -> Any:
    """How Triton specialises an argument: a tensor by dtype and 16-byte alignment, a TMA
    descriptor by dtype and box, an integer as 1, divisible by 16, or neither (32 or 64 bits),
    a tuple element-wise. ``bucket``: integers rounded up to a power of two instead, boxes
    left out (they come with the config): for :func:`tuning_key`."""
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), value.data_ptr() % 16 == 0)
    if hasattr(value, "block_shape") and hasattr(value, "base"):  # a TensorDescriptor
        return ("desc", str(value.base.dtype), None if bucket else tuple(value.block_shape))
    if isinstance(value, tuple | list):
        return tuple(_spec(v, bucket) for v in value)
    if isinstance(value, bool) or not isinstance(value, int):
        return type(value).__name__ if value is not None else None
    if bucket:
        return 1 << max(value - 1, 0).bit_length()
    return 1 if value == 1 else (value % 16 == 0, -(2**31) <= value < 2**31)


def compile_key(launch: Launch) -> tuple:
    """What Triton compiles ``launch`` as: the kernel, its constexprs and config, and each
    argument's specialisation."""
    kwargs = tuple(sorted((k, repr(v)) for k, v in launch.kwargs.items()))
    return (launch.name, kwargs, _spec(launch.args, bucket=False))


def tuning_key(launch: Launch) -> tuple:
    """The stand-in for a tuned launch's tuning key (not recorded): the kernel, constexprs less
    the config, argument dtypes, every integer rounded up to a power of two (as ``size_bucket``
    does to M, N, K). On this suite it groups tuned launches exactly as the launchers' own keys
    do (a test spies on them)."""
    config = set().union(*launch.candidates)
    kwargs = tuple(sorted((k, repr(v)) for k, v in launch.kwargs.items() if k not in config))
    return (launch.name, kwargs, _spec(launch.args, bucket=True))


# ---------------------------------------------------------------------------------------------
@dataclass
class PassEstimate:
    """What one pass needs and how long it should take (seconds)."""

    priority: int
    name: str
    providers: tuple[str, ...]
    triton_compiles: int = 0
    tuned_configs: int = 0
    choices: int = 0
    torch_compiles: int = 0
    triton_s: float = 0.0
    tune_s: float = 0.0
    choice_s: float = 0.0
    torch_compile_s: float = 0.0
    measure_s: float = 0.0
    compiled: Counter[str] = field(default_factory=Counter)  # new compiles per kernel
    problems: list[str] = field(default_factory=list)  # providers whose record failed

    @property
    def total_s(self) -> float:
        return self.triton_s + self.tune_s + self.choice_s + self.torch_compile_s + self.measure_s


def compile_seconds(launch: Launch, measured: dict[str, float]) -> float:
    """The estimated seconds of compiling one specialisation of ``launch``'s kernel."""
    if launch.name in measured:
        return measured[launch.name]
    if launch.name in FUSED_MLP_KERNELS:
        return FUSED_MLP_COMPILE_S.get(launch.kwargs.get("WIDTH"), FUSED_MLP_COMPILE_S[128])
    return ELEMENTWISE_COMPILE_S if launch.name in ELEMENTWISE_KERNELS else TRITON_COMPILE_S


def choice_seconds(decision: Decision) -> float:
    """The estimated seconds of timing ``decision``'s candidates (see :data:`CHOICE_TFLOPS`)."""
    fields = decision.key.split("|")
    sizes = dict(f.split("=", 1) for f in fields if re.fullmatch(r"[MNK]=\d+", f))
    M, N, K = (int(sizes.get(d, 0)) for d in "MNK")
    dtype = fields[1] if len(fields) > 1 else ""
    tflops = CHOICE_TFLOPS.get(dtype, min(CHOICE_TFLOPS.values()))
    elsize = getattr(torch, dtype.split("-")[0], torch.float64).itemsize
    run = max(2.0 * M * N * K / (tflops * 1e12),
              (M * K + K * N + 3 * M * N) * elsize / (CHOICE_GBPS * 1e9))  # fmt: skip
    return len(decision.candidates) * (WARMUP_RUNS + TIMED_RUNS) * (run + CHOICE_RUN_OVERHEAD_S)


def _first(seen: set[Any], key: Any) -> bool:
    """Whether ``key`` is new to the run (and now seen)."""
    new = key not in seen
    seen.add(key)
    return new


def _add_record(est: PassEstimate, entries: Iterable[Launch | Decision], seen: set[Any],
                measured: dict[str, float]) -> None:  # fmt: skip
    for entry in entries:
        if isinstance(entry, Decision):
            if _first(seen, ("choice", entry.key)):
                est.choices += 1
                est.choice_s += choice_seconds(entry)
            continue
        if _first(seen, ("compile", compile_key(entry))):
            est.triton_compiles += 1
            est.compiled[entry.name] += 1
            est.triton_s += compile_seconds(entry, measured)
        if len(entry.candidates) > 1 and _first(seen, ("tune", tuning_key(entry))):
            est.tuned_configs += len(entry.candidates)
            est.tune_s += len(entry.candidates) * TUNE_S_PER_CONFIG


def _estimate_pass(p: Pass, seen: set[Any], measured: dict[str, float]) -> PassEstimate:
    est = PassEstimate(p.priority, p.case.name, p.providers)
    for provider in p.providers:
        if provider in TRITON_PROVIDERS:
            try:
                _add_record(est, recorded(p.case.name, provider), seen, measured)
            except Exception as e:
                est.problems.append(f"{provider}: {type(e).__name__}: {str(e)[:200]}")
        no_gemms = provider == COMPILE or provider in LINEAR_CANDIDATES  # gemms not offered
        modes = [m for m in p.case.modes if not (m == "gemms" and no_gemms)]
        est.measure_s += SETUP_S_PER_PROVIDER + MEASURE_S_PER_MODE * len(modes)
        if provider in COMPILE_PROVIDERS:
            tuned = provider == COMPILE_MAX_AUTOTUNE
            est.torch_compile_s += TORCH_COMPILE_MAX_AUTOTUNE_S if tuned else TORCH_COMPILE_WARMUP_S
            est.torch_compiles += 1
            if p.case.group == "fused_mlp_step":  # and its optimizer.step
                est.torch_compiles += 1
                est.torch_compile_s += TORCH_COMPILE_OPTIMIZER_S
            if _first(seen, "torch.compile"):
                est.torch_compile_s += TORCH_COMPILE_FIRST_S
    return est


def estimate(
    passes: Iterable[Pass], measured: dict[str, float] | None = None
) -> list[PassEstimate]:
    """One :class:`PassEstimate` per pass of the CUDA suite (cases found by name), in run order,
    with what earlier passes compiled, tuned and decided carried over; compile seconds from
    ``measured`` (default: :func:`load_compile_times`) where it has the kernel."""
    seen: set[Any] = set()
    measured = load_compile_times() if measured is None else measured
    return [_estimate_pass(p, seen, measured) for p in passes]


def priority_totals(estimates: list[PassEstimate]) -> dict[int, float]:
    """Seconds per priority; priority 0's includes the run's start (:data:`RUN_START_S`)."""
    totals: dict[int, float] = {}
    for e in estimates:
        totals[e.priority] = totals.get(e.priority, 0.0) + e.total_s
    if totals:
        totals[min(totals)] += RUN_START_S
    return totals


# ---------------------------------------------------------------------------------------------
_COLUMNS = ("#", "prio", "case [providers]", "triton", "tune", "choose", "t.comp", "triton_s",
            "tune_s", "choose_s", "t.comp_s", "measure_s", "total_s", "cumul_s")  # fmt: skip


def format_plan(estimates: list[PassEstimate], measured: dict[str, float] | None = None) -> str:
    """The plan as text: one row per pass in run order, then the totals per priority and the
    priority-0 total against :data:`PRIORITY0_CAP_S`."""
    measured = load_compile_times() if measured is None else measured
    source = f"measured for {', '.join(sorted(measured))}, else " if measured else ""
    lines = [
        f"The CUDA suite in run order on sm_{ARCH} with {SMS} SMs (H100 / H200), as its kernels "
        "record it on meta tensors; estimated seconds.",
        "triton: new Triton compiles; tune: configs timed by tuned launches; choose: Linear "
        "choices timed; t.comp: torch.compile warm-ups.",
        f"Constants (benchmarks/plan.py): compiles {source}TRITON_COMPILE_S={TRITON_COMPILE_S}, "
        f"ELEMENTWISE_COMPILE_S={ELEMENTWISE_COMPILE_S}, FUSED_MLP_COMPILE_S by width (serially),",
        f"TUNE_S_PER_CONFIG={TUNE_S_PER_CONFIG}, choices at CHOICE_TFLOPS / CHOICE_GBPS, "
        f"TORCH_COMPILE_WARMUP_S={TORCH_COMPILE_WARMUP_S}, RUN_START_S={RUN_START_S}, ...",
        "",
    ]
    rows = [list(_COLUMNS), ["0", "-", "run start (imports, CUDA context, ceilings)", *[""] * 8,
                             *[f"{RUN_START_S:.1f}"] * 3]]  # fmt: skip
    cumul = RUN_START_S
    for i, e in enumerate(estimates, 1):
        cumul += e.total_s
        rows.append([
            str(i), str(e.priority), f"{e.name} [{', '.join(e.providers)}]",
            str(e.triton_compiles), str(e.tuned_configs), str(e.choices), str(e.torch_compiles),
            f"{e.triton_s:.1f}", f"{e.tune_s:.1f}", f"{e.choice_s:.2f}",
            f"{e.torch_compile_s:.1f}", f"{e.measure_s:.1f}", f"{e.total_s:.1f}", f"{cumul:.1f}",
        ])  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(len(_COLUMNS))]
    lines += ["  ".join(c.ljust(w) if j == 2 else c.rjust(w)
                        for j, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
              for r in rows]  # fmt: skip
    lines += [f"RECORD FAILED in {e.name}: {problem}" for e in estimates for problem in e.problems]
    totals = priority_totals(estimates)
    lines += [""] + [f"priority {prio}: {sum(e.priority == prio for e in estimates)} passes, "
                     f"{total:.1f} s" for prio, total in sorted(totals.items())]  # fmt: skip
    p0 = totals.get(0, RUN_START_S)
    lines.append(
        f"priority-0 total {p0:.1f} s; cap {PRIORITY0_CAP_S} s = gpu_run.sh's {GPU_RUN_TOTAL_S} s "
        f"- env {GPU_RUN_ENV_S} s - tests {GPU_RUN_TEST_S} s - reserve {GPU_RUN_RESERVE_S} s "
        f"- runner stop margin {RUNNER_STOP_MARGIN_S} s: "
        + ("fits" if p0 <= PRIORITY0_CAP_S else "DOES NOT FIT")
    )
    lines.append(f"all passes: {sum(totals.values()):.1f} s")
    return "\n".join(lines)
