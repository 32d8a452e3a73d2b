"""The suites: which cases run, and in which order (:func:`build_cases`, :func:`schedule`).

On CUDA the full suite runs in priority order (``P_*`` below; the order and why:
benchmarks/README.md, "Run order"), so that a run cut short by its time budget has measured
what matters most; priority 0 is what ``benchmarks/gpu_run.sh`` must always measure (``--plan``
shows that it fits). On CPU the suites are small, the cases of :mod:`benchmarks.host_cases`
first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.cases import (
    COMPILE,
    COMPILE_MAX_AUTOTUNE,
    LINEAR_CANDIDATES,
    MANUALBP,
    MANUALBP_CONVERT,
    NATIVE,
    Case,
    fused_mlp_infer_case,
    fused_mlp_step_case,
    linear_case,
    linear_mse_case,
    mlp_step_case,
    mse_case,
    second_order_case,
    sgd_case,
)

__all__ = ["Pass", "build_cases", "schedule"]

GPU_TOKENS = 8192
GPU_LINEAR_SHAPES = [(1024, 4096), (4096, 1024), (4096, 4096), (8192, 8192)]
GPU_MSE_LOG2 = [20, 22, 24, 26, 28]
GPU_MLP = (1024, 4096, 4096, 4096, 1024)
# "Linear on the GPU" section 5: (M, K, N) of Linear+GELU bf16 judged against their bound.
GPU_BOUND_SHAPES = [(8192, 4096, 16384), (65536, 1024, 1024)]

CPU_TOKENS = 512
CPU_LINEAR_SHAPES = [(128, 512), (512, 128), (512, 512), (1024, 1024)]
CPU_MSE_LOG2 = [16, 18, 20, 22]
CPU_MLP = (128, 512, 512, 512, 128)

CPU_QUICK_TOKENS = 256
CPU_QUICK_LINEAR_SHAPES = [(256, 512)]
CPU_QUICK_MSE_LOG2 = [16, 20]
CPU_QUICK_MLP = (128, 256, 256, 256, 128)

ACTIVATIONS = (None, "relu", "gelu")

# The fused narrow MLP (issue 15): hidden widths, batches (log2 rows) of the sweep, and the
# headline the goals are stated on (width 64, 4 hidden layers, 2^18 rows).
GPU_NARROW_WIDTHS = (64, 128)
GPU_NARROW_LOG2_M = (16, 17, 18, 19, 20, 21)
NARROW_HEADLINE = (64, 18)
CPU_NARROW = (64, 14)  # width, log2 rows of the CPU suite
CPU_QUICK_NARROW = (64, 12)
# The fused MLP's second order (issue 24): (loss, activation) at 2^18 points, fp32 (TF32) and bf16.
SECOND_ORDER = [("eikonal", "softplus"), ("eikonal", "sin"), ("force", "softplus")]
SECOND_ORDER_LOG2_M = 18
CPU_QUICK_SECOND_ORDER_LOG2_M = 12
# The step's providers without max-autotune (where no max-autotune shape is wanted).
NARROW_NO_MAX_AUTOTUNE = [NATIVE, MANUALBP, COMPILE, MANUALBP_CONVERT]

# Priorities of the CUDA suite, run in ascending order (benchmarks/README.md, "Run order").
P_FIRST, P_BOUND, P_DEFERRED, P_REST, P_MATRIX, P_FP32, P_FP32_LARGEST = range(7)
# torch.compile measured in the deferred pass rather than with the rest of the case.
DEFER_COMPILE = {COMPILE: P_DEFERRED}


def candidates_later(priority: int, **more: int) -> dict[str, int]:
    """Provider priorities of a bf16 Linear case at ``priority``: the forced Linear candidates
    in a later pass than the case's own providers, plus ``more``."""
    later = P_DEFERRED if priority < P_DEFERRED else max(priority, P_MATRIX)
    return {**{p: later for p in LINEAR_CANDIDATES}, **more}


def _linear_bf16(
    M: int, K: int, N: int, act: str | None, device: torch.device, priority: int, **kw
) -> Case:
    """A bf16 Linear case with the forced Linear candidates, in a later pass."""
    more = kw.pop("provider_priority", {})
    return linear_case(M, K, N, act, torch.bfloat16, device, priority, candidates=True,
                       provider_priority=candidates_later(priority, **more), **kw)  # fmt: skip


@dataclass(frozen=True)
class Pass:
    """One step of a run: measure ``providers`` of ``case``. A case whose providers have
    different priorities (:attr:`Case.provider_priority`) is measured in several passes; the
    ``first`` creates its record, the later ones add to it."""

    case: Case
    providers: tuple[str, ...]
    priority: int
    first: bool


def schedule(cases: list[Case]) -> list[Pass]:
    """The passes of ``cases`` in run order: by priority, then in the cases' order."""
    passes: list[tuple[int, int, Pass]] = []
    for index, case in enumerate(cases):
        prios = sorted({case.priority_of(p) for p in case.providers})
        for prio in prios:
            providers = tuple(p for p in case.providers if case.priority_of(p) == prio)
            passes.append((prio, index, Pass(case, providers, prio, prio == prios[0])))
    passes.sort(key=lambda t: (t[0], t[1]))
    return [p for _, _, p in passes]


def build_cases(device: torch.device, quick: bool) -> list[Case]:
    """Every case of the suite for ``device``, in definition order (:func:`schedule` orders
    them by priority). ``quick`` keeps a small subset (bf16 on CUDA, fp32 on CPU). ``meta``
    builds the CUDA suite on meta tensors (shapes and dtypes, no storage: the plan's)."""
    if device.type in ("cuda", "meta"):
        return _cuda_quick(device) if quick else _cuda_full(device)
    from benchmarks.host_cases import host_cases

    return host_cases(device) + (_cpu_quick(device) if quick else _cpu_full(device))


def _cuda_quick(device: torch.device) -> list[Case]:
    """The priority-0 cases (and their deferred torch.compile passes), then SGD."""
    sgd = [sgd_case(GPU_MLP, m, torch.float32, device, P_REST) for m in (0.0, 0.9)]
    return _cuda_first(device) + sgd


def _cuda_first(device: torch.device) -> list[Case]:
    """Priority 0, most valuable first: what gpu_run.sh must always measure."""
    bf16, fp32, M = torch.bfloat16, torch.float32, GPU_TOKENS
    return [
        _linear_bf16(M, 4096, 4096, "gelu", device, P_FIRST),
        _linear_bf16(M, 4096, 4096, None, device, P_FIRST, provider_priority=DEFER_COMPILE),
        mlp_step_case(M, GPU_MLP, bf16, device, P_FIRST, provider_priority=DEFER_COMPILE),
        mse_case(24, fp32, device, P_FIRST, provider_priority=DEFER_COMPILE),
        mse_case(26, fp32, device, P_FIRST, provider_priority=DEFER_COMPILE),
        linear_mse_case(M, 4096, 8192, bf16, device, P_FIRST, provider_priority=DEFER_COMPILE),
        *_narrow_headline(bf16, device, P_FIRST),
        # Issue 13's decisive shapes (GEMM-bound N=16384; fusion-bound K=N=1024), against
        # eager here; their torch.compile pass comes right after priority 0.
        *[_linear_bf16(m, k, n, "gelu", device, P_FIRST, gemms=True,
                       provider_priority={COMPILE: P_BOUND}) for m, k, n in GPU_BOUND_SHAPES],
    ]  # fmt: skip


def _narrow_headline(dtype: torch.dtype, device: torch.device, priority: int) -> list[Case]:
    """The fused MLP at its headline shape: the step against eager and torch.compile (default
    mode) at ``priority``, through ``convert`` in the deferred pass and under max-autotune at
    P_REST; inference against eager at ``priority``, against torch.compile deferred."""
    width, log2m = NARROW_HEADLINE
    later = {MANUALBP_CONVERT: max(priority, P_DEFERRED), COMPILE_MAX_AUTOTUNE: P_REST}
    if priority == P_FIRST:  # the step's torch.compile warm-up (~20 s) right after priority 0
        later[COMPILE] = P_BOUND
    step = fused_mlp_step_case(1 << log2m, width, dtype, device, priority, provider_priority={
        p: prio for p, prio in later.items() if prio > priority})  # fmt: skip
    infer_later = {COMPILE: P_DEFERRED} if priority < P_DEFERRED else {}
    infer = fused_mlp_infer_case(1 << log2m, width, dtype, device, priority,
                                 provider_priority=infer_later)  # fmt: skip
    return [step, infer]


def _narrow_sweep(device: torch.device, have: set[str]) -> list[Case]:
    """Priority P_MATRIX: the fused MLP's step over widths, batches and bf16 / fp16 (those not
    already in the suite); max-autotune only at 2^18 rows (its compile costs ~90 s a shape)."""
    cases = []
    for dtype in (torch.bfloat16, torch.float16):
        for width in GPU_NARROW_WIDTHS:
            for log2m in GPU_NARROW_LOG2_M:
                providers = None if log2m == NARROW_HEADLINE[1] else NARROW_NO_MAX_AUTOTUNE
                case = fused_mlp_step_case(1 << log2m, width, dtype, device, P_MATRIX,
                                           providers=providers)  # fmt: skip
                if case.name not in have:
                    cases.append(case)
    return cases


def _cuda_full(device: torch.device) -> list[Case]:
    bf16, fp16, fp32, M = torch.bfloat16, torch.float16, torch.float32, GPU_TOKENS
    cases = _cuda_first(device)
    have = {c.name for c in cases}
    for m, k, n in GPU_BOUND_SHAPES:  # plain Linear there: its target is native, not compile
        cases.append(_linear_bf16(m, k, n, None, device, P_BOUND,
                                  provider_priority=DEFER_COMPILE))  # fmt: skip
    # The rest of what the targets are stated on.
    rest = [_linear_bf16(M, K, N, act, device, P_REST)
            for act in ("gelu", None) for K, N in GPU_LINEAR_SHAPES]  # fmt: skip
    rest += [mse_case(log2n, fp32, device, P_REST) for log2n in GPU_MSE_LOG2]
    rest += [sgd_case(GPU_MLP, momentum, fp32, device, P_REST) for momentum in (0.0, 0.9)]
    rest += [linear_mse_case(M, 4096, N, bf16, device, P_REST) for N in (1024, 4096)]
    rest += _narrow_headline(fp16, device, P_REST)
    rest += [second_order_case(loss, act, 1 << SECOND_ORDER_LOG2_M, dtype, device, P_REST)
             for dtype in (bf16, fp32) for loss, act in SECOND_ORDER]  # fmt: skip
    cases += [c for c in rest if c.name not in have]
    have |= {c.name for c in cases}
    # The rest of the bf16 / fp16 matrix.
    cases += [linear_case(M, K, N, "relu", bf16, device, P_MATRIX) for K, N in GPU_LINEAR_SHAPES]
    cases += [linear_case(M, K, N, act, fp16, device, P_MATRIX)
              for act in ACTIVATIONS for K, N in GPU_LINEAR_SHAPES]  # fmt: skip
    cases += [mse_case(log2n, bf16, device, P_MATRIX) for log2n in GPU_MSE_LOG2]
    cases += _narrow_sweep(device, have)
    cases += _fp32_cases(M, GPU_LINEAR_SHAPES, GPU_MLP, device)
    return cases


def _fp32_cases(
    M: int, shapes: list[tuple[int, int]], dims: tuple[int, ...], device: torch.device
) -> list[Case]:
    """fp32 (IEEE unless the float32 matmul precision says otherwise), the largest GEMMs last,
    and the bf16 SGD steps."""
    fp32, bf16, largest = torch.float32, torch.bfloat16, shapes[-1]
    cases = [linear_case(M, K, N, act, fp32, device, P_FP32)
             for act in ACTIVATIONS for K, N in shapes if largest != (K, N)]  # fmt: skip
    cases.append(mlp_step_case(M, dims, fp32, device, P_FP32))
    cases += [sgd_case(dims, momentum, bf16, device, P_FP32) for momentum in (0.0, 0.9)]
    cases += [linear_case(M, *largest, act, fp32, device, P_FP32_LARGEST) for act in ACTIVATIONS]
    return cases


def _cpu_quick(device: torch.device) -> list[Case]:
    fp32, M = torch.float32, CPU_QUICK_TOKENS
    cases = [linear_case(M, K, N, act, fp32, device, 0)
             for act in (None, "gelu") for K, N in CPU_QUICK_LINEAR_SHAPES]  # fmt: skip
    cases += [mse_case(log2n, fp32, device, 0) for log2n in CPU_QUICK_MSE_LOG2]
    cases += [sgd_case(CPU_QUICK_MLP, momentum, fp32, device, 0) for momentum in (0.0, 0.9)]
    K, N = CPU_QUICK_LINEAR_SHAPES[0]
    cases.append(linear_mse_case(M, K, N, fp32, device, 0))
    cases.append(mlp_step_case(M, CPU_QUICK_MLP, fp32, device, 0))
    width, log2m = CPU_QUICK_NARROW
    cases.append(fused_mlp_step_case(1 << log2m, width, fp32, device, 0))
    cases.append(fused_mlp_infer_case(1 << log2m, width, fp32, device, 0))
    cases.append(second_order_case("eikonal", "softplus", 1 << CPU_QUICK_SECOND_ORDER_LOG2_M,
                                   fp32, device, 0))  # fmt: skip
    return cases


def _cpu_full(device: torch.device) -> list[Case]:
    """The CPU suite: no fp16 (torch's CPU fp16 GEMM is no fast path: seconds per call)."""
    bf16, fp32, M = torch.bfloat16, torch.float32, CPU_TOKENS
    cases = [linear_case(M, K, N, act, bf16, device, 0)
             for act in ("gelu", None) for K, N in CPU_LINEAR_SHAPES]  # fmt: skip
    cases += [mse_case(log2n, fp32, device, 0) for log2n in CPU_MSE_LOG2]
    cases += [sgd_case(CPU_MLP, momentum, fp32, device, 0) for momentum in (0.0, 0.9)]
    cases += [linear_mse_case(M, K, N, bf16, device, 0) for K, N in CPU_LINEAR_SHAPES[1:]]
    cases.append(mlp_step_case(M, CPU_MLP, bf16, device, 0))
    width, log2m = CPU_NARROW
    cases.append(fused_mlp_step_case(1 << log2m, width, bf16, device, 0))
    cases.append(fused_mlp_infer_case(1 << log2m, width, bf16, device, 0))
    cases += [linear_case(M, K, N, "relu", bf16, device, 1) for K, N in CPU_LINEAR_SHAPES]
    cases += [mse_case(log2n, bf16, device, 1) for log2n in CPU_MSE_LOG2]
    fp32_cases = _fp32_cases(M, CPU_LINEAR_SHAPES, CPU_MLP, device)
    for c in fp32_cases:  # on CPU: priorities 2 and 3, as before
        c.priority = 2 if c.priority == P_FP32 else 3
    return cases + fp32_cases
