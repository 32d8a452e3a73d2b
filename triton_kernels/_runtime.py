"""What every kernel module needs about where it runs, on the Triton side: the interpreter as a
constexpr, accumulator dtypes, masked memory helpers, rounding for stores, and the facts GEMM
configs are chosen by (dtype class, ``tl.dot`` precision, shared memory, size buckets).
Host-only facts and the launch path are in :mod:`._host`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import interpreting, target

__all__ = ["INTERPRETER", "cast_out", "dtype_class", "input_precision_for", "load", "size_bucket",
           "smem_limit", "store", "tl_acc_dtype"]  # fmt: skip

# A constexpr for kernels: compiled GPU code never contains the interpreter-only branches.
INTERPRETER: tl.constexpr = tl.constexpr(interpreting())

# Usable shared memory per block, bytes, by compute capability (A100: 163 KiB, H100/H200 and
# B200: 227 KiB, consumer Ampere/Ada/Blackwell: 99 KiB). Unknown archs get the smallest.
SMEM_LIMIT: dict[int, int] = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
                              100: 232448, 120: 101376}  # fmt: skip


def smem_limit(arch: int) -> int:
    """Usable shared memory per block on compute capability ``arch``."""
    return SMEM_LIMIT.get(arch, 101376)


def tl_acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """The accumulator dtype of ``dtype`` inputs as a Triton dtype: fp64 for fp64, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def input_precision_for(dtype: torch.dtype, device: torch.device) -> str:
    """``tl.dot`` input precision: fp32 follows ``torch.get_float32_matmul_precision()``
    (``"highest"``: IEEE, else TF32); the CPU interpreter computes IEEE, and gets
    ``"upcast_ieee"`` for bf16 (its ``tl.dot`` has no bf16 path: the kernels upcast first)."""
    if target(device) is None:
        return "upcast_ieee" if dtype == torch.bfloat16 else "ieee"
    fp32_fast = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return "tf32" if fp32_fast else "ieee"


def dtype_class(dtype: torch.dtype, input_precision: str) -> str:
    """The config class of a GEMM: ``"fp16"`` (fp16 and bf16), ``"tf32"``, ``"fp32"`` (IEEE:
    ``tl.dot`` on the FMA units) or ``"fp64"``."""
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        return "tf32" if input_precision == "tf32" else "fp32"
    return "fp16"


def size_bucket(*sizes: int) -> tuple[int, ...]:
    """Sizes rounded up to powers of two: the tuning key. Exact sizes would re-tune for every
    new token count; shapes within a factor of two share their best config."""
    return tuple(triton.next_power_of_2(max(s, 1)) for s in sizes)


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
def load(ptr, off, mask, ACC: tl.constexpr, MASKED: tl.constexpr):
    """``ptr[off]`` converted to ``ACC``; masked (other 0) only when ``MASKED``, so full
    blocks of aligned contiguous data compile to vector loads."""
    v = tl.load(ptr + off, mask=mask, other=0.0) if MASKED else tl.load(ptr + off)
    return v.to(ACC)


@triton.jit
def store(ptr, off, value, mask, MASKED: tl.constexpr):
    """``ptr[off] = value`` cast to ``ptr``'s dtype; masked only when ``MASKED``."""
    if MASKED:
        tl.store(ptr + off, value.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + off, value.to(ptr.dtype.element_ty))
