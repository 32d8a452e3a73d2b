"""Shared GEMM pieces: block-shape configs (as data), the tiled main loop, and a strided GEMM.

``C = A @ B`` with ``A`` (M, K), ``B`` (K, N) and ``C`` (M, N), every operand addressed through
its own strides so that transposed and non-contiguous views need no copy. Offsets are computed
in int64 so tensors past 2**31 elements are addressed correctly, and nothing assumes 16-byte
alignment (Triton specialises on pointer/stride divisibility by itself when it holds).

Accumulation is fp32 for fp16/bf16/fp32 inputs and fp64 for fp64 inputs. The GEMM of the
fused Linear forward lives in ``linear.py``; it reuses :func:`tile_offsets` and
:func:`gemm_mainloop` from here.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._host import target
from ._matmul_hopper import matmul_tma, tma_eligible
from ._runtime import cast_out, dtype_class, input_precision_for, size_bucket, smem_limit
from ._tuning import tuned_launch


# ---------------------------------------------------------------------------------------------
# Configs, as data: one short list per (architecture family, dtype class, fused epilogue).
#
# Each entry: block shape, L2 grouping, warps and software-pipeline stages. Every list here is
# compiled by the audit (``python -m manualbp.kernels.audit``) and must stay spill-free under
# every supported Triton (3.6 and 3.9 are exercised). The lists are short on purpose: the
# autotuner compiles and times every entry on first use, and compile time on the GPU is scarce.
#
# Dtype classes (see :func:`dtype_class`): "fp16" (fp16/bf16 tensor cores), "tf32" (fp32 on
# tensor cores, when torch's float32 matmul precision allows it), "fp32" (IEEE fp32: tl.dot
# runs on the FMA units, operand fragments in registers) and "fp64".
# ---------------------------------------------------------------------------------------------
def _cfg(m: int, n: int, k: int, warps: int, stages: int, group: int = 8) -> dict[str, int]:
    return dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=group, num_warps=warps, num_stages=stages)


# Hopper (sm_90 and later): BLOCK_M in {64, 128} with num_warps a multiple of 4 so that Triton
# lowers tl.dot to wgmma; BLOCK_K is 128 bytes of operand (64 fp16/bf16, 32 fp32 for TF32), so
# the TF32 tiles fit the 227 KiB of shared memory with the same pipelining. A fused epilogue
# (bias + activation + pre-activation store) needs registers next to the accumulator: at most
# 64 accumulator elements per thread there (128x256 w8, 128 per thread, spills with GELU).
_SM90_FP16 = [_cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(64, 128, 64, 4, 4)]
_SM90_FP16_EPILOGUE = [_cfg(128, 128, 64, 8, 4), _cfg(64, 128, 64, 4, 4), _cfg(64, 64, 64, 4, 4)]
_SM90_TF32 = [_cfg(128, 256, 32, 8, 3), _cfg(128, 128, 32, 8, 4), _cfg(64, 128, 32, 4, 4)]
_SM90_TF32_EPILOGUE = [_cfg(128, 128, 32, 8, 4), _cfg(64, 128, 32, 4, 4), _cfg(64, 64, 32, 4, 4)]
# Ampere (sm_80/86/89): the mma.sync shapes of the matmul tutorial. TF32 fragments are twice
# the size: 128x128x32 and 128x64x32 with 4 warps spill under Triton 3.6, so TF32 uses 8.
_SM80_FP16 = [_cfg(128, 256, 32, 8, 3), _cfg(128, 128, 32, 4, 4), _cfg(64, 128, 32, 4, 4),
              _cfg(64, 64, 32, 4, 5)]  # fmt: skip
_SM80_FP16_EPILOGUE = [_cfg(128, 128, 32, 8, 3), _cfg(64, 128, 32, 4, 4), _cfg(64, 64, 32, 4, 5)]
_SM80_TF32 = [_cfg(128, 128, 32, 8, 3), _cfg(64, 128, 32, 4, 4), _cfg(64, 64, 32, 4, 5)]
# IEEE fp32 and fp64, every architecture. FMA-path tiles keep few accumulator elements per
# thread (64x128x32 w8 and 64x64x32 w4 spill on sm_90 under one Triton version or the other);
# fp64 doubles the register footprint: small tiles, and 8 warps with an epilogue (32x64x16 w4
# spills with erf-GELU on sm_80 under Triton 3.6).
# The plain lists also serve an M-major A (dW = dZ^T X unsplit) and an accumulating C, where
# 128x64x32 w8 (fp32) and 64x64x16 w4 (fp64, Triton 3.6) spill on sm_90.
_FP32_IEEE = [_cfg(128, 128, 32, 8, 3), _cfg(32, 64, 32, 4, 3)]
_FP32_IEEE_EPILOGUE = [_cfg(128, 64, 32, 8, 3), _cfg(32, 64, 32, 4, 3)]
_FP64 = [_cfg(64, 64, 16, 8, 3), _cfg(32, 64, 16, 4, 3)]
_FP64_EPILOGUE = [_cfg(64, 64, 16, 8, 3), _cfg(32, 64, 16, 8, 3)]

# (architecture family, dtype class, fused epilogue) -> configs the autotuner tries.
GEMM_CONFIGS: dict[tuple[int, str, bool], list[dict[str, int]]] = {
    (90, "fp16", False): _SM90_FP16,
    (90, "fp16", True): _SM90_FP16_EPILOGUE,
    (90, "tf32", False): _SM90_TF32,
    (90, "tf32", True): _SM90_TF32_EPILOGUE,
    (90, "fp32", False): _FP32_IEEE,
    (90, "fp32", True): _FP32_IEEE_EPILOGUE,
    (90, "fp64", False): _FP64,
    (90, "fp64", True): _FP64_EPILOGUE,
    (80, "fp16", False): _SM80_FP16,
    (80, "fp16", True): _SM80_FP16_EPILOGUE,
    (80, "tf32", False): _SM80_TF32,
    (80, "tf32", True): _SM80_TF32,
    (80, "fp32", False): _FP32_IEEE,
    (80, "fp32", True): _FP32_IEEE_EPILOGUE,
    (80, "fp64", False): _FP64,
    (80, "fp64", True): _FP64_EPILOGUE,
}
# The one config used under the CPU interpreter (autotuning there would be very slow).
INTERPRETER_CONFIG: dict[str, int] = dict(
    BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1
)


def configs_for(
    arch: int, dtype: torch.dtype, input_precision: str, *, epilogue: bool = False
) -> list[dict[str, int]]:
    """The shipped configs (:data:`GEMM_CONFIGS`) for ``arch`` (80, 90, ...), input ``dtype``,
    ``tl.dot`` input precision (see :func:`input_precision_for`) and whether the kernel has a
    fused ``epilogue``, pruned to what fits in the architecture's shared memory."""
    family = 90 if arch >= 90 else 80
    base = GEMM_CONFIGS[(family, dtype_class(dtype, input_precision), epilogue)]
    limit = smem_limit(arch)
    elsize = torch.empty((), dtype=dtype).element_size()
    kept = [c for c in base if smem_estimate(c, elsize) <= limit]
    # Never return an empty list: fall back to the smallest config.
    return kept or [min(base, key=lambda c: smem_estimate(c, elsize))]


def smem_estimate(cfg: dict[str, int], elsize: int) -> int:
    """Shared memory of the pipelined operand buffers: stages * (A tile + B tile)."""
    tile = (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * elsize
    return cfg["num_stages"] * tile


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """int64 row/column offsets of this program's output tile, in grouped order.

    Programs are ordered so that GROUP_M consecutive row-blocks share the column-blocks they
    visit, which keeps the B tiles they read in L2 (matmul tutorial, "L2 cache optimizations").
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    # int64 before multiplying by strides: offsets past 2**31 elements stay exact.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n


@triton.jit
def gemm_mainloop(
    a_ptr, b_ptr,
    offs_m, offs_n,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC_FP64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Accumulate the (BLOCK_M, BLOCK_N) tile ``A[offs_m, :] @ B[:, offs_n]`` over K."""
    # Row pointers of the A tile and column pointers of the B tile (int64 offsets).
    a_rows = a_ptr + offs_m[:, None] * stride_am
    b_cols = b_ptr + offs_n[None, :] * stride_bn
    mask_m = offs_m[:, None] < M
    mask_n = offs_n[None, :] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC_FP64 else tl.float32)
    # Iterate over K one BLOCK_K slab at a time; the K offsets are int64 and recomputed from
    # the slab start (no pointer increments that could overflow 32 bits for a huge stride).
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        a = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=mask_m & mask_k[None, :], other=0.0)
        b = tl.load(b_cols + offs_k[:, None] * stride_bk, mask=mask_k[:, None] & mask_n, other=0.0)
        # out_dtype: the accumulator's (fp64 for fp64 inputs). Triton 3.6's tl.dot defaults it
        # to fp32 and rejects an fp64 accumulator without it; 3.9 takes acc's dtype.
        if INPUT_PRECISION == "upcast_ieee":
            # CPU interpreter only: it has no bf16 dot, so multiply the fp32 upcasts.
            acc = tl.dot(
                a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=acc.dtype
            )
        else:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    ACC_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``C = A @ B`` (``C += A @ B`` when ``ACCUMULATE``: C fp32 or fp64 for narrower A, B) for
    strided A (M, K), B (K, N), C (M, N); one program per C tile."""
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = gemm_mainloop(
        a_ptr, b_ptr, offs_m, offs_n, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
        BLOCK_M, BLOCK_N, BLOCK_K, ACC_FP64, INPUT_PRECISION,
    )  # fmt: skip
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(acc.dtype)
    tl.store(c_ptrs, cast_out(acc, c_ptr.dtype.element_ty), mask=c_mask)


def major(t: torch.Tensor, names: str = "rcs") -> str:
    """``names[0]`` for a row-major 2-D ``t``, ``names[1]`` for column-major, ``names[2]`` for
    neither."""
    if t.stride(1) == 1 or t.shape[1] <= 1:
        return names[0]
    return names[1] if t.stride(0) == 1 or t.shape[0] <= 1 else names[2]


def operand_layout(a: torch.Tensor, b: torch.Tensor) -> str:
    """Which dimension of each GEMM operand is contiguous, from its strides: ``"A:K"`` (A
    (M, K) row-major, K-major) or ``"A:M"`` (column-major, e.g. dW's stride-swapped dZ^T),
    ``"B:N"`` or ``"B:K"``, ``S`` for neither. Part of the tuning key: the best tile and
    pipeline depth differ between layouts, so dX = dZ W and dW = dZ^T X tune apart."""
    return f"A:{major(a, 'KMS')},B:{major(b, 'NKS')}"


def tuning_key(a: torch.Tensor, b: torch.Tensor, accumulate: bool = False) -> str:
    """The bucket :func:`matmul` keeps its config for: dtype, ``tl.dot`` precision, accumulate,
    size bucket and :func:`operand_layout` (so dX = dZ W and dW = dZ^T X tune apart)."""
    M, K = a.shape
    precision = input_precision_for(a.dtype, a.device)
    bucket = size_bucket(M, b.shape[1], K)
    return f"{a.dtype}|{precision}|{int(accumulate)}|{bucket}|{operand_layout(a, b)}"


def grid_of(M: int, N: int, cfg: dict[str, int]) -> tuple[int]:
    """The 1-D grid covering an (M, N) output in the config's tiles."""
    return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)


def gemm_configs(
    device: torch.device, dtype: torch.dtype, precision: str, *, epilogue: bool = False
) -> list[dict[str, int]]:
    """The configs a launch on ``device`` chooses among: the shipped list for its GPU (the
    interpreter: :data:`INTERPRETER_CONFIG` alone)."""
    gpu = target(device)
    if gpu is None:
        return [INTERPRETER_CONFIG]
    return configs_for(gpu[0], dtype, precision, epilogue=epilogue)


def matmul(
    a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None, accumulate: bool = False
) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` (M, K) and ``b`` (K, N) of one dtype, any strides.

    Returns ``out`` (any strides and float dtype; ``accumulate``: ``out += a @ b``, summed in the
    accumulator, e.g. an fp32 ``out`` for bf16 operands) or a new contiguous (M, N) tensor of
    ``a.dtype`` (fp32/fp64 accumulation). An empty inner dimension gives zeros; an empty output
    launches nothing. On sm_90+ the persistent TMA kernel of :mod:`._matmul_hopper` runs when
    :func:`~._matmul_hopper.tma_eligible` allows it.
    """
    M, K = a.shape
    N = b.shape[1]
    c = out if out is not None else torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0 or (K == 0 and accumulate):
        return c
    if K == 0:
        return c.zero_()
    if tma_eligible((a, b), (c,), accumulate=accumulate):
        return matmul_tma(a, b, out=c, accumulate=accumulate)
    precision = input_precision_for(a.dtype, a.device)
    meta = dict(ACC_FP64=a.dtype == torch.float64, INPUT_PRECISION=precision, ACCUMULATE=accumulate)
    args = (a, b, c, M, N, K, *a.stride(), *b.stride(), *c.stride())

    def make(cfg: dict[str, Any]) -> tuple[tuple[int], tuple, dict[str, Any]]:
        return grid_of(M, N, cfg), args, {**meta, **cfg}

    # Accumulating reads C's tile into the epilogue too: on tensor cores the epilogue-sized
    # tiles (the bigger ones spill there); the FMA lists are small enough as they are.
    on_tensor_cores = dtype_class(a.dtype, precision) in ("fp16", "tf32")
    cfgs = gemm_configs(a.device, a.dtype, precision, epilogue=accumulate and on_tensor_cores)
    # Timing runs every config on the call's tensors: an accumulating launch gets C put back.
    tuned_launch(matmul_kernel, tuning_key(a, b, accumulate), cfgs, make, a.device,
                 restore=(c,) if accumulate else ())  # fmt: skip
    return c
