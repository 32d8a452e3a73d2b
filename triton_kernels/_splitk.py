"""Deterministic split-K GEMM: ``C = A @ B`` with the reduction dimension cut into S slices.

The weight gradient of a Linear, ``dW = dZ^T X`` ((N, M) @ (M, K), ``A = dZ^T`` a stride-swapped
view of dZ, no copy; called from :mod:`.linear`), reduces over the many batch rows into an
(N, K) output that may have few tiles: at N = K = 1024 and 128 x 128 tiles, 64 tiles for an
H100/H200's 132 SMs, so one program per tile leaves half the GPU idle. Split-K cuts the
reduction into S slices of ``chunk`` rows:

1. :func:`splitk_partial_kernel`, grid ``(tiles, S)``: program ``(t, s)`` stores tile ``t`` of
   slice ``s``'s product in fp32 (fp64 for fp64) into a workspace ``(S, M, N)``; each element
   is written exactly once (no slice is empty), so the workspace needs no zeroing.
2. :func:`splitk_reduce_kernel` adds the S partials of every element in the fixed order
   ``s = 0, 1, ..., S-1`` and rounds the sum once to the output dtype.

No atomics: the result is bitwise the same from run to run (the config is fixed per
architecture and dtype class, :data:`SPLITK_CONFIGS`; the split depends on the shape and SM
count only).

When to split (:func:`plan_splits`): an output of at least ``SPLIT_BELOW_WAVES * SMs`` tiles
keeps one program per tile. Below that the reduction is cut into ``S = cdiv(TARGET_WAVES * SMs,
tiles)`` slices (about two waves), at most ``MAX_SPLITS``, each at least ``MIN_CHUNK`` long: a
slice of ``chunk`` rows reads ``chunk * (BM + BN)`` operand elements and writes and re-reads
``BM * BN`` fp32 partials, so with 128 x 128 tiles and chunks of >= 1024 rows the workspace
traffic stays below 1/8 of the operand traffic (16-bit operands). Slice starts are aligned to
``CHUNK_ALIGN`` rows (a multiple of every BLOCK_K). Under the CPU interpreter the SM count is a
stand-in (:data:`INTERPRETER_SM_COUNT`) and the chunks small, so small test shapes split.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._host import acc_dtype, launch, target
from ._matmul import INTERPRETER_CONFIG, _cfg, gemm_mainloop, matmul, smem_estimate, tile_offsets
from ._runtime import cast_out, dtype_class, input_precision_for, smem_limit

__all__ = ["SPLITK_CONFIGS", "REDUCE_CONFIGS", "SplitPlan", "plan_splits", "sm_count",
           "splitk_config", "splitk_config_for", "splitk_matmul", "splitk_partial_kernel",
           "splitk_reduce_kernel"]  # fmt: skip


# One config per (architecture family, dtype class), as data: the tile shape must be known
# before launch (it sets the tile count, hence S), and one fixed config keeps the summation
# order, so the bits, the same in every process (no autotuning). Each is a spill-free entry of
# the plain GEMM's lists in ``_matmul.GEMM_CONFIGS``, compiled again by the audit with dW's
# M-major A operand.
SPLITK_CONFIGS: dict[tuple[int, str], dict[str, int]] = {
    (90, "fp16"): _cfg(128, 128, 64, 8, 4),
    (90, "tf32"): _cfg(128, 128, 32, 8, 4),
    (90, "fp32"): _cfg(128, 128, 32, 8, 3),
    (90, "fp64"): _cfg(64, 64, 16, 8, 3),
    (80, "fp16"): _cfg(128, 128, 32, 4, 4),
    (80, "tf32"): _cfg(128, 128, 32, 8, 3),
    (80, "fp32"): _cfg(128, 128, 32, 8, 3),
    (80, "fp64"): _cfg(64, 64, 16, 8, 3),
}
# The reduction kernel's block (a bandwidth-bound pass over S * M * N partials).
REDUCE_CONFIGS: dict[str, dict[str, int]] = {
    "cuda": dict(BLOCK_M=16, BLOCK_N=256, num_warps=4),
    "interpreter": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4),
}

# The split heuristic's numbers (module docstring). Interpreter values: small, so that test
# shapes of a few dozen rows split.
SPLIT_BELOW_WAVES = 2  # split when the output has fewer tiles than this many per SM
TARGET_WAVES = 2  # aim for about this many programs per SM
MAX_SPLITS = 32
MIN_CHUNK = {"cuda": 1024, "interpreter": 32}
CHUNK_ALIGN = {"cuda": 256, "interpreter": 16}
INTERPRETER_SM_COUNT = 4


@triton.jit
def splitk_partial_kernel(
    a_ptr, b_ptr, ws_ptr,
    M, N, K, CHUNK,
    stride_am, stride_ak, stride_bk, stride_bn,
    ACC_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``ws[s] = A[:, s*CHUNK : (s+1)*CHUNK] @ B[s*CHUNK : (s+1)*CHUNK, :]`` for one tile;
    ``ws`` is a contiguous (S, M, N) fp32 (fp64) workspace."""
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    s = tl.program_id(1)
    k0 = s.to(tl.int64) * CHUNK  # int64: the slice start times a stride may pass 2**31
    k_len = tl.minimum(CHUNK, K - s * CHUNK)
    acc = gemm_mainloop(
        a_ptr + k0 * stride_ak, b_ptr + k0 * stride_bk, offs_m, offs_n, M, N, k_len, stride_am,
        stride_ak, stride_bk, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, ACC_FP64, INPUT_PRECISION,
    )  # fmt: skip
    ws_ptrs = ws_ptr + s.to(tl.int64) * M * N + offs_m[:, None] * N + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(ws_ptrs, acc, mask=mask)


@triton.jit
def splitk_reduce_kernel(
    ws_ptr, c_ptr,
    S, M, N,
    stride_cm, stride_cn,
    ACC_FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``C = sum_s ws[s]``, added in the order s = 0, 1, ..., S-1 (deterministic), rounded
    once to C's dtype."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    plane = tl.full([], M, tl.int64) * N  # int64: S * M * N may pass 2**31 (M may be constexpr 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC_FP64 else tl.float32)
    for _ in range(S):
        acc += tl.load(ws_ptrs, mask=mask, other=0.0)
        ws_ptrs += plane
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, cast_out(acc, c_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
def sm_count(device: torch.device) -> int:
    """The device's SM count (:data:`INTERPRETER_SM_COUNT` under the interpreter / on CPU)."""
    gpu = target(device)
    return INTERPRETER_SM_COUNT if gpu is None else gpu[1]


def splitk_config_for(arch: int, dtype: torch.dtype, precision: str) -> dict[str, int]:
    """:data:`SPLITK_CONFIGS` for compute capability ``arch`` (80, 90, ...), with pipeline
    stages dropped until it fits the architecture's shared memory."""
    cfg = dict(SPLITK_CONFIGS[(90 if arch >= 90 else 80, dtype_class(dtype, precision))])
    elsize = torch.empty((), dtype=dtype).element_size()
    while cfg["num_stages"] > 2 and smem_estimate(cfg, elsize) > smem_limit(arch):
        cfg["num_stages"] -= 1
    return cfg


def splitk_config(device: torch.device, dtype: torch.dtype, precision: str) -> dict[str, int]:
    """The partial kernel's config on ``device`` (``INTERPRETER_CONFIG`` on CPU)."""
    gpu = target(device)
    return INTERPRETER_CONFIG if gpu is None else splitk_config_for(gpu[0], dtype, precision)


class SplitPlan(NamedTuple):
    """``(splits, chunk)``: S slices of ``chunk`` reduction indices (the last may be shorter)."""

    splits: int
    chunk: int


def plan_splits(tiles: int, k: int, sms: int, *, min_chunk: int, align: int,
                requested: int | None = None) -> SplitPlan:  # fmt: skip
    """How to cut a reduction of length ``k`` for an output of ``tiles`` tiles on ``sms``
    SMs (module docstring); ``requested``: this many slices instead of the heuristic's (1: no
    split), still at least ``align`` long. Every slice of the plan is non-empty."""
    if requested is None:
        if tiles >= SPLIT_BELOW_WAVES * sms:
            return SplitPlan(1, k)
        want = min(triton.cdiv(TARGET_WAVES * sms, max(tiles, 1)), MAX_SPLITS, k // min_chunk)
    else:
        want = requested
    if want <= 1 or k <= align:
        return SplitPlan(1, k)
    chunk = triton.cdiv(triton.cdiv(k, want), align) * align
    return SplitPlan(triton.cdiv(k, chunk), chunk)


def _plan(a: torch.Tensor, b: torch.Tensor, cfg: dict[str, int], requested: int | None):
    M, K = a.shape
    N = b.shape[1]
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    where = "interpreter" if target(a.device) is None else "cuda"
    return plan_splits(tiles, K, sm_count(a.device), min_chunk=MIN_CHUNK[where],
                       align=CHUNK_ALIGN[where], requested=requested)  # fmt: skip


def splitk_matmul(a: torch.Tensor, b: torch.Tensor, *, splits: int | None = None) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` (M, K) and ``b`` (K, N) of one dtype, any strides, with the
    reduction over K split when the output has few tiles (:func:`plan_splits`).

    ``splits``: ``None`` for the heuristic, ``1`` for no split (the plain GEMM of
    :func:`triton_kernels._matmul.matmul`), or the number of slices wanted (rounded to whole
    ``CHUNK_ALIGN`` slices). Returns a new contiguous (M, N) tensor of ``a.dtype``; bitwise
    deterministic.
    """
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0 or K == 0:
        return matmul(a, b)
    precision = input_precision_for(a.dtype, a.device)
    cfg = splitk_config(a.device, a.dtype, precision)
    plan = _plan(a, b, cfg, splits)
    if plan.splits == 1:
        return matmul(a, b)
    acc_fp64 = a.dtype == torch.float64
    ws = torch.empty((plan.splits, M, N), dtype=acc_dtype(a.dtype), device=a.device)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    launch(
        splitk_partial_kernel, (tiles, plan.splits), a, b, ws, M, N, K, plan.chunk,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        ACC_FP64=acc_fp64, INPUT_PRECISION=precision, **cfg,
    )  # fmt: skip
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    rcfg = REDUCE_CONFIGS["interpreter" if target(a.device) is None else "cuda"]
    grid = (triton.cdiv(M, rcfg["BLOCK_M"]), triton.cdiv(N, rcfg["BLOCK_N"]))
    launch(splitk_reduce_kernel, grid, ws, c, plan.splits, M, N, c.stride(0), c.stride(1),
           ACC_FP64=acc_fp64, **rcfg)  # fmt: skip
    return c
