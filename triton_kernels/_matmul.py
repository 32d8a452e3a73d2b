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
import os
from typing import Any

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# Configs, as data. Each entry: block shape, L2 grouping, warps and software-pipeline stages.
# Hopper (sm_90) configs use BLOCK_M in {64, 128} with num_warps a multiple of 4 so that Triton
# lowers tl.dot to wgmma; Ampere (sm_80) configs are the mma.sync shapes of the matmul tutorial.
# ---------------------------------------------------------------------------------------------
SM80_CONFIGS: list[dict[str, int]] = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=5),
]
SM90_CONFIGS: list[dict[str, int]] = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
]
# IEEE fp32 (torch's default "highest" matmul precision) runs tl.dot on the FMA units, where
# operand fragments live in registers: the tensor-core tiles above would spill.
FP32_IEEE_CONFIGS: list[dict[str, int]] = [
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
    # (64x64x32 with 4 warps spills in ptxas for sm_90 at 96 registers; 2 warps does not.)
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=2, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
]
# fp64 has no fast tensor-core path worth big tiles and an fp64 accumulator doubles the
# register footprint: small tiles on every architecture.
FP64_CONFIGS: list[dict[str, int]] = [
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=3),
]
# A fused epilogue (bias + activation + pre-activation store) needs registers next to the
# accumulator: kernels with one only use configs holding at most this many accumulator
# elements per thread (the audit shows the larger tiles spill with a GELU epilogue).
# IEEE fp32 (FMA dot: operand fragments in registers too) and fp64 get less room.
MAX_EPILOGUE_ACC_PER_THREAD: dict[str, int] = {"tensor_core": 64, "fp32_ieee": 32, "fp64": 16}
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


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (read when triton was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def arch_of(device: torch.device) -> int:
    """Compute capability as ``10 * major + minor`` (``0`` for CPU / interpreter)."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def configs_for(
    arch: int, dtype: torch.dtype, input_precision: str, *, epilogue: bool = False
) -> list[dict[str, int]]:
    """The shipped configs for ``arch`` (80, 90, ...), input ``dtype`` and ``tl.dot`` input
    precision (see :func:`input_precision_for`), pruned to what fits in shared memory and, for
    a kernel with a fused ``epilogue``, to :data:`MAX_EPILOGUE_ACC_PER_THREAD`."""
    if dtype == torch.float64:
        base = FP64_CONFIGS
    elif dtype == torch.float32 and input_precision == "ieee":
        base = FP32_IEEE_CONFIGS
    elif arch >= 90:
        base = SM90_CONFIGS
    else:
        base = SM80_CONFIGS
    limit = smem_limit(arch)
    elsize = torch.empty((), dtype=dtype).element_size()
    kept = [c for c in base if smem_estimate(c, elsize) <= limit]
    if epilogue:
        if dtype == torch.float64:
            cap = MAX_EPILOGUE_ACC_PER_THREAD["fp64"]
        elif dtype == torch.float32 and input_precision == "ieee":
            cap = MAX_EPILOGUE_ACC_PER_THREAD["fp32_ieee"]
        else:
            cap = MAX_EPILOGUE_ACC_PER_THREAD["tensor_core"]
        kept = [c for c in kept if acc_per_thread(c) <= cap]
    # Never return an empty list: fall back to the smallest config.
    return kept or [min(base, key=lambda c: smem_estimate(c, elsize))]


def smem_estimate(cfg: dict[str, int], elsize: int) -> int:
    """Shared memory of the pipelined operand buffers: stages * (A tile + B tile)."""
    tile = (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * elsize
    return cfg["num_stages"] * tile


def acc_per_thread(cfg: dict[str, int]) -> int:
    """Accumulator elements held by each thread."""
    return cfg["BLOCK_M"] * cfg["BLOCK_N"] // (32 * cfg["num_warps"])


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
# Fixed when this module is imported, like the interpreter itself (TRITON_INTERPRET is read
# when triton is imported): compiled GPU code never contains the interpreter workaround below.
INTERPRETER: tl.constexpr = tl.constexpr(interpreting())


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
        if INPUT_PRECISION == "upcast_ieee":
            # CPU interpreter only: it has no bf16 dot, so multiply the fp32 upcasts.
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
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


@functools.cache
def _tuned_matmul(
    arch: int, dtype: torch.dtype, input_precision: str, bucket: tuple[int, ...]
) -> Any:
    # One autotuner per size bucket (see size_bucket), tuned on the first shape it sees.
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
    inner dimension gives zeros; an empty output launches nothing.
    """
    M, K = a.shape
    N = b.shape[1]
    if K == 0:
        return torch.zeros((M, N), dtype=a.dtype, device=a.device)
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
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
        tuned = _tuned_matmul(arch_of(a.device), a.dtype, precision, size_bucket(M, N, K))
        tuned[grid_for(M, N)](*args, ACC_FP64=acc_fp64, INPUT_PRECISION=precision)
    return c
