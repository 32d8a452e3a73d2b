"""Shared GEMM pieces: block-shape configs (as data), the tiled main loop, and a strided GEMM.

``C = A @ B`` with ``A`` (M, K), ``B`` (K, N) and ``C`` (M, N), every operand addressed through
its own strides so that transposed and non-contiguous views need no copy. Offsets are computed
in int64 so tensors past 2**31 elements are addressed correctly, and nothing assumes 16-byte
alignment (Triton specialises on pointer/stride divisibility by itself when it holds).

Accumulation is fp32 for fp16/bf16/fp32 inputs and fp64 for fp64 inputs. The GEMM of the
fused Linear forward lives in ``linear_forward.py``; it reuses :func:`tile_offsets` and
:func:`gemm_mainloop` from here.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

# Re-exported: the launchers import these from here too. INTERPRETER is fixed when imported,
# like the interpreter itself, so compiled GPU code never contains the workaround in cast_out.
from ._runtime import INTERPRETER, interpreting


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
_SM80_FP16 = [
    _cfg(128, 256, 32, 8, 3),
    _cfg(128, 128, 32, 4, 4),
    _cfg(64, 128, 32, 4, 4),
    _cfg(64, 64, 32, 4, 5),
]
_SM80_FP16_EPILOGUE = [_cfg(128, 128, 32, 8, 3), _cfg(64, 128, 32, 4, 4), _cfg(64, 64, 32, 4, 5)]
_SM80_TF32 = [_cfg(128, 128, 32, 8, 3), _cfg(64, 128, 32, 4, 4), _cfg(64, 64, 32, 4, 5)]
# IEEE fp32 and fp64, every architecture. FMA-path tiles keep few accumulator elements per
# thread (64x128x32 w8 and 64x64x32 w4 spill on sm_90 under one Triton version or the other);
# fp64 doubles the register footprint: small tiles, and 8 warps with an epilogue (32x64x16 w4
# spills with erf-GELU on sm_80 under Triton 3.6).
_FP32_IEEE = [_cfg(128, 128, 32, 8, 3), _cfg(128, 64, 32, 8, 3), _cfg(32, 64, 32, 4, 3)]
_FP32_IEEE_EPILOGUE = [_cfg(128, 64, 32, 8, 3), _cfg(32, 64, 32, 4, 3)]
_FP64 = [_cfg(64, 64, 16, 8, 3), _cfg(64, 64, 16, 4, 3), _cfg(32, 64, 16, 4, 3)]
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

# Usable shared memory per block, bytes, by compute capability (A100: 163 KiB, H100/H200 and
# B200: 227 KiB, consumer Ampere/Ada/Blackwell: 99 KiB). Unknown archs get the smallest.
SMEM_LIMIT: dict[int, int] = {
    80: 166912,
    86: 101376,
    87: 166912,
    89: 101376,
    90: 232448,
    100: 232448,
    120: 101376,
}


def smem_limit(arch: int) -> int:
    """Usable shared memory per block on compute capability ``arch``."""
    return SMEM_LIMIT.get(arch, 101376)


def arch_of(device: torch.device) -> int:
    """Compute capability as ``10 * major + minor`` (``0`` for CPU / interpreter)."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def dtype_class(dtype: torch.dtype, input_precision: str) -> str:
    """The config class of a GEMM on ``dtype`` inputs with ``tl.dot`` ``input_precision``:
    ``"fp16"`` (fp16 and bf16), ``"tf32"``, ``"fp32"`` (IEEE) or ``"fp64"``."""
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        return "tf32" if input_precision == "tf32" else "fp32"
    return "fp16"


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


def to_triton_configs(cfgs: list[dict[str, int]]) -> list[triton.Config]:
    """``triton.Config`` objects for a list of config dicts."""
    out = []
    for c in cfgs:
        kw = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
        out.append(triton.Config(kw, num_warps=c["num_warps"], num_stages=c["num_stages"]))
    return out


def input_precision_for(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 follows ``torch.get_float32_matmul_precision()``
    (``"highest"``: IEEE, otherwise TF32); the CPU interpreter always computes IEEE, and gets
    ``"upcast_ieee"`` for bf16 (its ``tl.dot`` has no bf16 path: the kernels upcast first)."""
    if interpreting():
        return "upcast_ieee" if dtype == torch.bfloat16 else "ieee"
    fp32_fast = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return "tf32" if fp32_fast else "ieee"


def use_fixed_config(device: torch.device) -> bool:
    """Launch with :data:`INTERPRETER_CONFIG` instead of autotuning (interpreter / CPU)."""
    return interpreting() or device.type != "cuda"


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def cast_out(x, dtype: tl.constexpr):
    """``x.to(dtype)`` for a store. Under the CPU interpreter a bf16 target is rounded to
    nearest-even here first: the interpreter's own fp32 -> bf16 conversion drops the carry when
    rounding up a mantissa of all ones (up to 2x off). NaN handling is not needed there."""
    if INTERPRETER and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


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
    a_ptr,
    b_ptr,
    offs_m,
    offs_n,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC_FP64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Accumulate the (BLOCK_M, BLOCK_N) tile ``A[offs_m, :] @ B[:, offs_n]`` over K."""
    # Row pointers of the A tile and column pointers of the B tile (int64 offsets).
    a_rows = a_ptr + offs_m[:, None] * stride_am
    b_cols = b_ptr + offs_n[None, :] * stride_bn
    mask_m = offs_m[:, None] < M
    mask_n = offs_n[None, :] < N
    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
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
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    ACC_FP64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``C = A @ B`` for strided A (M, K), B (K, N), C (M, N); one program per C tile."""
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = gemm_mainloop(
        a_ptr,
        b_ptr,
        offs_m,
        offs_n,
        M,
        N,
        K,
        stride_am,
        stride_ak,
        stride_bk,
        stride_bn,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        ACC_FP64,
        INPUT_PRECISION,
    )
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptrs, cast_out(acc, c_ptr.dtype.element_ty), mask=c_mask)


def size_bucket(*sizes: int) -> tuple[int, ...]:
    """Sizes rounded up to powers of two: the autotuning key. Keying on exact sizes would
    re-run the whole config search for every new token count (variable batches, the last
    partial batch); shapes within a factor of two share their best config."""
    return tuple(triton.next_power_of_2(max(s, 1)) for s in sizes)


def operand_layout(a: torch.Tensor, b: torch.Tensor) -> str:
    """Which dimension of each GEMM operand is contiguous, from its strides: ``"A:K"`` (A
    (M, K) row-major, K-major) or ``"A:M"`` (column-major, e.g. dW's stride-swapped dZ^T),
    ``"B:N"`` or ``"B:K"``, ``S`` for neither. Part of the autotuning key: the best tile and
    pipeline depth differ between layouts, so dX = dZ W and dW = dZ^T X tune apart."""

    def major(t: torch.Tensor, inner: str, outer: str) -> str:
        if t.stride(1) == 1 or t.shape[1] <= 1:
            return inner
        return outer if t.stride(0) == 1 or t.shape[0] <= 1 else "S"

    return f"A:{major(a, 'K', 'M')},B:{major(b, 'N', 'K')}"


def tuning_key(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """``(arch, dtype, input precision, size bucket, operand layout)``: the autotuner
    :func:`matmul` uses for ``a @ b`` (one per key)."""
    M, K = a.shape
    precision = input_precision_for(a.dtype)
    bucket = size_bucket(M, b.shape[1], K)
    return arch_of(a.device), a.dtype, precision, bucket, operand_layout(a, b)


@functools.cache
def _tuned_matmul(
    arch: int, dtype: torch.dtype, input_precision: str, bucket: tuple[int, ...], layout: str = ""
) -> Any:
    # One autotuner per size bucket (see size_bucket) and operand layout (operand_layout),
    # tuned on the first shape it sees.
    # Every C element is written exactly once per launch: no reset_to_zero needed.
    return triton.autotune(
        configs=to_triton_configs(configs_for(arch, dtype, input_precision)),
        key=["ACC_FP64", "INPUT_PRECISION"],
    )(matmul_kernel)


def grid_for(M: int, N: int):
    """1-D grid covering the (M, N) output in BLOCK_M x BLOCK_N tiles."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` (M, K) and ``b`` (K, N) of one dtype, any strides.

    Returns a new contiguous (M, N) tensor of ``a.dtype`` (fp32/fp64 accumulation). An empty
    inner dimension gives zeros; an empty output launches nothing. On sm_90+ the persistent
    TMA kernel of :mod:`triton_kernels._matmul_hopper` runs instead when
    :func:`~triton_kernels._matmul_hopper.tma_eligible` allows it (fp16/bf16/TF32, 16-byte
    aligned row-major or transposed operands).
    """
    M, K = a.shape
    N = b.shape[1]
    if K == 0:
        return torch.zeros((M, N), dtype=a.dtype, device=a.device)
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    # sm_90+ and TMA-readable operands: the persistent TMA kernel. Imported here: it imports
    # this module.
    from ._matmul_hopper import matmul_tma, tma_eligible

    if tma_eligible((a, b), (c,)):
        return matmul_tma(a, b, out=c)
    args = (
        a,
        b,
        c,
        M,
        N,
        K,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        c.stride(0),
        c.stride(1),
    )
    acc_fp64 = a.dtype == torch.float64
    precision = input_precision_for(a.dtype)
    if use_fixed_config(a.device):
        matmul_kernel[grid_for(M, N)](
            *args, ACC_FP64=acc_fp64, INPUT_PRECISION=precision, **INTERPRETER_CONFIG
        )
    else:
        tuned = _tuned_matmul(*tuning_key(a, b))
        tuned[grid_for(M, N)](*args, ACC_FP64=acc_fp64, INPUT_PRECISION=precision)
    return c
