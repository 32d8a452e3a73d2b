"""``python -m benchmarks --plan``: the CUDA suite's run order and how long each pass should take.

No GPU needed: the plan counts, for every pass in run order, the Triton compiles it needs (each
config of each kernel variant it launches that no earlier pass compiled), the configs triton's
autotuner benchmarks (once per autotuner and tuning key), the per-shape Linear choices it
measures (once per bucket), the ``torch.compile`` warm-ups (one per case shape: the runner never
resets dynamo between cases), and estimates the seconds of each from the constants below. A CPU
test checks that the priority-0 total fits ``benchmarks/gpu_run.sh``'s window.

The launch model (:func:`provider_work`) is kept by hand in step with ``triton_kernels/`` and
``manualbp/backends/linear_choice.py``; the numbers come from their own tables and functions,
asked about the case's shapes on sm_90 with :data:`SMS` SMs (operands are ``meta`` tensors of
the benchmark's layouts, so nothing is allocated):

* **Linear GEMMs**: an operand set that ``_matmul_hopper.tma_supported`` accepts (fp16 / bf16,
  TF32 fp32, TMA-readable layouts) runs the persistent TMA kernel, autotuned over
  ``hopper_configs_for`` (the epilogue list with an activation, the uncapped one without);
  anything else (IEEE fp32, fp64) the pointer kernels over ``_matmul.configs_for``. dW goes
  through ``_splitk.splitk_matmul``: when ``plan_splits`` cuts its reduction for the output's
  tile count (``splitk_config_for``'s tile), the split-K partial kernel (one fixed config) and
  its reduction run instead of the plain GEMM.
* **The Linear choice** (``manualbp``, ``manualbp_unfused``, ``manualbp_convert``: mode
  ``auto``): both candidates of each GEMM are compiled (the Triton kernels; for cuBLAS, the
  elementwise pass of ``linear_epilogue.py`` where the forward needs one) and, once per bucket
  (``linear_choice.forward_key`` / ``gemm_key``), timed: ``WARMUP_RUNS + TIMED_RUNS`` runs of
  each candidate, each estimated from the GEMM's FLOPs and bytes at deliberately low rates
  (:data:`CHOICE_TFLOPS`, :data:`CHOICE_GBPS`) plus :data:`CHOICE_RUN_OVERHEAD_S`. The warm-up
  run's compiles and autotuning are counted as compiles and tuning, not here.
  ``manualbp_triton`` / ``manualbp_cublas`` force one candidate: only its kernels, no timing.
* **Cross-layer fusion** (the MLP step through ``convert``): ``manualbp.Sequential`` runs each
  Linear -> act -> Linear pair of the stack as one ``LinearChainFunction`` (pairs taken from
  the first layer on: :func:`chain_pairs`), whose backward launches the upper layer's
  elementwise pass and dW (split-K GEMM, no choice), ``chain_grad_kernel`` (autotuned over
  ``linear_backward.chain_configs``) and the lower layer's dX / dW through the choice.

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
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from benchmarks.bounds import PREACT_ACTIVATIONS
from benchmarks.cases import (
    COMPILE,
    COMPILE_MAX_AUTOTUNE,
    COMPILE_PROVIDERS,
    LINEAR_CANDIDATES,
    MANUALBP,
    MANUALBP_UNFUSED,
    TRITON_PROVIDERS,
    Case,
)
from benchmarks.ceilings import DTYPE_NAMES
from benchmarks.suites import Pass

__all__ = [
    "PRIORITY0_CAP_S",
    "Choice",
    "Launch",
    "PassEstimate",
    "Work",
    "chain_pairs",
    "dw_splits",
    "estimate",
    "format_plan",
    "priority_totals",
    "provider_work",
    "triton_launches",
]

# ---- Estimates (seconds). No GPU run of this project has been measured yet: these are
# ---- deliberately on the slow side of what is typical, to be refined from a run's
# ---- results.json (every record has ``plan_estimate_s`` next to its ``elapsed_s``).
# One config of one GEMM kernel variant through Triton's front end, MLIR passes, LLVM and ptxas
# for sm_90: ~1-2.5 s for a pipelined wgmma GEMM with a fused epilogue on a server core (what
# Triton's matmul tutorial kernels and inductor's max-autotune precompile logs show). The
# audit's compiles (``triton_kernels.audit``, triton 3.9, ptxas and the SASS disassembly
# included) on one core of a shared, loaded 2-core VM took, per bf16 config, median 2.1 s for
# the persistent TMA kernel (``matmul_tma`` / its forward, 2.4 s at most), 1.9-2.2 s for the
# pointer GEMMs, 2.1 s for ``chain_grad``, 1.2 s for the split-K partial kernel. Counted
# serially: the runner's parallel precompile (benchmarks/precompile.py) and a warm
# ~/.triton/cache (gpu_run.sh's CUDA tests compile some of the same kernels first) only make
# it faster.
TRITON_COMPILE_S = 2.5
# One elementwise / reduction kernel (act' and bias partials, bias reduction, the cuBLAS
# candidate's epilogue pass, the split-K reduction, MSE, SGD): the same audit measured 0.1-0.6 s
# (median 0.2 s) each; with a launcher to build, rounded up.
ELEMENTWISE_COMPILE_S = 1.0
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
# The Linear choice's timing runs (see the module docstring): per run of a candidate,
# max(2*M*N*K / rate, bytes / bandwidth) + overhead, bytes = both operands read and three
# output-sized passes (the GEMM's output, and the cuBLAS candidate's elementwise pass reading
# it and writing y). Rates well under an H200's (dense bf16 989 TFLOP/s, TF32 494, fp32 and
# fp64 67; HBM3e 4.8 TB/s), so that both candidates are counted at the slower one's pace.
CHOICE_TFLOPS = {"fp16": 400.0, "tf32": 200.0, "fp32": 25.0, "fp64": 20.0}  # by dtype class
CHOICE_GBPS = 3000.0
CHOICE_RUN_OVERHEAD_S = 50e-6  # launches, two CUDA events, the host's share of a sync
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
SMS = 132  # its SMs: the persistent grid and the split-K heuristic depend on them

K_FWD = "linear_forward:linear_forward_kernel"
K_MATMUL = "_matmul:matmul_kernel"
K_TMA = "_matmul_hopper:matmul_tma_kernel"
K_SPLITK = "_splitk:splitk_partial_kernel"
K_SPLITK_REDUCE = "_splitk:splitk_reduce_kernel"
K_EPILOGUE = "linear_epilogue:linear_epilogue_kernel"
K_ACT_GRAD = "linear_backward:act_grad_kernel"
K_BIAS_GRAD = "linear_backward:bias_grad_kernel"
K_CHAIN = "linear_backward:chain_grad_kernel"
K_MSE = "mse:_mse_fwd_kernel"
K_MSE_SCALE = "mse:_grad_scale_kernel"
K_SGD = "sgd:_sgd_kernel"
K_MLP_FWD = "fused_mlp:mlp_forward_kernel"
K_MLP_BWD = "fused_mlp:mlp_backward_kernel"
K_MLP_WGRAD = "fused_mlp:mlp_wgrad_kernel"
K_MLP_REDUCE = "fused_mlp:mlp_wgrad_reduce_kernel"
KERNELS = (K_FWD, K_MATMUL, K_TMA, K_SPLITK, K_SPLITK_REDUCE, K_EPILOGUE, K_ACT_GRAD,
           K_BIAS_GRAD, K_CHAIN, K_MSE, K_MSE_SCALE, K_SGD, K_MLP_FWD, K_MLP_BWD, K_MLP_WGRAD,
           K_MLP_REDUCE)  # fmt: skip
# Compiled at ELEMENTWISE_COMPILE_S.
ELEMENTWISE = frozenset({K_SPLITK_REDUCE, K_EPILOGUE, K_ACT_GRAD, K_BIAS_GRAD, K_MSE, K_MSE_SCALE,
                         K_SGD})  # fmt: skip
# How each provider that reaches the Linear choice picks its candidates.
IMPL_OF = {MANUALBP: "auto", **LINEAR_CANDIDATES}


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


@dataclass(frozen=True)
class Choice:
    """One measurement of the Linear choice: its bucket key (``linear_choice.forward_key`` /
    ``gemm_key``) and the estimated seconds of timing both candidates."""

    key: str
    seconds: float


@dataclass
class Work:
    """What a provider's calls need: Triton launches and Linear choices (in call order)."""

    launches: list[Launch] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)

    def __add__(self, other: Work) -> Work:
        return Work(self.launches + other.launches, self.choices + other.choices)


@dataclass
class PassEstimate:
    """What one pass needs and how long it should take (seconds)."""

    priority: int
    name: str
    providers: tuple[str, ...]
    triton_compiles: int = 0
    autotune_configs: int = 0
    choices: int = 0
    torch_compiles: int = 0
    triton_s: float = 0.0
    autotune_s: float = 0.0
    choice_s: float = 0.0
    torch_compile_s: float = 0.0
    measure_s: float = 0.0
    kernels: list[str] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return (self.triton_s + self.autotune_s + self.choice_s + self.torch_compile_s
                + self.measure_s)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The launch model
# ---------------------------------------------------------------------------------------------


def _fixed(kernel: str, variant: tuple) -> Launch:
    """A launch with one fixed configuration (not autotuned)."""
    seconds = ELEMENTWISE_COMPILE_S if kernel in ELEMENTWISE else TRITON_COMPILE_S
    return Launch(kernel, variant, 1, compile_s=seconds)


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision on the GPU (the interpreter's bf16 upcast is its "ieee")."""
    from manualbp.kernels._matmul import input_precision_for

    precision = input_precision_for(dtype)
    return "ieee" if precision == "upcast_ieee" else precision


def _meta(rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """A row-major (rows, cols) tensor on the meta device (strides and dtype, no storage)."""
    return torch.empty((rows, cols), dtype=dtype, device="meta")


def _tma(
    a: Tensor, b: Tensor, outs: tuple[Tensor, ...], *, bias: bool = False,
    act: str | None = None, store: bool = False, checked: tuple[Tensor, ...] | None = None,
) -> Launch | None:  # fmt: skip
    """The Hopper kernel's launch for ``a @ b`` into ``outs`` (with the Linear epilogue), or
    ``None`` where ``tma_supported`` refuses the operands ``checked`` (default ``(a, b)``)."""
    from manualbp.kernels._matmul import size_bucket
    from manualbp.kernels._matmul_hopper import hopper_configs_for, tma_layout, tma_supported

    dtype, precision, epilogue = a.dtype, _precision(a.dtype), act is not None
    if not tma_supported(ARCH, precision, checked or (a, b), outs, epilogue=epilogue):
        return None
    n = len(hopper_configs_for(ARCH, dtype, precision, epilogue=epilogue))
    variant = (DTYPE_NAMES[dtype], precision, bias, act, store, tma_layout(a), tma_layout(b))
    bucket = size_bucket(a.shape[0], b.shape[1], a.shape[1])
    return Launch(K_TMA, variant, n, (*variant, epilogue, bucket))


def _matmul(a: Tensor, b: Tensor) -> list[Launch]:
    """``_matmul.matmul(a, b)``: the Hopper kernel where eligible, else the pointer GEMM (one
    autotuner per size bucket and operand layout)."""
    from manualbp.kernels._matmul import configs_for, operand_layout, size_bucket

    tma = _tma(a, b, (_meta(a.shape[0], b.shape[1], a.dtype),))
    if tma is not None:
        return [tma]
    d, precision = DTYPE_NAMES[a.dtype], _precision(a.dtype)
    variant = (d, precision, operand_layout(a, b))
    n = len(configs_for(ARCH, a.dtype, precision))
    return [Launch(K_MATMUL, variant, n, (*variant, size_bucket(a.shape[0], b.shape[1],
                                                                a.shape[1])))]  # fmt: skip


def dw_splits(M: int, K: int, N: int, dtype: torch.dtype) -> int:
    """The slices ``splitk_matmul`` cuts dW = dZ^T X of a Linear (x (M, K), N outputs) into on
    an H200 (:data:`SMS` SMs): ``_splitk.plan_splits`` for the (N, K) output's tile count."""
    from manualbp.kernels._splitk import CHUNK_ALIGN, MIN_CHUNK, plan_splits, splitk_config_for

    cfg = splitk_config_for(ARCH, dtype, _precision(dtype))
    tiles = -(-N // cfg["BLOCK_M"]) * -(-K // cfg["BLOCK_N"])
    plan = plan_splits(tiles, M, SMS, min_chunk=MIN_CHUNK["cuda"], align=CHUNK_ALIGN["cuda"])
    return plan.splits


def _splitk(a: Tensor, b: Tensor) -> list[Launch]:
    """``_splitk.splitk_matmul(a, b)`` for dW (``a`` = dZ^T (N, M), ``b`` = X (M, K)): the
    partial and reduction kernels when the reduction is split, else :func:`_matmul`."""
    from manualbp.kernels._matmul import operand_layout

    N, M = a.shape
    if dw_splits(M, b.shape[1], N, a.dtype) == 1:
        return _matmul(a, b)
    d = DTYPE_NAMES[a.dtype]
    return [_fixed(K_SPLITK, (d, _precision(a.dtype), operand_layout(a, b))),
            _fixed(K_SPLITK_REDUCE, (d,))]  # fmt: skip


def _choice_s(a: Tensor, b: Tensor) -> float:
    """Estimated seconds of timing both candidates of ``a @ b`` (module docstring)."""
    from manualbp.kernels._matmul import dtype_class

    from manualbp.backends.linear_choice import IMPLS, TIMED_RUNS, WARMUP_RUNS

    (m, k), n, el = a.shape, b.shape[1], a.element_size()
    rate = CHOICE_TFLOPS[dtype_class(a.dtype, _precision(a.dtype))] * 1e12
    run = max(2.0 * m * n * k / rate, (m * k + k * n + 3 * m * n) * el / (CHOICE_GBPS * 1e9))
    return len(IMPLS) * (WARMUP_RUNS + TIMED_RUNS) * (run + CHOICE_RUN_OVERHEAD_S)


def _forward(
    M: int, K: int, N: int, act: str | None, dtype: torch.dtype, impl: str, *,
    bias: bool = True, store: bool = False,
) -> Work:  # fmt: skip
    """``linear_choice.linear_forward``: the fused Triton forward (``impl`` triton / auto), the
    cuBLAS candidate's elementwise pass where it needs one (cublas / auto), the choice (auto)."""
    from manualbp.backends.linear_choice import forward_key

    x, w, y = _meta(M, K, dtype), _meta(N, K, dtype), _meta(M, N, dtype)
    outs = (y, _meta(M, N, dtype)) if store else (y,)
    work = Work()
    if impl != "cublas":
        work.launches += _forward_triton(x, w, outs, bias, act, store)
    if impl != "triton":
        work.launches += _forward_cublas(dtype, bias, act, store)
    if impl == "auto":
        b = torch.empty((N,), dtype=dtype, device="meta") if bias else None
        work.choices.append(Choice(forward_key(x, w, b, act, store), _choice_s(x, w.t())))
    return work


def _forward_triton(
    x: Tensor, w: Tensor, outs: tuple[Tensor, ...], bias: bool, act: str | None, store: bool
) -> list[Launch]:
    """``linear_forward.linear_forward``: the Hopper kernel where ``tma_eligible``, else the
    pointer kernel over ``configs_for(..., epilogue=True)``."""
    from manualbp.kernels._matmul import configs_for, size_bucket

    tma = _tma(x, w.t(), outs, bias=bias, act=act, store=store, checked=(x, w))
    if tma is not None:
        return [tma]
    d, precision = DTYPE_NAMES[x.dtype], _precision(x.dtype)
    variant = (d, precision, bias, act, store)
    n = len(configs_for(ARCH, x.dtype, precision, epilogue=True))
    M, K = x.shape
    return [Launch(K_FWD, variant, n, (*variant, size_bucket(M, w.shape[0], K)))]


def _forward_cublas(dtype: torch.dtype, bias: bool, act: str | None, store: bool) -> list[Launch]:
    """``linear_choice._forward_cublas``'s Triton part: addmm (mm in fp64, whose bias the pass
    adds), then the epilogue pass unless the GEMM's output is already y."""
    pass_bias = bias and dtype == torch.float64
    if not store and act is None and not pass_bias:
        return []
    return [_fixed(K_EPILOGUE, (DTYPE_NAMES[dtype], pass_bias, act, store and pass_bias))]


def _act_grad(dtype: torch.dtype, act: str | None, store_dz: bool, db: bool) -> list[Launch]:
    """The elementwise pass (dZ = dY * act', bias partials) and the bias reduction."""
    if not (store_dz or db):
        return []
    d = DTYPE_NAMES[dtype]
    bias = [_fixed(K_BIAS_GRAD, (d,))] if db else []
    return [_fixed(K_ACT_GRAD, (d, act, store_dz, db)), *bias]


def _gemm(op: str, a: Tensor, b: Tensor, impl: str) -> Work:
    """dX (``op`` "dx": dZ @ W) or dW ("dw": dZ^T @ X) through the choice."""
    from manualbp.backends.linear_choice import gemm_key

    work = Work()
    if impl != "cublas":
        work.launches += _splitk(a, b) if op == "dw" else _matmul(a, b)
    if impl == "auto":
        work.choices.append(Choice(gemm_key(op, a, b), _choice_s(a, b)))
    return work


def _backward(
    M: int, K: int, N: int, act: str | None, dtype: torch.dtype, impl: str, *,
    bias: bool = True, dx: bool = True,
) -> Work:  # fmt: skip
    """``linear_choice.linear_backward``: the Triton elementwise pass, then dX and dW."""
    work = Work(_act_grad(dtype, act, act is not None, bias))
    dz = _meta(M, N, dtype)
    if dx:
        work += _gemm("dx", dz, _meta(N, K, dtype), impl)
    return work + _gemm("dw", dz.t(), _meta(M, K, dtype), impl)


def _linear(
    M: int, K: int, N: int, act: str | None, dtype: torch.dtype, impl: str = "auto", *,
    bias: bool = True, train: bool = True, dx: bool = True,
) -> Work:  # fmt: skip
    """``manualbp.Linear``'s calls: the forward (the pre-activation stored when backward needs
    it) and, for training, the backward, each GEMM by ``impl`` (auto: the choice)."""
    store = train and act in PREACT_ACTIVATIONS
    work = _forward(M, K, N, act, dtype, impl, bias=bias, store=store)
    return work + _backward(M, K, N, act, dtype, impl, bias=bias, dx=dx) if train else work


def _gemms_mode(M: int, K: int, N: int, dtype: torch.dtype) -> Work:
    """Mode ``gemms`` of ``manualbp``: the forward kernel (no bias, no activation), ``matmul``
    for dX and ``splitk_matmul`` for dW, called directly (no choice)."""
    x, w, y, dz = _meta(M, K, dtype), _meta(N, K, dtype), _meta(M, N, dtype), _meta(M, N, dtype)
    launches = _forward_triton(x, w, (y,), False, None, False)
    return Work(launches + _matmul(dz, w) + _splitk(dz.t(), x))


def chain_pairs(n_layers: int) -> list[tuple[int, ...]]:
    """How ``manualbp.Sequential`` groups a stack of ``n_layers`` Linear layers (activations
    between them) for cross-layer fusion: pairs from the first layer on, a last odd layer alone."""
    return [tuple(range(i, min(i + 2, n_layers))) for i in range(0, n_layers, 2)]


def _chain_backward(
    M: int, lower: tuple[int, int], upper: tuple[int, int], acts: tuple[str | None, str | None],
    dtype: torch.dtype, *, dx: bool,
) -> Work:  # fmt: skip
    """``LinearChainFunction``'s backward for ``x (M, k) -> lower (k -> n) -> act_l -> upper
    (n -> n_u) -> act_u`` with biases: ``linear_backward_chain`` (upper layer's elementwise
    pass, its dW by split-K, the chain GEMM with act_l' and db_l in its epilogue), then the
    lower layer's dX / dW through the choice."""
    from manualbp.kernels._matmul import operand_layout, size_bucket
    from manualbp.kernels.linear_backward import chain_configs

    (k, n), (_, n_u) = lower, upper
    act_l, act_u = acts
    d, precision = DTYPE_NAMES[dtype], _precision(dtype)
    dz_u, w_u, h = _meta(M, n_u, dtype), _meta(n_u, n, dtype), _meta(M, n, dtype)
    launches = _act_grad(dtype, act_u, act_u is not None, True) + _splitk(dz_u.t(), h)
    variant = (d, precision, act_l, True, operand_layout(dz_u, w_u))
    n_chain = len(chain_configs(ARCH, dtype, precision))
    launches += [Launch(K_CHAIN, variant, n_chain, (*variant, size_bucket(M, n, n_u))),
                 _fixed(K_BIAS_GRAD, (d,))]  # fmt: skip
    dz_l = _meta(M, n, dtype)
    work = Work(launches)
    if dx:
        work += _gemm("dx", dz_l, _meta(n, k, dtype), "auto")
    return work + _gemm("dw", dz_l.t(), _meta(M, k, dtype), "auto")


def _mlp_step(M: int, dims: tuple[int, ...], dtype: torch.dtype) -> Work:
    """The MLP step through ``convert``: each group of :func:`chain_pairs` (GELU after every
    layer but the last; the input needs no gradient) forward and backward, then MSE and SGD."""
    layers = list(itertools.pairwise(dims))
    acts = ["gelu"] * (len(layers) - 1) + [None]
    work = Work()
    for group in chain_pairs(len(layers)):
        for j in group:
            store = acts[j] in PREACT_ACTIVATIONS
            work += _forward(M, *layers[j], acts[j], dtype, "auto", store=store)
        if len(group) == 1:
            (j,) = group
            work += _backward(M, *layers[j], acts[j], dtype, "auto", dx=j > 0)
            continue
        lo, up = group
        work += _chain_backward(M, layers[lo], layers[up], (acts[lo], acts[up]), dtype,
                                dx=lo > 0)  # fmt: skip
    return work + Work(_mse(dtype) + _sgd(dtype, 0.9))


def _mse(dtype: torch.dtype) -> list[Launch]:
    """``mse_loss`` (mean) forward with its gradient in one launch, and the backward's scaling
    of that gradient by the upstream one."""
    d = DTYPE_NAMES[dtype]
    return [_fixed(K_MSE, (d, "mean", "grad")), _fixed(K_MSE_SCALE, (d,))]


def _sgd(dtype: torch.dtype, momentum: float) -> list[Launch]:
    return [_fixed(K_SGD, (DTYPE_NAMES[dtype], momentum != 0))]


def _fused_mlp(
    M: int, dims: tuple[int, ...], act: str, dtype: torch.dtype, *, train: bool
) -> list[Launch]:
    """``manualbp.FusedMLP``'s launches (``triton_kernels/fused_mlp.py``): the forward, one
    launch (storing what backward reads only when training); for training the backward chain,
    the weight-gradient blocks and, with more than one row chunk, their fixed-order reduction."""
    from manualbp.kernels.fused_mlp import launch_config, padded_width, wgrad_splits

    d, width = DTYPE_NAMES[dtype], padded_width(dims)
    precision = _precision(dtype)
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


def provider_work(case: Case, provider: str) -> Work:
    """The Triton launches and Linear choices of ``provider``'s calls on ``case`` (all its
    modes)."""
    p, dtype = case.params, case.dtype
    if provider not in TRITON_PROVIDERS or case.group in ("host_overhead", "reference"):
        return Work()
    if case.group == "linear":
        M, K, N = p["M"], p["K"], p["N"]
        work = _linear(M, K, N, p["activation"], dtype, IMPL_OF.get(provider, "auto"))
        if "gemms" in case.modes and provider == MANUALBP:
            work += _gemms_mode(M, K, N, dtype)
        return work
    if case.group == "mse":
        return Work(_mse(dtype))
    if case.group == "sgd":
        return Work(_sgd(dtype, p["momentum"]))
    if case.group == "linear_mse":
        M, K, N = p["M"], p["K"], p["N"]
        if provider == MANUALBP_UNFUSED:
            return _linear(M, K, N, None, dtype) + Work(_mse(dtype))
        from manualbp.autograd.linear_mse import default_chunk_rows

        # Per chunk of rows: the forward, then its Linear backward (fp16 / bf16 recompute the
        # chunk's forward in backward first: the same launches).
        return _linear(default_chunk_rows(M, K, N), K, N, None, dtype)
    if case.group == "mlp_step":
        return _mlp_step(p["M"], tuple(p["dims"]), dtype)
    if case.group in ("fused_mlp_step", "fused_mlp_infer"):
        train = case.group == "fused_mlp_step"
        out = _fused_mlp(p["M"], tuple(p["dims"]), p["activation"], dtype, train=train)
        return Work(out + (_mse(dtype) + _sgd(dtype, 0.9) if train else []))
    raise ValueError(f"no launch model for group {case.group!r}")


def triton_launches(case: Case, provider: str) -> list[Launch]:
    """The Triton launches of ``provider``'s calls on ``case`` (all its modes)."""
    return provider_work(case, provider).launches


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
        self.chosen: set[str] = set()  # Linear choice buckets decided (one process, one GPU)
        self.torch_compiled = False


def _estimate_pass(p: Pass, state: _State) -> PassEstimate:
    est = PassEstimate(p.priority, p.case.name, p.providers)
    for provider in p.providers:
        work = provider_work(p.case, provider)
        for choice in work.choices:
            if choice.key not in state.chosen:
                state.chosen.add(choice.key)
                est.choices += 1
                est.choice_s += choice.seconds
        for launch in work.launches:
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
        no_gemms = provider == COMPILE or provider in LINEAR_CANDIDATES  # gemms not offered
        modes = [m for m in p.case.modes if not (m == "gemms" and no_gemms)]
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

_COLUMNS = ("#", "prio", "case [providers]", "triton", "tune", "choose", "t.comp",
            "triton_s", "tune_s", "choose_s", "t.comp_s", "measure_s", "total_s",
            "cumul_s")  # fmt: skip


def _row(i: int, e: PassEstimate, cumul: float) -> list[str]:
    return [
        str(i), str(e.priority), f"{e.name} [{', '.join(e.providers)}]",
        str(e.triton_compiles), str(e.autotune_configs), str(e.choices), str(e.torch_compiles),
        f"{e.triton_s:.1f}", f"{e.autotune_s:.1f}", f"{e.choice_s:.2f}",
        f"{e.torch_compile_s:.1f}", f"{e.measure_s:.1f}", f"{e.total_s:.1f}", f"{cumul:.1f}",
    ]  # fmt: skip


def _constants() -> list[str]:
    return [
        f"  TRITON_COMPILE_S={TRITON_COMPILE_S} per Triton compile (one config of one GEMM kernel "
        f"variant; counted serially), ELEMENTWISE_COMPILE_S={ELEMENTWISE_COMPILE_S} per "
        f"elementwise kernel, AUTOTUNE_S_PER_CONFIG={AUTOTUNE_S_PER_CONFIG},",
        f"  Linear choice per bucket: 2 candidates x (warm-up + timed) runs, each "
        f"max(FLOPs / CHOICE_TFLOPS, bytes / CHOICE_GBPS) + {CHOICE_RUN_OVERHEAD_S * 1e6:g} us, "
        f"CHOICE_TFLOPS={CHOICE_TFLOPS}, CHOICE_GBPS={CHOICE_GBPS:g},",
        f"  sm_{ARCH} with {SMS} SMs (Hopper GEMM eligibility and configs from "
        f"_matmul_hopper, split-K from _splitk.plan_splits),",
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
    rows, cumul = [["0", "-", "run start (imports, CUDA context, ceilings)", "", "", "", "",
                    "", "", "", "", f"{RUN_START_S:.1f}", f"{RUN_START_S:.1f}",
                    f"{RUN_START_S:.1f}"]], RUN_START_S  # fmt: skip
    for i, e in enumerate(estimates, 1):
        cumul += e.total_s
        rows.append(_row(i, e, cumul))
    table = [list(_COLUMNS), *rows]
    widths = [max(len(r[c]) for r in table) for c in range(len(_COLUMNS))]
    lines = [
        "Plan of the CUDA suite on sm_90 (H200), in run order; estimated seconds.",
        "triton: new Triton compiles (configs x kernel variants not compiled by an earlier pass);",
        "tune: configs benchmarked by triton's autotuner; choose: Linear choice buckets timed "
        "(manualbp.backends.linear_choice); t.comp: torch.compile warm-ups.",
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
