"""The Linear layer's kernels: ``Y = act(X W^T + b)`` forward, its backward, and the cross-layer
backward of ``Linear -> act_p -> Linear``; each GEMM Triton or cuBLAS, chosen per shape.

Forward (:func:`forward`). Candidate ``"triton"``: one GEMM whose epilogue adds the bias to the
fp32 (fp64) accumulator, rounds Z to the output dtype (as native Linear does before its
activation), stores Z only when the backward reads it, and applies the activation
(:func:`linear_forward_kernel`; on sm_90+ the persistent TMA kernel of :mod:`._matmul_hopper`).
Candidate ``"cublas"``: ``torch.addmm`` / ``torch.mm`` (the bias in cuBLASLt's epilogue; fp64
adds it in the pass), then, where needed, one elementwise pass over the GEMM output
(:func:`linear_epilogue_kernel`, in place unless Z is kept).

Backward (:func:`backward`), deterministic (no atomics): :func:`act_grad_kernel`, one pass over
(M, N), writes dZ = dY * act'(saved) and the fp32 (fp64) column sums of its row block into a
``(cdiv(M, BLOCK_M * ROW_STEPS), N)`` partials buffer, which :func:`bias_grad_kernel` sums in a
fixed order (db); then dX = dZ W and dW = dZ^T X, each Triton (dW by the deterministic split-K
GEMM of :mod:`._splitk` on a stride-swapped dZ^T, no copy) or ``torch.mm``.

Cross-layer fusion (:func:`backward_chain`): the upper layer's dX GEMM, ``dH = dZ W``, is the
lower layer's dY; :func:`chain_grad_kernel` applies the lower activation's derivative in that
GEMM's epilogue, writing ``dZ_p = dH * act_p'(saved_p)`` and its bias partials: dH never exists
in memory. Its alternative: ``torch.mm`` then :func:`act_grad_kernel`.

The choice (forward, each backward GEMM, the chain GEMM) is made per *bucket*: op, dtype (fp32
with its matmul precision), activation, bias and pre-activation store, operand layouts, M
rounded up to a power of two, N, K. A bucket's first call times both candidates on its own
tensors (``_tuning.choose``: cuBLAS replaces the fused Triton candidate only when
:data:`CUBLAS_MARGIN` faster; the interpreter, CPU tensors and graph capture run ``"triton"``).
:func:`force` or ``MANUALBP_LINEAR_IMPL`` (``auto`` | ``triton`` | ``cublas``) forces one.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _tuning
from ._activations import NAMES, activation_grad, apply_activation, constexpr, slope_as
from ._host import acc_dtype, launch, on_device, target
from ._matmul import (
    configs_for,
    gemm_configs,
    gemm_mainloop,
    grid_of,
    major,
    matmul,
    operand_layout,
    tile_offsets,
)
from ._matmul_hopper import launch_gemm, tma_eligible
from ._runtime import cast_out, dtype_class, input_precision_for, size_bucket
from ._splitk import splitk_matmul
from ._tuning import tuned_launch

__all__ = ["CHAIN_EXCLUDED", "CUBLAS_MARGIN", "ELEMENTWISE_CONFIGS", "EPILOGUE_CONFIGS", "IMPLS",
           "IMPL_ENV", "backward", "backward_chain", "chain_configs", "epilogue", "force",
           "forward", "grad_accumulate", "mode"]  # fmt: skip


# Fixed block shapes of the two elementwise kernels, as data (the audit compiles these).
# act_grad: each program walks ROW_STEPS blocks of BLOCK_M rows of one BLOCK_N column block,
# so the partials buffer has cdiv(M, BLOCK_M * ROW_STEPS) rows. bias_grad sums BLOCK_R rows of
# partials per step. fp64 math (libdevice erf, exp) is register-hungry: smaller tiles (the
# audit shows 16x128 with 4 warps spilling for fp64 GELU). sin's derivative (libdevice cosf
# and its range reduction, inlined per element) spills at 32 elements a thread (bf16, sm_80):
# half the rows per block, twice the steps (the same rows per program and partials).
ELEMENTWISE_CONFIGS: dict[str, dict[str, int]] = {
    "cuda": dict(BLOCK_M=32, BLOCK_N=128, ROW_STEPS=8, BLOCK_R=32, num_warps=4),
    "cuda_sin": dict(BLOCK_M=16, BLOCK_N=128, ROW_STEPS=16, BLOCK_R=32, num_warps=4),
    "cuda_fp64": dict(BLOCK_M=8, BLOCK_N=128, ROW_STEPS=32, BLOCK_R=16, num_warps=4),
    "interpreter": dict(BLOCK_M=8, BLOCK_N=32, ROW_STEPS=2, BLOCK_R=4, num_warps=4),
}

# Block shapes, as data (the audit compiles the CUDA ones): 8 x 256 elements per program with
# 4 warps, 16 per thread, loaded in 128-bit vectors along a contiguous row. fp64 math
# (libdevice erf, exp) needs twice the registers per element: half the tile.
EPILOGUE_CONFIGS: dict[str, dict[str, int]] = {
    "cuda": dict(BLOCK_M=8, BLOCK_N=256, num_warps=4),
    "cuda_fp64": dict(BLOCK_M=4, BLOCK_N=256, num_warps=4),
    "interpreter": dict(BLOCK_M=16, BLOCK_N=64, num_warps=4),
}

# The chain GEMM (chain_grad_kernel) tunes over the forward's epilogue configs
# (``configs_for(..., epilogue=True)``) less these (architecture family, dtype class) ->
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps), which spill in the audit: its epilogue holds a tile
# of the saved tensor next to the accumulator, where the forward's holds a bias row (sm_90
# TF32 128x128 w8 with erf-GELU: 32 B under Triton 3.9; sm_80 TF32 64x128 w4 with tanh-GELU:
# 28 B under 3.6; fp64 64x64 w8 with tanh-GELU: 44 to 372 B under 3.6 and 3.9).
CHAIN_EXCLUDED: dict[tuple[int, str], tuple[tuple[int, int, int, int], ...]] = {
    (90, "tf32"): ((128, 128, 32, 8),),
    (80, "tf32"): ((64, 128, 32, 4),),
    (90, "fp64"): ((64, 64, 16, 8),),
    (80, "fp64"): ((64, 64, 16, 8),),
}


def chain_configs(arch: int, dtype: torch.dtype, precision: str) -> list[dict[str, int]]:
    """The configs :func:`chain_grad_kernel` is tuned over on compute capability ``arch``."""
    base = configs_for(arch, dtype, precision, epilogue=True)
    excluded = CHAIN_EXCLUDED.get((90 if arch >= 90 else 80, dtype_class(dtype, precision)), ())
    shape = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps")
    kept = [c for c in base if tuple(c[k] for k in shape) not in excluded]
    return kept or [min(base, key=lambda c: c["BLOCK_M"] * c["BLOCK_N"])]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def linear_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, z_ptr,
    negative_slope: tl.float64,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_ym, stride_yn, stride_zm,
    stride_zn,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr,
    ACC_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M, BLOCK_N) tile of ``act(X @ W^T + b)``; W (N, K) is read as B = W^T."""
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # B[k, n] = W[n, k]: B's (k, n) strides are W's (k, n) strides.
    acc = gemm_mainloop(
        x_ptr, w_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn,
        BLOCK_M, BLOCK_N, BLOCK_K, ACC_FP64, INPUT_PRECISION,
    )  # fmt: skip
    _bias_act_store(
        acc, offs_m, offs_n, M, N, b_ptr, stride_b, y_ptr, stride_ym, stride_yn, z_ptr,
        stride_zm, stride_zn, negative_slope, HAS_BIAS, ACTIVATION, STORE_PREACT,
    )  # fmt: skip


@triton.jit
def _bias_act_store(
    acc, offs_m, offs_n, M, N, b_ptr, stride_b, y_ptr, stride_ym, stride_yn, z_ptr, stride_zm,
    stride_zn, negative_slope, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    STORE_PREACT: tl.constexpr,
):  # fmt: skip
    """The epilogue on an fp32 (fp64) tile: bias, the pre-activation store, the activation.
    z is rounded to the output dtype first, as native Linear + activation does (a no-op for
    fp32/fp64): y matches native rounding and the stored z is what backward differentiates at."""
    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0)
        acc += bias.to(acc.dtype)[None, :]
    mask = (offs_m[:, None] < M) & mask_n[None, :]
    z = cast_out(acc, y_ptr.dtype.element_ty)
    if STORE_PREACT:
        z_ptrs = z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn
        tl.store(z_ptrs, z, mask=mask)
    y = apply_activation(z.to(acc.dtype), slope_as(negative_slope, acc.dtype), ACTIVATION)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, cast_out(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def linear_epilogue_kernel(
    acc_ptr, b_ptr, y_ptr, z_ptr,
    negative_slope: tl.float64,
    M, N,
    stride_am, stride_an, stride_b, stride_ym, stride_yn, stride_zm, stride_zn,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M, BLOCK_N) tile: ``z = round(acc + b)``, ``y = round(act(z))``."""
    # int64 offsets: (M, N) tensors may exceed 2**31 elements.
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    a_ptrs = acc_ptr + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an
    v = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float64 if ACC_FP64 else tl.float32)
    _bias_act_store(
        v, offs_m, offs_n, M, N, b_ptr, stride_b, y_ptr, stride_ym, stride_yn, z_ptr, stride_zm,
        stride_zn, negative_slope, HAS_BIAS, ACTIVATION, STORE_PREACT,
    )  # fmt: skip


@triton.jit
def act_grad_kernel(
    g_ptr, s_ptr, dz_ptr, part_ptr,
    negative_slope: tl.float64,
    M, N,
    stride_gm, stride_gn, stride_sm, stride_sn, stride_dzm, stride_dzn,
    ACTIVATION: tl.constexpr, STORE_DZ: tl.constexpr, COMPUTE_DB: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_STEPS: tl.constexpr,
):  # fmt: skip
    """dZ = dY * act'(saved) over ROW_STEPS * BLOCK_M rows and BLOCK_N columns; optionally the
    column sums of those rows into ``part[pid_m, :]`` (fp32, fp64 for fp64)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # int64 offsets: (M, N) tensors may exceed 2**31 elements.
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    col = tl.zeros((BLOCK_N,), dtype=acc_dtype)
    slope = slope_as(negative_slope, acc_dtype)
    row0 = pid_m.to(tl.int64) * (BLOCK_M * ROW_STEPS)
    for step in range(ROW_STEPS):
        offs_m = row0 + step * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None] < M) & mask_n[None, :]
        g_ptrs = g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(acc_dtype)
        if ACTIVATION != "none":
            s_ptrs = s_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn
            s = tl.load(s_ptrs, mask=mask, other=0.0).to(acc_dtype)
            dz = activation_grad(g, s, slope, ACTIVATION)
        else:
            dz = g
        if STORE_DZ:
            dz_ptrs = dz_ptr + offs_m[:, None] * stride_dzm + offs_n[None, :] * stride_dzn
            tl.store(dz_ptrs, cast_out(dz, dz_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DB:
            # Padding rows/columns contribute exactly 0.
            col += tl.sum(tl.where(mask, dz, 0.0), axis=0)
    if COMPUTE_DB:
        tl.store(part_ptr + pid_m.to(tl.int64) * N + offs_n, col, mask=mask_n)


@triton.jit
def bias_grad_kernel(
    part_ptr, db_ptr,
    R, N,
    stride_db,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, ACC_FP64: tl.constexpr,
):  # fmt: skip
    """db[n] = sum_r part[r, n], summed in a fixed order (deterministic)."""
    pid_n = tl.program_id(0)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float64 if ACC_FP64 else tl.float32)
    # Walk the partials BLOCK_R rows at a time, then reduce the block once at the end.
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = (offs_r[:, None] < R) & mask_n[None, :]
        acc += tl.load(part_ptr + offs_r[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    db = tl.sum(acc, axis=0)
    tl.store(db_ptr + offs_n * stride_db, cast_out(db, db_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _row_block(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's row-block index in the grouped tile order of ``_matmul.tile_offsets``."""
    pid = tl.program_id(0)
    num_pid_in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(tl.cdiv(M, BLOCK_M) - first_pid_m, GROUP_M)
    return first_pid_m + ((pid % num_pid_in_group) % group_size_m)


@triton.jit
def chain_grad_kernel(
    a_ptr, b_ptr, s_ptr, dz_ptr, part_ptr,
    negative_slope: tl.float64,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_sm, stride_sn, stride_dzm, stride_dzn,
    ACTIVATION: tl.constexpr, COMPUTE_DB: tl.constexpr, ACC_FP64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``dZ_p = (A @ B) * act'(S)`` for one (BLOCK_M, BLOCK_N) tile, in GEMM names: A = dZ of
    the upper layer (M, K), B = its weight (K, N), S the lower layer's saved tensor (M, N);
    optionally the tile's column sums of dZ_p into ``part[row block, :]`` (fp32, fp64 for
    fp64). ``A @ B`` (the lower layer's dY) is rounded to dZ_p's dtype before act' is applied,
    where the unfused path stores it."""
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = gemm_mainloop(
        a_ptr, b_ptr, offs_m, offs_n, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
        BLOCK_M, BLOCK_N, BLOCK_K, ACC_FP64, INPUT_PRECISION,
    )  # fmt: skip
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_ty = dz_ptr.dtype.element_ty
    g = cast_out(acc, out_ty).to(acc.dtype)  # dY of the lower layer, as the unfused path has it
    if ACTIVATION != "none":
        s_ptrs = s_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn
        s = tl.load(s_ptrs, mask=mask, other=0.0).to(acc.dtype)
        dz = activation_grad(g, s, slope_as(negative_slope, acc.dtype), ACTIVATION)
    else:
        dz = g
    dz_ptrs = dz_ptr + offs_m[:, None] * stride_dzm + offs_n[None, :] * stride_dzn
    tl.store(dz_ptrs, cast_out(dz, out_ty), mask=mask)
    if COMPUTE_DB:
        row_block = _row_block(M, N, BLOCK_M, BLOCK_N, GROUP_M).to(tl.int64)
        col = tl.sum(tl.where(mask, dz, 0.0), axis=0)  # padding contributes exactly 0
        tl.store(part_ptr + row_block * N + offs_n, col, mask=offs_n < N)


# ---------------------------------------------------------------------------------------------
# The choice between the Triton and cuBLAS candidates
# ---------------------------------------------------------------------------------------------
IMPLS = ("triton", "cublas")
IMPL_ENV = "MANUALBP_LINEAR_IMPL"
#: cuBLAS replaces the fused Triton candidate only when at least this much faster (5 %): a
#: margin that keeps near-ties from flipping between runs.
CUBLAS_MARGIN = 0.05
_forced: str | None = None


class force:  # noqa: N801 (used like a function, as torch.set_grad_enabled)
    """Run every Linear GEMM with ``impl`` (``"triton"`` or ``"cublas"``) instead of choosing;
    ``"auto"`` chooses (overriding ``MANUALBP_LINEAR_IMPL``), ``None`` defers to that variable.
    Process-wide (the backward of CUDA tensors runs on autograd's threads); as a ``with`` block,
    restored at its end::

        with manualbp.kernels.linear.force("cublas"):
            model(x).square().mean().backward()
    """

    def __init__(self, impl: str | None) -> None:
        global _forced
        if impl is not None and (not isinstance(impl, str) or impl.lower() not in (*IMPLS, "auto")):
            raise ValueError(f"force: unknown Linear implementation {impl!r}; expected one of "
                             "'auto', 'triton', 'cublas' or None")  # fmt: skip
        self.previous, _forced = _forced, None if impl is None else impl.lower()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        global _forced
        _forced = self.previous


def mode() -> str:
    """``"auto"``, ``"triton"`` or ``"cublas"``: :func:`force`'s setting, else
    ``MANUALBP_LINEAR_IMPL``, else ``"auto"`` (``ValueError`` for an unknown value)."""
    if _forced is not None:
        return _forced
    value = os.environ.get(IMPL_ENV)
    if not value:
        return "auto"
    if value.lower() not in (*IMPLS, "auto"):
        raise ValueError(f"{IMPL_ENV}={value!r}: unknown Linear implementation; expected one of "
                         "auto, triton, cublas")  # fmt: skip
    return value.lower()


def _dtype_tag(dtype: torch.dtype) -> str:
    tag = str(dtype).removeprefix("torch.")
    return tag + "-" + torch.get_float32_matmul_precision() if dtype == torch.float32 else tag


def _bucket(M: int, N: int, K: int) -> str:
    return f"M={1 << max(M - 1, 0).bit_length()}|N={N}|K={K}"


def forward_key(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
                store_preact: bool) -> str:  # fmt: skip
    """The bucket of a forward call, e.g. ``fwd|bfloat16|gelu|bias|preact|x:r,w:r|M=8192|...``."""
    return "|".join(("fwd", _dtype_tag(x.dtype), constexpr(activation),
                     "bias" if bias is not None else "nobias",
                     "preact" if store_preact else "nopreact",
                     f"x:{major(x)},w:{major(weight)}",
                     _bucket(x.shape[0], weight.shape[0], x.shape[1])))  # fmt: skip


def gemm_key(op: str, a: Tensor, b: Tensor, activation: str | None = None) -> str:
    """The bucket of ``a @ b`` for backward GEMM ``op`` (``"dx"``, ``"dw"``, or ``"chain"`` with
    the lower layer's activation); M, N, K are the layer's (dW = dZ^T X: its M is the layer's
    N)."""
    m, k = a.shape
    n = b.shape[1]
    M, N, K = (k, m, n) if op == "dw" else (m, k, n)
    tag = _dtype_tag(a.dtype) + ("" if op != "chain" else "|" + constexpr(activation))
    return "|".join((op, tag, f"a:{major(a)},b:{major(b)}", _bucket(M, N, K)))


def _choose(M: int, N: int, K: int, key: Callable[[], str], device: torch.device,
            run_of: Callable[[str], Callable[[], object]]) -> str:  # fmt: skip
    """The candidate for an (M, N, K) GEMM: forced, else ``_tuning.choose`` (the key built only
    then); an empty or K == 0 shape times nothing."""
    chosen = mode()
    if chosen != "auto":
        return chosen
    if M == 0 or N == 0 or K == 0:
        return "triton"
    return _tuning.choose(key(), device, IMPLS, run_of, default="triton",
                          margins={"cublas": CUBLAS_MARGIN})  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
def _forward_triton(x, weight, bias, activation, slope, y, z) -> None:
    M, K = x.shape
    N = weight.shape[0]
    outputs = (y,) if z is None else (y, z)
    if K > 0 and tma_eligible((x, weight.t()), outputs, epilogue=activation is not None):
        launch_gemm(x, weight.t(), y, z, bias, activation, slope)
        return
    # With K == 0 the K loop runs zero times and the epilogue sees a zero accumulator.
    precision = input_precision_for(x.dtype, x.device)
    meta = dict(HAS_BIAS=bias is not None, ACTIVATION=constexpr(activation),
                STORE_PREACT=z is not None, ACC_FP64=x.dtype == torch.float64,
                INPUT_PRECISION=precision)  # fmt: skip
    zz = y if z is None else z  # dummy pointer, never written without STORE_PREACT
    args = (x, weight, y if bias is None else bias, y, zz, float(slope), M, N, K, *x.stride(),
            *weight.stride(), 0 if bias is None else bias.stride(0), *y.stride(),
            *zz.stride())  # fmt: skip

    def make(cfg: dict[str, Any]) -> tuple[tuple[int], tuple, dict[str, Any]]:
        return grid_of(M, N, cfg), args, {**meta, **cfg}

    cfgs = gemm_configs(x.device, x.dtype, precision, epilogue=True)
    flags = "".join(str(int(v)) for v in meta.values() if isinstance(v, bool))
    key = f"{x.dtype}|{precision}|{meta['ACTIVATION']}|{flags}|{size_bucket(M, N, K)}"
    tuned_launch(linear_forward_kernel, key, cfgs, make, x.device)


def _forward_cublas(x, weight, bias, activation, slope, y, z) -> None:
    """cuBLAS GEMM (the bias in it, except in fp64), then the elementwise pass if needed."""
    bias_in_gemm = bias is not None and x.dtype != torch.float64
    target_ = y if z is None else z  # the GEMM writes the pre-activation here
    if bias_in_gemm:
        torch.addmm(bias, x, weight.t(), out=target_)
    else:
        torch.mm(x, weight.t(), out=target_)
    pass_bias = None if bias_in_gemm else bias
    if target_ is y and activation is None and pass_bias is None:
        return  # y is the GEMM's output
    # Reads the GEMM output once; writes y (in place when target_ is y) and, when the bias is
    # added here, the finished z in place.
    epilogue(target_, pass_bias, activation, slope, out=y,
             preact_out=target_ if target_ is z and pass_bias is not None else None)  # fmt: skip


FORWARDS = {"triton": _forward_triton, "cublas": _forward_cublas}


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
            negative_slope: float = 0.01, *,
            store_preact: bool) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """``(y, z)``: ``y = act(x @ weight.T + bias)`` and, if ``store_preact``, the pre-activation
    ``z``, fresh (*, N) tensors, for ``x`` (*, K) of any strides, ``weight`` (N, K), ``bias``
    (N,) or ``None``, by the chosen candidate (module docstring). Inputs are assumed validated
    (one dtype and device). M == 0 or N == 0 launches nothing; K == 0 gives ``act(bias)``."""
    N, K = weight.shape
    shape = (*x.shape[:-1], N)
    y = x.new_empty(shape)
    z = x.new_empty(shape) if store_preact else None
    M = math.prod(shape[:-1])
    if M == 0 or N == 0:
        return y, z
    args = (x if x.dim() == 2 else x.reshape(M, K), weight, bias, activation,
            float(negative_slope), y.view(M, N), None if z is None else z.view(M, N))  # fmt: skip
    with on_device(x.device):
        key = functools.partial(forward_key, args[0], weight, bias, activation, store_preact)
        impl = _choose(M, N, K, key, x.device, lambda i: functools.partial(FORWARDS[i], *args))
        FORWARDS[impl](*args)
    return y, z


def epilogue(acc: Tensor, bias: Tensor | None, activation: str | None, negative_slope: float,
             *, out: Tensor, preact_out: Tensor | None = None) -> None:  # fmt: skip
    """``out = act(acc + bias)`` and, into ``preact_out`` if given, ``z = acc + bias``, for the
    (M, N) output ``acc`` of a GEMM run elsewhere (any strides; may be ``out`` or
    ``preact_out`` itself: each element is read, then written, by one thread). z is rounded to
    ``out``'s dtype before the activation; the bias is added in fp32 (fp64)."""
    M, N = acc.shape
    if M == 0 or N == 0:
        return
    z = out if preact_out is None else preact_out  # dummy pointer without STORE_PREACT
    cfg = _elementwise(EPILOGUE_CONFIGS, acc)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    launch(linear_epilogue_kernel, grid, acc, out if bias is None else bias, out, z,
           float(negative_slope), M, N, *acc.stride(), 0 if bias is None else bias.stride(0),
           *out.stride(), *z.stride(), HAS_BIAS=bias is not None,
           ACTIVATION=constexpr(activation), STORE_PREACT=preact_out is not None,
           ACC_FP64=out.dtype == torch.float64, **cfg)  # fmt: skip


def _elementwise(table: dict[str, dict[str, int]], like: Tensor) -> dict[str, int]:
    """The block shape of an elementwise kernel for ``like``'s device and dtype."""
    if target(like.device) is None:
        return table["interpreter"]
    return table["cuda_fp64" if like.dtype == torch.float64 else "cuda"]


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
def _reduce_bias(part: Tensor, rows: int, like: Tensor) -> Tensor:
    """db = the fixed-order sum of the first ``rows`` rows of the (>= rows, N) partials."""
    N = part.shape[1]
    cfg = _elementwise(ELEMENTWISE_CONFIGS, like)
    db = like.new_empty((N,))
    launch(bias_grad_kernel, (triton.cdiv(N, cfg["BLOCK_N"]),), part, db, rows, N, db.stride(0),
           BLOCK_R=cfg["BLOCK_R"], BLOCK_N=cfg["BLOCK_N"], ACC_FP64=like.dtype == torch.float64,
           num_warps=cfg["num_warps"])  # fmt: skip
    return db


def act_grad_and_bias(grad_y: Tensor, saved: Tensor | None, activation: str | None,
                      negative_slope: float, *, store_dz: bool,
                      compute_db: bool) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """``(dZ, db)`` of the elementwise pass (M, N > 0): dZ = dY * act'(saved) when
    ``store_dz``, its row sums db when ``compute_db`` (``None`` otherwise)."""
    M, N = grad_y.shape
    cfg = _elementwise(ELEMENTWISE_CONFIGS, grad_y)
    if activation == "sin" and cfg is ELEMENTWISE_CONFIGS["cuda"]:
        cfg = ELEMENTWISE_CONFIGS["cuda_sin"]
    grid_m = triton.cdiv(M, cfg["BLOCK_M"] * cfg["ROW_STEPS"])
    dz = grad_y.new_empty((M, N)) if store_dz else None
    part = grad_y.new_empty((grid_m, N), dtype=acc_dtype(grad_y.dtype)) if compute_db else None
    s = grad_y if saved is None else saved  # dummy pointers where unused
    d = grad_y if dz is None else dz
    # The block shape by name: cfg's BLOCK_R (bias_grad's) would be a keyword act_grad_kernel
    # lacks, a KeyError in Triton's launcher.
    launch(act_grad_kernel, (grid_m, triton.cdiv(N, cfg["BLOCK_N"])), grad_y, s, d,
           grad_y if part is None else part, float(negative_slope), M, N, *grad_y.stride(),
           *s.stride(), *d.stride(), ACTIVATION=constexpr(activation), STORE_DZ=store_dz,
           COMPUTE_DB=compute_db, ACC_FP64=grad_y.dtype == torch.float64,
           BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], ROW_STEPS=cfg["ROW_STEPS"],
           num_warps=cfg["num_warps"])  # fmt: skip
    return dz, _reduce_bias(part, grid_m, grad_y) if compute_db else None


#: op -> impl -> ``f(dz, operand, extra)``: dX = f(dZ, W, out), dW = f(dZ, X, splits) (dZ^T X:
#: (N, M) @ (M, K); cuBLAS ignores the splits).
GEMMS: dict[str, dict[str, Callable[..., Tensor]]] = {
    "dx": {"triton": lambda dz, w, out=None: matmul(dz, w, out=out),
           "cublas": lambda dz, w, out=None: torch.mm(dz, w, out=out)},
    "dw": {"triton": lambda dz, x, splits=None: splitk_matmul(dz.t(), x, splits=splits),
           "cublas": lambda dz, x, splits=None: torch.mm(dz.t(), x)},
}  # fmt: skip


def _gemm(op: str, dz: Tensor, operand: Tensor, extra: Any = None) -> Tensor:
    """dX (``op="dx"``, operand W; ``extra``: an output) or dW (``"dw"``, operand X;
    ``extra``: split-K slices) by the chosen candidate."""
    a, b = (dz, operand) if op == "dx" else (dz.t(), operand)
    key = functools.partial(gemm_key, op, a, b)
    run_of = lambda i: functools.partial(GEMMS[op][i], dz, operand, extra)
    impl = _choose(a.shape[0], b.shape[1], a.shape[1], key, dz.device, run_of)
    return GEMMS[op][impl](dz, operand, extra)


def backward(grad_y: Tensor, x: Tensor | None, weight: Tensor | None, saved: Tensor | None,
             activation: str | None, negative_slope: float, *,
             needs_grad: tuple[bool, bool, bool], dw_splits: int | None = None,
             ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """``(dx (M, K), dW (N, K), db (N,))`` of ``y = act(x W^T + b)``, fresh tensors of
    ``grad_y``'s dtype, ``None`` where ``needs_grad`` (dx, dW, db) says not needed:

        dZ = dY * act'(saved), db = sum_rows dZ      (the elementwise pass, always Triton)
        dX = dZ W,  dW = dZ^T X                      (Triton or cuBLAS, chosen per GEMM)

    ``grad_y`` (M, N) and ``x`` (M, K) any strides; ``saved``: what the activation's
    derivative reads (its output y, or its pre-activation z); ``dw_splits``: dW's split-K
    slices (``None``: :func:`._splitk.plan_splits`' heuristic; Triton candidate only).
    Deterministic. M == 0 gives empty dx and zero dW / db without a launch."""
    need_dx, need_dw, need_db = needs_grad
    M, N = grad_y.shape
    K = weight.shape[1] if need_dx else (x.shape[1] if need_dw else 0)
    if M == 0 or N == 0:  # nothing to launch: every output is empty or a sum over nothing
        zeros = functools.partial(torch.zeros, dtype=grad_y.dtype, device=grad_y.device)
        return (zeros(M, K) if need_dx else None, zeros(N, K) if need_dw else None,
                zeros(N) if need_db else None)  # fmt: skip
    with on_device(grad_y.device):
        dz, db = _act_grad(grad_y, saved, activation, negative_slope, need_dx or need_dw, need_db)
        dx = _gemm("dx", dz, weight) if need_dx else None
        dw = _gemm("dw", dz, x, dw_splits) if need_dw else None
    return dx, dw, db


def _act_grad(grad_y: Tensor, saved: Tensor | None, activation: str | None, slope: float,
              need_dz: bool, need_db: bool) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """``(dZ, db)`` of one layer (M, N > 0): dZ is dY itself without an activation."""
    dz, db = grad_y, None
    store_dz = activation is not None and need_dz
    if store_dz or need_db:
        dz_act, db = act_grad_and_bias(grad_y, saved, activation, slope, store_dz=store_dz,
                                       compute_db=need_db)  # fmt: skip
        dz = grad_y if dz_act is None else dz_act
    return dz, db


def _chain_triton(dz: Tensor, weight: Tensor, prev_saved: Tensor | None, prev_act: str | None,
                  prev_slope: float, compute_db: bool) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """``(dZ_p, db_p)`` by :func:`chain_grad_kernel`; dz (M, N), weight (N, K), all > 0. The
    bias partials are sized by the config each launch is given."""
    M, N = dz.shape
    K = weight.shape[1]
    precision = input_precision_for(dz.dtype, dz.device)
    gpu = target(dz.device)
    cfgs = (gemm_configs(dz.device, dz.dtype, precision) if gpu is None
            else chain_configs(gpu[0], dz.dtype, precision))  # fmt: skip
    out = dz.new_empty((M, K))
    s = out if prev_saved is None else prev_saved  # dummy without an activation
    meta = dict(ACTIVATION=constexpr(prev_act), COMPUTE_DB=compute_db,
                ACC_FP64=dz.dtype == torch.float64, INPUT_PRECISION=precision)  # fmt: skip
    parts: dict[int, Tensor] = {}

    def make(cfg: dict[str, Any]) -> tuple[tuple[int], tuple, dict[str, Any]]:
        rows = triton.cdiv(M, cfg["BLOCK_M"])
        if compute_db and rows not in parts:
            parts[rows] = dz.new_empty((rows, K), dtype=acc_dtype(dz.dtype))
        part = parts.get(rows, out)
        args = (dz, weight, s, out, part, float(prev_slope), M, K, N, *dz.stride(),
                *weight.stride(), *s.stride(), *out.stride())  # fmt: skip
        return grid_of(M, K, cfg), args, {**meta, **cfg}

    bucket = size_bucket(M, K, N)
    layout = operand_layout(dz, weight)
    key = f"{dz.dtype}|{precision}|{meta['ACTIVATION']}|{int(compute_db)}|{bucket}|{layout}"
    cfg = tuned_launch(chain_grad_kernel, key, cfgs, make, dz.device)
    rows = triton.cdiv(M, cfg["BLOCK_M"])  # the launch that counts: the config it was given
    return out, (_reduce_bias(parts[rows], rows, dz) if compute_db else None)


def _chain_cublas(dz: Tensor, weight: Tensor, prev_saved: Tensor | None, prev_act: str | None,
                  prev_slope: float, compute_db: bool) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """The same by ``torch.mm`` (dH, rounded to the dtype), then the elementwise pass."""
    return _act_grad(torch.mm(dz, weight), prev_saved, prev_act, prev_slope, True, compute_db)


CHAINS = {"triton": _chain_triton, "cublas": _chain_cublas}


def backward_chain(grad_y: Tensor, x: Tensor | None, weight: Tensor | None, saved: Tensor | None,
                   activation: str | None, negative_slope: float, prev_saved: Tensor | None,
                   prev_activation: str | None, prev_negative_slope: float, *,
                   needs_grad: tuple[bool, bool, bool, bool],
                   dw_splits: int | None = None) -> tuple[Tensor | None, ...]:  # fmt: skip
    """Backward of the upper layer of ``Linear -> act_p -> Linear (-> act)`` down to the lower
    layer's pre-activation gradient, with ``H = act_p(Z_p)`` the upper layer's input ``x``:

        dZ   = dY * act'(saved)              (elementwise pass; db = sum_rows dZ)
        dW   = dZ^T H                        (split-K GEMM or torch.mm)
        dZ_p = (dZ W) * act_p'(prev_saved)   (one GEMM with act_p' in its epilogue, or
        db_p = sum_rows dZ_p                  torch.mm + the elementwise pass: chosen)

    Arguments as :func:`backward` (``x`` (M, N_p) the lower layer's output H); ``prev_saved``
    what the lower activation's derivative reads, (M, N_p). ``needs_grad``: ``(dz_prev, dW,
    db, db_prev)``. Returns ``(dz_prev (M, N_p), dW (N, N_p), db (N,), db_prev (N_p,))``, fresh,
    ``None`` where not needed. The lower layer's own dW_p and dX are :func:`backward` of
    ``dZ_p`` without activation. Deterministic."""
    need_dzp, need_dw, need_db, need_dbp = needs_grad
    need_chain = need_dzp or need_dbp
    M, N = grad_y.shape
    K = weight.shape[1] if weight is not None else x.shape[1]
    zeros = functools.partial(torch.zeros, dtype=grad_y.dtype, device=grad_y.device)
    if M == 0:  # sums over no rows
        return (zeros(0, K) if need_dzp else None, zeros(N, K) if need_dw else None,
                zeros(N) if need_db else None, zeros(K) if need_dbp else None)  # fmt: skip
    dz, dw, db = grad_y, None, None
    with on_device(grad_y.device):
        if N > 0:
            dz, db = _act_grad(grad_y, saved, activation, negative_slope,
                               need_chain or need_dw, need_db)  # fmt: skip
            dw = _gemm("dw", dz, x, dw_splits) if need_dw else None
        else:
            dw, db = (zeros(0, K) if need_dw else None), (zeros(0) if need_db else None)
        dzp = dbp = None
        if need_chain:
            if K == 0:
                dzp, dbp = zeros(M, 0), zeros(0)
            elif N == 0:  # dH = dZ W is a sum over nothing: zeros, then act_p' as usual
                dzp, dbp = act_grad_and_bias(zeros(M, K), prev_saved, prev_activation,
                                             prev_negative_slope, store_dz=True,
                                             compute_db=need_dbp)  # fmt: skip
            else:
                args = (dz, weight, prev_saved, prev_activation, prev_negative_slope, need_dbp)
                key = functools.partial(gemm_key, "chain", dz, weight, prev_activation)
                run_of = lambda i: functools.partial(CHAINS[i], *args)
                impl = _choose(M, K, N, key, dz.device, run_of)
                dzp, dbp = CHAINS[impl](*args)
    return (dzp if need_dzp else None), dw, db, (dbp if need_dbp else None)


# ---------------------------------------------------------------------------------------------
# One row chunk of an output layer's backward (the fused Linear -> MSE head)
# ---------------------------------------------------------------------------------------------
def grad_accumulate(grad_y: Tensor, x: Tensor, weight: Tensor, dx_out: Tensor | None,
                    dw_acc: Tensor | None, db_acc: Tensor | None) -> None:  # fmt: skip
    """In place, for one row chunk of a Linear without activation: ``dx_out = dY W``, ``dw_acc
    += dY^T X`` and ``db_acc += sum_rows dY`` (``dw_acc`` / ``db_acc`` fp32, fp64 for fp64;
    each ``None`` where not needed). dW is summed by the GEMM into the accumulator itself
    (the Triton GEMM's ``accumulate``): no W-sized temporary per chunk."""
    M, N = grad_y.shape
    with on_device(grad_y.device):
        if dx_out is not None:
            _gemm("dx", grad_y, weight, dx_out)
        if dw_acc is not None and M > 0:
            matmul(grad_y.t(), x, out=dw_acc, accumulate=True)
        if db_acc is not None and M > 0 and N > 0:
            db_acc += act_grad_and_bias(grad_y, None, None, 0.0, store_dz=False,
                                        compute_db=True)[1]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Audit cases (triton_kernels/audit.py): calls of the launchers on small CPU tensors, recorded
# --------------------------------------------------------------------------------------------
AUDIT_BY_PRECISION = True  # recorded again for TF32 tl.dot
call = functools.partial


def audit_cases(dtype: torch.dtype, quick: bool) -> Iterator[tuple[str, Callable[[], object]]]:
    """The Linear layer: each call records both candidates (Triton's GEMM; cuBLAS, whose
    elementwise passes are Triton's), each tuned GEMM in every config; then the cuBLAS
    candidate's pass called directly: bias, stored z and each activation."""
    z = call(torch.zeros, dtype=dtype)
    acts = ("gelu",) if quick else ("gelu", "gelu_tanh")  # the heaviest epilogues
    x, w, b = z(256, 64), z(128, 64), z(128)  # TMA-readable
    # TMA refuses overlapping rows, and Triton specialises stride 0 as any multiple of 16: the
    # pointer kernels' fully aligned specialisation, for which sm_90 ships configs too.
    x_rows = z(1, 64).expand(256, 64)
    fwd = call(forward, negative_slope=0.01, store_preact=True)
    for act in acts:
        yield f"fwd {act}", call(fwd, x, w, b, act)
        yield f"fwd {act} x broadcast", call(fwd, x_rows, w, b, act)
    if not quick:
        yield "fwd", call(forward, x, w, b, None, store_preact=False)
    # 2048 rows: dW = dZ^T X splits its reduction in two (split-K).
    gy, h, w, s, s_prev = z(2048, 128), z(2048, 128), z(128, 128), z(2048, 128), z(2048, 128)
    for act in ("gelu",) if quick else NAMES:
        yield f"bwd {act}", call(backward, gy, h, w, s, act, 0.01, needs_grad=(True,) * 3)
    for act in acts:
        yield f"chain {act}", call(backward_chain, gy, h, w, s, "gelu", 0.01, s_prev, act,
                                   0.01, needs_grad=(True,) * 4)  # fmt: skip
    if not quick:
        yield "dX broadcast", call(matmul, z(1, 128).expand(2048, 128), w)
        yield "dW unsplit", call(backward, gy, h, w, None, None, 0.0,
                                 needs_grad=(False, True, False), dw_splits=1)  # fmt: skip
        acc = call(torch.zeros, dtype=acc_dtype(dtype))
        yield "accumulate", call(grad_accumulate, gy, h, w, z(2048, 128), acc(128, 128),
                                 acc(128))  # fmt: skip
    gemm_out, y, preact, bias = z(64, 256), z(64, 256), z(64, 256), z(256)
    for act in ("gelu",) if quick else (None, *NAMES):
        yield f"epilogue {act or 'none'}", call(epilogue, gemm_out, bias, act, 0.01, out=y,
                                                preact_out=preact)  # fmt: skip
