"""``python -m benchmarks --plan``: the CUDA suite's run order and how long each pass should take.

No GPU needed: the plan counts, for every pass in run order, the Triton compiles it needs (each
config of each kernel variant it launches that no earlier pass compiled, the configs coming from
``manualbp.kernels._matmul.configs_for`` for sm_90), the configs triton's autotuner benchmarks
(once per autotuner and tuning key), the ``torch.compile`` warm-ups (one per case shape: the
runner never resets dynamo between cases), and estimates the seconds of each from the constants
below. A CPU test checks that the priority-0 total fits ``benchmarks/gpu_run.sh``'s window.

The launch model (:func:`triton_launches`) is kept by hand in step with ``triton_kernels/``:
which kernel each provider launches, with which constexprs (a separate compile each), and which
autotuning bucket. ``tests/test_benchmark_plan.py`` checks that the kernels it names exist.
Triton also specialises on integer arguments equal to 1 or divisible by 16; every shape here is
a multiple of 16, so one compile per (kernel, constexprs, operand layout, config) is the count.
The fused-MLP kernels are not autotuned (one fixed config per dtype class and width) and take
the layer dims as constexprs: one compile of each of its four kernels per (dtype, dims); their
runtime integers specialise alike over the batch sweep 2^16..2^21: the rows and the
weight-gradient chunk are multiples of 16, the split S is 49..51, neither 1 nor a multiple of
16 (:func:`manualbp.kernels.fused_mlp.wgrad_splits`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from benchmarks.bounds import PREACT_ACTIVATIONS
from benchmarks.cases import (
    COMPILE,
    COMPILE_MAX_AUTOTUNE,
    COMPILE_PROVIDERS,
    MANUALBP_UNFUSED,
    TRITON_PROVIDERS,
    Case,
)
from benchmarks.ceilings import DTYPE_NAMES
from benchmarks.suites import Pass

__all__ = [
    "PRIORITY0_CAP_S",
    "PassEstimate",
    "estimate",
    "format_plan",
    "priority_totals",
    "triton_launches",
]

# ---- Estimates (seconds). No GPU run of this project has been measured yet: these are
# ---- deliberately on the slow side of what is typical, to be refined from a run's
# ---- results.json (every record has ``plan_estimate_s`` next to its ``elapsed_s``).
# One config of one kernel variant through Triton's front end, MLIR passes, LLVM and ptxas for
# sm_90: ~1-2.5 s for a pipelined wgmma GEMM with a fused epilogue on a server core (what
# Triton's matmul tutorial kernels and inductor's max-autotune precompile logs show), well
# under 1 s for the elementwise kernels. Counted serially: the runner's parallel precompile
# (benchmarks/precompile.py) and a warm ~/.triton/cache (gpu_run.sh's CUDA tests compile some
# of the same kernels first) only make it faster.
TRITON_COMPILE_S = 2.5
# One fused-MLP kernel (forward, backward chain or weight gradient) for sm_90, per WIDTH: every
# layer is unrolled (tl.static_range), so it compiles like several GEMMs. Timed here with the
# audit's compile (triton 3.9, ptxas, no GPU: `triton_kernels.audit`) on one shared core of a
# 2-core AMD EPYC VM, 4 erf-GELU layers in bf16: width 64 1.6 / 1.8 / 2.5 s, width 128
# 3.4 / 3.9 / 2.5 s (forward / backward / weight gradient); the cases have 5 layers (x 5/4)
# and a launcher to build, so: rounded up. The reduction kernel is elementwise (0.3 s there).
FUSED_MLP_COMPILE_S = {16: 3.0, 32: 3.0, 64: 3.5, 128: 5.5}
FUSED_MLP_REDUCE_COMPILE_S = 1.0
# triton's autotuner times each config with do_bench(warmup=25 ms, rep=100 ms) after a short
# estimate: ~0.13 s plus launch overhead per config.
AUTOTUNE_S_PER_CONFIG = 0.15
# One new shape under torch.compile (default mode, dynamic=False): dynamo trace, AOTAutograd's
# joint graph and partition, inductor lowering of forward and backward, its generated Triton
# kernels compiled in inductor's worker pool; ~4-10 s once inductor is loaded.
TORCH_COMPILE_WARMUP_S = 10.0
# Once per run, on the first torch.compile: importing inductor, starting its compile workers.
TORCH_COMPILE_FIRST_S = 15.0
# The fused-MLP step's compile providers also compile ``optimizer.step`` (a second function):
# dynamo traces the foreach SGD over the 10 parameters, inductor emits a few foreach kernels;
# twice, since the first step creates the momentum buffers (a guard change: a recompile).
TORCH_COMPILE_OPTIMIZER_S = 10.0
# One shape under mode="max-autotune": inductor benchmarks Triton GEMM templates against cuBLAS
# for every distinct GEMM of the forward and backward graphs (the step has ~8: 3 forward, dX
# and dW of each layer shape; ~10-20 configs each, compiled in its worker pool, then timed) and
# records CUDA graphs; minutes are commonly reported for small models. Deliberately slow.
TORCH_COMPILE_MAX_AUTOTUNE_S = 90.0
# Once per run: interpreter and torch/triton import, CUDA context, environment, the ceilings
# (an 8192^3 matmul per dtype and a 1 GiB copy, ~100 ms of repetitions each).
RUN_START_S = 20.0
# Per provider of a pass: bind (model, weights), the output check, the peak-memory call and
# the input sets (up to 8 x 32 MiB+ of randn on the device).
SETUP_S_PER_PROVIDER = 0.5
# Per provider and mode: gpu_run.sh's --warmup-ms 10 --rep-ms 50, plus the first call, three
# estimate calls, and each repetition's untimed prepare (a forward for bwd) and L2 flush.
MEASURE_S_PER_MODE = 0.4

# ---- gpu_run.sh's window (keep in step with its defaults; a test reads them from the script).
GPU_RUN_TOTAL_S = 360  # TOTAL_BUDGET_S: the whole script, 6 minutes
GPU_RUN_ENV_S = 10  # phase 1: nvidia-smi and versions
GPU_RUN_TEST_S = 120  # TEST_LIMIT_S: phase 2, the CUDA tests
GPU_RUN_RESERVE_S = 40  # RESERVE_S: phase 4 (re-render, 30 s) and the kill grace (10 s)
RUNNER_STOP_MARGIN_S = 30  # STOP_MARGIN_S: the runner's --budget ends this much before phase 3
BENCH_WINDOW_S = GPU_RUN_TOTAL_S - GPU_RUN_ENV_S - GPU_RUN_TEST_S - GPU_RUN_RESERVE_S
# Every priority-0 pass must have finished when the runner stops starting new ones.
PRIORITY0_CAP_S = BENCH_WINDOW_S - RUNNER_STOP_MARGIN_S

ARCH = 90  # the H200 (sm_90) the GPU runs use

K_FWD = "linear_forward:linear_forward_kernel"
K_MATMUL = "_matmul:matmul_kernel"
K_ACT_GRAD = "linear_backward:act_grad_kernel"
K_BIAS_GRAD = "linear_backward:bias_grad_kernel"
K_MSE = "mse:_mse_fwd_kernel"
K_MSE_SCALE = "mse:_grad_scale_kernel"
K_SGD = "sgd:_sgd_kernel"
K_MLP_FWD = "fused_mlp:mlp_forward_kernel"
K_MLP_BWD = "fused_mlp:mlp_backward_kernel"
K_MLP_WGRAD = "fused_mlp:mlp_wgrad_kernel"
K_MLP_REDUCE = "fused_mlp:mlp_wgrad_reduce_kernel"
KERNELS = (K_FWD, K_MATMUL, K_ACT_GRAD, K_BIAS_GRAD, K_MSE, K_MSE_SCALE, K_SGD,
           K_MLP_FWD, K_MLP_BWD, K_MLP_WGRAD, K_MLP_REDUCE)  # fmt: skip


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a provider's call: ``variant`` is what Triton compiles separately
    (dtype, constexprs, operand layout); ``n_configs`` the configs it may run (1: a fixed launch
    configuration); ``tune_key`` the autotuner and its key (``None``: not autotuned)."""

    kernel: str  # "module:attribute" under manualbp.kernels
    variant: tuple
    n_configs: int
    tune_key: tuple | None = None
    compile_s: float = TRITON_COMPILE_S  # estimated seconds of one compile of one config


@dataclass
class PassEstimate:
    """What one pass needs and how long it should take (seconds)."""

    priority: int
    name: str
    providers: tuple[str, ...]
    triton_compiles: int = 0
    autotune_configs: int = 0
    torch_compiles: int = 0
    triton_s: float = 0.0
    autotune_s: float = 0.0
    torch_compile_s: float = 0.0
    measure_s: float = 0.0
    kernels: list[str] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.triton_s + self.autotune_s + self.torch_compile_s + self.measure_s


# ---------------------------------------------------------------------------------------------
# The launch model
# ---------------------------------------------------------------------------------------------


def _configs(dtype: torch.dtype, *, epilogue: bool) -> tuple[int, str]:
    """(number of sm_90 configs, tl.dot input precision) of the GEMM kernels for ``dtype``."""
    from manualbp.kernels._matmul import configs_for, input_precision_for

    precision = input_precision_for(dtype)
    return len(configs_for(ARCH, dtype, precision, epilogue=epilogue)), precision


def _bucket(*sizes: int) -> tuple[int, ...]:
    return tuple(1 << max(s - 1, 0).bit_length() for s in sizes)


def _linear(
    M: int, K: int, N: int, act: str | None, dtype: torch.dtype, *,
    bias: bool = True, train: bool = True, dx: bool = True,
) -> list[Launch]:  # fmt: skip
    """``manualbp.Linear``'s launches: the fused forward (autotuned per size bucket; the
    pre-activation stored when backward needs it), and for training the elementwise act' / bias
    pass, the bias reduction and the two strided GEMMs dX = dZ W, dW = dZ^T X (one autotuner per
    size bucket, shared by both; each layout compiled separately)."""
    d = DTYPE_NAMES[dtype]
    n_fwd, precision = _configs(dtype, epilogue=True)
    n_mm, _ = _configs(dtype, epilogue=False)
    store = train and act in PREACT_ACTIVATIONS
    fwd_variant = (d, precision, bias, act, store)
    out = [Launch(K_FWD, fwd_variant, n_fwd, (*fwd_variant, _bucket(M, N, K)))]
    if not train:
        return out
    if act is not None or bias:
        out.append(Launch(K_ACT_GRAD, (d, act, act is not None, bias), 1))
    if bias:
        out.append(Launch(K_BIAS_GRAD, (d,), 1))
    if dx:
        out.append(Launch(K_MATMUL, (d, precision, "dZ@W"), n_mm, (d, precision, _bucket(M, K, N))))
    out.append(Launch(K_MATMUL, (d, precision, "dZ^T@X"), n_mm, (d, precision, _bucket(N, K, M))))
    return out


def _mse(dtype: torch.dtype) -> list[Launch]:
    """``mse_loss`` (mean) forward with its gradient in one launch, and the backward's scaling
    of that gradient by the upstream one."""
    d = DTYPE_NAMES[dtype]
    return [Launch(K_MSE, (d, "mean", "grad"), 1), Launch(K_MSE_SCALE, (d,), 1)]


def _sgd(dtype: torch.dtype, momentum: float) -> list[Launch]:
    return [Launch(K_SGD, (DTYPE_NAMES[dtype], momentum != 0), 1)]


def _fused_mlp(
    M: int, dims: tuple[int, ...], act: str, dtype: torch.dtype, *, train: bool
) -> list[Launch]:
    """``manualbp.FusedMLP``'s launches (``triton_kernels/fused_mlp.py``): the forward, one
    launch (storing what backward reads only when training); for training the backward chain,
    the weight-gradient blocks and, with more than one row chunk, their fixed-order reduction."""
    from manualbp.kernels.fused_mlp import launch_config, padded_width, wgrad_splits

    d, width = DTYPE_NAMES[dtype], padded_width(dims)
    precision = _configs(dtype, epilogue=False)[1]
    cfg = launch_config(torch.device("cuda"), dtype, width, precision, ARCH, cuda=True)
    seconds = FUSED_MLP_COMPILE_S[width]
    out = [Launch(K_MLP_FWD, (d, dims, act, train), 1, compile_s=seconds)]
    if not train:
        return out
    out += [Launch(K_MLP_BWD, (d, dims, act, "no dX"), 1, compile_s=seconds)]
    direct = wgrad_splits(M, len(dims) - 1, cfg["BLOCK_R"], cuda=True)[0] == 1  # one chunk
    out += [Launch(K_MLP_WGRAD, (d, dims, act, direct), 1, compile_s=seconds)]
    if not direct:
        out += [Launch(K_MLP_REDUCE, (d, dims), 1, compile_s=FUSED_MLP_REDUCE_COMPILE_S)]
    return out


def _linear_mse_chunk_rows(M: int, K: int, N: int) -> int:
    """manualbp's default LinearMSELoss chunk (about ceil(N / K) chunks, >= 256 rows)."""
    chunks = max(1, math.ceil(N / max(K, 1)))
    return max(1, math.ceil(M / chunks), min(M, 256))


def triton_launches(case: Case, provider: str) -> list[Launch]:
    """The Triton launches of ``provider``'s calls on ``case`` (all its modes)."""
    p, dtype = case.params, case.dtype
    if provider not in TRITON_PROVIDERS or case.group in ("host_overhead", "reference"):
        return []
    if case.group == "linear":
        out = _linear(p["M"], p["K"], p["N"], p["activation"], dtype)
        if "gemms" in case.modes:  # the forward kernel with no bias or activation
            out += _linear(p["M"], p["K"], p["N"], None, dtype, bias=False, train=False)
        return out
    if case.group == "mse":
        return _mse(dtype)
    if case.group == "sgd":
        return _sgd(dtype, p["momentum"])
    if case.group == "linear_mse":
        M, K, N = p["M"], p["K"], p["N"]
        if provider == MANUALBP_UNFUSED:
            return _linear(M, K, N, None, dtype) + _mse(dtype)
        return _linear(_linear_mse_chunk_rows(M, K, N), K, N, None, dtype, train=False)
    if case.group == "mlp_step":
        dims, out = p["dims"], []
        for j, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            act = "gelu" if j < len(dims) - 2 else None
            out += _linear(p["M"], d_in, d_out, act, dtype, dx=j > 0)
        return out + _mse(dtype) + _sgd(dtype, 0.9)
    if case.group in ("fused_mlp_step", "fused_mlp_infer"):
        train = case.group == "fused_mlp_step"
        out = _fused_mlp(p["M"], tuple(p["dims"]), p["activation"], dtype, train=train)
        return out + (_mse(dtype) + _sgd(dtype, 0.9) if train else [])
    raise ValueError(f"no launch model for group {case.group!r}")


# ---------------------------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------------------------


def torch_compile_cost(case: Case, provider: str) -> tuple[int, float]:
    """``(warm-ups, seconds)`` of a compile provider's first calls on ``case``: one warm-up per
    case shape (default mode, or max-autotune), plus the compiled ``optimizer.step`` of the
    fused-MLP step."""
    seconds = TORCH_COMPILE_MAX_AUTOTUNE_S if provider == COMPILE_MAX_AUTOTUNE else (
        TORCH_COMPILE_WARMUP_S
    )  # fmt: skip
    if case.group == "fused_mlp_step":
        return 2, seconds + TORCH_COMPILE_OPTIMIZER_S
    return 1, seconds


class _State:
    """What earlier passes of the run left compiled and tuned."""

    def __init__(self) -> None:
        self.compiled: set[tuple] = set()
        self.tuned: set[tuple] = set()
        self.torch_compiled = False


def _estimate_pass(p: Pass, state: _State) -> PassEstimate:
    est = PassEstimate(p.priority, p.case.name, p.providers)
    for provider in p.providers:
        for launch in triton_launches(p.case, provider):
            new = [(launch.kernel, launch.variant, i) for i in range(launch.n_configs)]
            new = [k for k in new if k not in state.compiled]
            state.compiled.update(new)
            est.triton_compiles += len(new)
            est.triton_s += len(new) * launch.compile_s
            if new:
                est.kernels.append(launch.kernel.split(":")[1])
            tune = (launch.kernel, launch.tune_key)
            if launch.tune_key is not None and launch.n_configs > 1 and tune not in state.tuned:
                state.tuned.add(tune)
                est.autotune_configs += launch.n_configs
        modes = [m for m in p.case.modes if not (m == "gemms" and provider == COMPILE)]
        est.measure_s += SETUP_S_PER_PROVIDER + MEASURE_S_PER_MODE * len(modes)
        if provider in COMPILE_PROVIDERS:
            warmups, seconds = torch_compile_cost(p.case, provider)
            est.torch_compiles += warmups
            est.torch_compile_s += seconds
            if not state.torch_compiled:
                est.torch_compile_s += TORCH_COMPILE_FIRST_S
                state.torch_compiled = True
    est.autotune_s = est.autotune_configs * AUTOTUNE_S_PER_CONFIG
    return est


def estimate(passes: Iterable[Pass]) -> list[PassEstimate]:
    """One :class:`PassEstimate` per pass, in run order (compiles and tunings carried over)."""
    state = _State()
    return [_estimate_pass(p, state) for p in passes]


def priority_totals(estimates: list[PassEstimate]) -> dict[int, float]:
    """Seconds per priority; priority 0's includes the run's start (:data:`RUN_START_S`)."""
    totals: dict[int, float] = {}
    for e in estimates:
        totals[e.priority] = totals.get(e.priority, 0.0) + e.total_s
    if estimates:
        first = min(totals)
        totals[first] += RUN_START_S
    return totals


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

_COLUMNS = ("#", "prio", "case [providers]", "triton", "tune", "t.comp",
            "triton_s", "tune_s", "t.comp_s", "measure_s", "total_s", "cumul_s")  # fmt: skip


def _row(i: int, e: PassEstimate, cumul: float) -> list[str]:
    return [
        str(i), str(e.priority), f"{e.name} [{', '.join(e.providers)}]",
        str(e.triton_compiles), str(e.autotune_configs), str(e.torch_compiles),
        f"{e.triton_s:.1f}", f"{e.autotune_s:.1f}", f"{e.torch_compile_s:.1f}",
        f"{e.measure_s:.1f}", f"{e.total_s:.1f}", f"{cumul:.1f}",
    ]  # fmt: skip


def _constants() -> list[str]:
    return [
        f"  TRITON_COMPILE_S={TRITON_COMPILE_S} per Triton compile (one config of one kernel "
        f"variant; counted serially), AUTOTUNE_S_PER_CONFIG={AUTOTUNE_S_PER_CONFIG},",
        f"  TORCH_COMPILE_WARMUP_S={TORCH_COMPILE_WARMUP_S} per torch.compile warm-up (one per "
        f"case shape) + TORCH_COMPILE_FIRST_S={TORCH_COMPILE_FIRST_S} once; "
        f"TORCH_COMPILE_MAX_AUTOTUNE_S={TORCH_COMPILE_MAX_AUTOTUNE_S} per max-autotune shape, "
        f"TORCH_COMPILE_OPTIMIZER_S={TORCH_COMPILE_OPTIMIZER_S} per compiled optimizer step,",
        f"  FUSED_MLP_COMPILE_S={FUSED_MLP_COMPILE_S} per fused-MLP kernel by width "
        f"(reduction {FUSED_MLP_REDUCE_COMPILE_S}),",
        f"  SETUP_S_PER_PROVIDER={SETUP_S_PER_PROVIDER}, MEASURE_S_PER_MODE={MEASURE_S_PER_MODE}"
        f", RUN_START_S={RUN_START_S} (see benchmarks/plan.py for where they come from)",
    ]


def format_plan(estimates: list[PassEstimate]) -> str:
    """The plan as text: one row per pass in run order, then the totals per priority and the
    priority-0 total against :data:`PRIORITY0_CAP_S`."""
    rows, cumul = [["0", "-", "run start (imports, CUDA context, ceilings)", "", "", "",
                    "", "", "", f"{RUN_START_S:.1f}", f"{RUN_START_S:.1f}",
                    f"{RUN_START_S:.1f}"]], RUN_START_S  # fmt: skip
    for i, e in enumerate(estimates, 1):
        cumul += e.total_s
        rows.append(_row(i, e, cumul))
    table = [list(_COLUMNS), *rows]
    widths = [max(len(r[c]) for r in table) for c in range(len(_COLUMNS))]
    lines = [
        "Plan of the CUDA suite on sm_90 (H200), in run order; estimated seconds.",
        "triton: new Triton compiles (configs x kernel variants not compiled by an earlier pass);",
        "tune: configs benchmarked by triton's autotuner; t.comp: torch.compile warm-ups.",
        "Constants:",
        *_constants(),
        "",
    ]
    lines += ["  ".join(c.rjust(w) if j != 2 else c.ljust(w)
                        for j, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
              for r in table]  # fmt: skip
    lines.append("")
    totals = priority_totals(estimates)
    for prio, total in sorted(totals.items()):
        n = sum(1 for e in estimates if e.priority == prio)
        lines.append(f"priority {prio}: {n} passes, {total:.1f} s")
    p0 = totals.get(0, RUN_START_S)
    verdict = "fits" if p0 <= PRIORITY0_CAP_S else "DOES NOT FIT"
    lines.append(
        f"priority-0 total {p0:.1f} s; cap {PRIORITY0_CAP_S} s = gpu_run.sh's {GPU_RUN_TOTAL_S} s "
        f"- env {GPU_RUN_ENV_S} s - tests {GPU_RUN_TEST_S} s - reserve {GPU_RUN_RESERVE_S} s "
        f"- runner stop margin {RUNNER_STOP_MARGIN_S} s: {verdict}"
    )
    lines.append(f"all passes: {sum(totals.values()):.1f} s")
    return "\n".join(lines)
