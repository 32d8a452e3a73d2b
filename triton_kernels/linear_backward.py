"""Linear backward: ``dZ = dY * act'(.)``, ``dX = dZ @ W``, ``dW = dZ^T @ X``, ``db = sum_rows dZ``.

Design (deterministic, no atomics):

1. :func:`act_grad_kernel`, one elementwise pass over (M, N): reads dY and the saved tensor
   (activation output or pre-activation), writes dZ once in the input dtype, and writes the
   fp32 (fp64) column sums of its row block into a ``(cdiv(M, BLOCK_M), N)`` partials buffer.
2. :func:`bias_grad_kernel` sums the partials over row blocks in a fixed order: db.
3. dX and dW are two calls of the strided GEMM of :mod:`triton_kernels._matmul` (dZ^T is a
   stride-swapped view, no copy). Without an activation dZ is dY itself and step 1 only
   computes the bias partials (or is skipped when db is not needed). dW, whose output (N, K)
   may have few tiles while its reduction over M is long, goes through the deterministic
   split-K GEMM of :mod:`triton_kernels._splitk` (which falls back to the plain GEMM when
   the output has tiles enough).

Cross-layer fusion (:func:`linear_backward_chain`), for a stack ``Linear -> act_p -> Linear``:
the second layer's dX GEMM, ``dH = dZ W``, is the first layer's dY. :func:`chain_grad_kernel`
applies the first layer's activation gradient in that GEMM's epilogue, ``dZ_p = dH *
act_p'(saved_p)``, and writes per row block the column sums of ``dZ_p`` (its bias-gradient
partials, reduced by :func:`bias_grad_kernel`): ``dZ_p`` is written once and never re-read
for its activation gradient or its bias gradient; dH never exists in memory.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from ._activations import NO_ACTIVATION, activation_grad, constexpr_name, slope_as
from ._matmul import (
    INTERPRETER_CONFIG,
    cast_out,
    configs_for,
    dtype_class,
    gemm_mainloop,
    grid_for,
    input_precision_for,
    matmul,
    tile_offsets,
    to_triton_configs,
    tuning_key,
    use_fixed_config,
)
from ._runtime import interpreting
from ._splitk import splitk_matmul

__all__ = [
    "linear_backward",
    "linear_backward_chain",
    "act_grad_kernel",
    "bias_grad_kernel",
    "chain_grad_kernel",
    "ELEMENTWISE_CONFIGS",
    "CHAIN_EXCLUDED",
    "chain_configs",
]

# Fixed block shapes of the two elementwise kernels, as data (the audit compiles these).
# act_grad: each program walks ROW_STEPS blocks of BLOCK_M rows of one BLOCK_N column block,
# so the partials buffer has cdiv(M, BLOCK_M * ROW_STEPS) rows. bias_grad sums BLOCK_R rows of
# partials per step. fp64 math (libdevice erf, exp) is register-hungry: smaller tiles (the
# audit shows 16x128 with 4 warps spilling for fp64 GELU).
ELEMENTWISE_CONFIGS: dict[str, dict[str, int]] = {
    "cuda": dict(BLOCK_M=32, BLOCK_N=128, ROW_STEPS=8, BLOCK_R=32, num_warps=4),
    "cuda_fp64": dict(BLOCK_M=8, BLOCK_N=128, ROW_STEPS=32, BLOCK_R=16, num_warps=4),
    "interpreter": dict(BLOCK_M=8, BLOCK_N=32, ROW_STEPS=2, BLOCK_R=4, num_warps=4),
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


@triton.jit
def act_grad_kernel(
    g_ptr,
    s_ptr,
    dz_ptr,
    part_ptr,
    negative_slope: tl.float64,
    M,
    N,
    stride_gm,
    stride_gn,
    stride_sm,
    stride_sn,
    stride_dzm,
    stride_dzn,
    ACTIVATION: tl.constexpr,
    STORE_DZ: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_STEPS: tl.constexpr,
):
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
    part_ptr,
    db_ptr,
    R,
    N,
    stride_db,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
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
    a_ptr,
    b_ptr,
    s_ptr,
    dz_ptr,
    part_ptr,
    negative_slope: tl.float64,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_sm,
    stride_sn,
    stride_dzm,
    stride_dzn,
    ACTIVATION: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    ACC_FP64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``dZ_p = (A @ B) * act'(S)`` for one (BLOCK_M, BLOCK_N) tile, in GEMM names: A = dZ of
    the upper layer (M, K), B = its weight (K, N), S the lower layer's saved tensor (M, N);
    optionally the tile's column sums of dZ_p into ``part[row block, :]`` (fp32, fp64 for
    fp64). ``A @ B`` (the lower layer's dY) is rounded to dZ_p's dtype before act' is applied,
    where the unfused path stores it."""
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


def elementwise_config(device: torch.device, dtype: torch.dtype) -> dict[str, int]:
    """The block shapes of the elementwise kernels for ``device`` / ``dtype``."""
    if interpreting() or device.type != "cuda":
        return ELEMENTWISE_CONFIGS["interpreter"]
    return ELEMENTWISE_CONFIGS["cuda_fp64" if dtype == torch.float64 else "cuda"]


def _reduce_bias(part: torch.Tensor, rows: int, like: torch.Tensor) -> torch.Tensor:
    """db = the fixed-order sum of the first ``rows`` rows of the (>= rows, N) partials."""
    N = part.shape[1]
    cfg = elementwise_config(like.device, like.dtype)
    db = torch.empty((N,), dtype=like.dtype, device=like.device)
    bias_grad_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        part,
        db,
        rows,
        N,
        db.stride(0),
        BLOCK_R=cfg["BLOCK_R"],
        BLOCK_N=cfg["BLOCK_N"],
        ACC_FP64=like.dtype == torch.float64,
        num_warps=cfg["num_warps"],
    )
    return db


def _act_grad_and_bias(
    grad_y: torch.Tensor,
    saved: torch.Tensor | None,
    act: str,
    negative_slope: float,
    store_dz: bool,
    compute_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch the elementwise pass (and the bias reduction); M, N > 0."""
    M, N = grad_y.shape
    cfg = elementwise_config(grad_y.device, grad_y.dtype)
    acc_fp64 = grad_y.dtype == torch.float64
    acc_dtype = torch.float64 if acc_fp64 else torch.float32
    grid_m = triton.cdiv(M, cfg["BLOCK_M"] * cfg["ROW_STEPS"])
    dz = torch.empty((M, N), dtype=grad_y.dtype, device=grad_y.device) if store_dz else None
    part = torch.empty((grid_m, N), dtype=acc_dtype, device=grad_y.device) if compute_db else None
    s_arg = saved if saved is not None else grad_y  # dummy when ACTIVATION == 0
    dz_arg = dz if dz is not None else grad_y  # dummy, never written when STORE_DZ is False
    part_arg = part if part is not None else grad_y  # dummy, never written without COMPUTE_DB
    act_grad_kernel[(grid_m, triton.cdiv(N, cfg["BLOCK_N"]))](
        grad_y,
        s_arg,
        dz_arg,
        part_arg,
        float(negative_slope),
        M,
        N,
        grad_y.stride(0),
        grad_y.stride(1),
        s_arg.stride(0),
        s_arg.stride(1),
        dz_arg.stride(0),
        dz_arg.stride(1),
        ACTIVATION=act,
        STORE_DZ=store_dz,
        COMPUTE_DB=compute_db,
        ACC_FP64=acc_fp64,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        ROW_STEPS=cfg["ROW_STEPS"],
        num_warps=cfg["num_warps"],
    )
    db = _reduce_bias(part, grid_m, grad_y) if compute_db else None
    return dz, db


def _upper_grads(
    grad_y: torch.Tensor,
    x: torch.Tensor | None,
    saved: torch.Tensor | None,
    act: str,
    negative_slope: float,
    need_dz: bool,
    need_dw: bool,
    need_db: bool,
    dw_splits: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(dZ, dW, db)`` of one layer (M, N > 0): dZ is dY itself without an activation."""
    store_dz = act != NO_ACTIVATION and (need_dz or need_dw)
    dz, db = grad_y, None
    if store_dz or need_db:
        dz_act, db = _act_grad_and_bias(grad_y, saved, act, negative_slope, store_dz, need_db)
        if dz_act is not None:
            dz = dz_act
    dw = splitk_matmul(dz.t(), x, splits=dw_splits) if need_dw else None  # (N, M) @ (M, K)
    return dz, dw, db


def linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    saved: torch.Tensor | None,
    activation: str | None,
    negative_slope: float,
    *,
    needs_grad: tuple[bool, bool, bool],
    dw_splits: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``y = act(x @ weight.T + bias)``.

    Args:
        grad_y: dY, (M, N), any strides.
        x: (M, K), or ``None`` when dweight is not needed.
        weight: (N, K), or ``None`` when dx is not needed.
        saved: what the activation's registry entry saves (``Activation.saved_for``): the
            output y (relu, leaky_relu with slope >= 0, tanh, sigmoid) or the pre-activation z
            (gelu, gelu_tanh, silu, leaky_relu with slope < 0); ``None`` without activation.
        activation, negative_slope: as in :func:`~triton_kernels.linear_forward.linear_forward`.
        needs_grad: ``(dx, dweight, dbias)``.
        dw_splits: split-K of the dW GEMM over M: ``None`` for the heuristic of
            :func:`triton_kernels._splitk.plan_splits`, ``1`` for none, else the slices wanted.

    Returns:
        ``(dx (M, K), dweight (N, K), dbias (N,))`` as new contiguous tensors of
        ``grad_y.dtype``, ``None`` where not needed. Deterministic (no atomics). M == 0 gives
        empty dx and zero dweight/dbias without launching.
    """
    need_dx, need_dw, need_db = needs_grad
    M, N = grad_y.shape
    if need_dx:
        K = weight.shape[1]
    elif need_dw:
        K = x.shape[1]
    else:
        K = 0
    dev, dt = grad_y.device, grad_y.dtype
    act = constexpr_name(activation)

    if M == 0 or N == 0:
        # Nothing to launch: every output is empty or a sum over nothing.
        dx = torch.zeros((M, K), dtype=dt, device=dev) if need_dx else None
        dw = torch.zeros((N, K), dtype=dt, device=dev) if need_dw else None
        db = torch.zeros((N,), dtype=dt, device=dev) if need_db else None
        return dx, dw, db

    dz, dw, db = _upper_grads(
        grad_y, x, saved, act, negative_slope, need_dx, need_dw, need_db, dw_splits
    )
    dx = matmul(dz, weight) if need_dx else None  # (M, N) @ (N, K)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# Cross-layer fusion: the upper layer's dX GEMM with the lower layer's activation gradient
# ---------------------------------------------------------------------------------------------
@functools.cache
def _tuned_chain(
    arch: int, dtype: torch.dtype, precision: str, bucket: tuple[int, ...], layout: str
) -> Any:
    # One autotuner per (size bucket, operand layout), as for the plain GEMM, over
    # chain_configs (an activation next to the accumulator). Every dZ_p element and
    # every partial row of the chosen BLOCK_M is written once per launch: no reset needed.
    return triton.autotune(
        configs=to_triton_configs(chain_configs(arch, dtype, precision)),
        key=["ACC_FP64", "INPUT_PRECISION", "ACTIVATION", "COMPUTE_DB"],
    )(chain_grad_kernel)


def _chain_gemm(
    dz: torch.Tensor,
    weight: torch.Tensor,
    prev_saved: torch.Tensor | None,
    prev_act: str,
    prev_slope: float,
    compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dZ_p, db_p)``: ``dZ_p = (dz @ weight) * act_p'(prev_saved)`` and its column sums;
    dz (M, N), weight (N, K), M, N, K > 0."""
    M, N = dz.shape
    K = weight.shape[1]
    dev, dt = dz.device, dz.dtype
    precision = input_precision_for(dt)
    fixed = use_fixed_config(dev)
    key = None if fixed else tuning_key(dz, weight)
    cfgs = [INTERPRETER_CONFIG] if fixed else chain_configs(key[0], dt, precision)
    out = torch.empty((M, K), dtype=dt, device=dev)
    part = None
    if compute_db:  # rows for the smallest BLOCK_M the tuner may pick
        rows = triton.cdiv(M, min(c["BLOCK_M"] for c in cfgs))
        acc = torch.float64 if dt == torch.float64 else torch.float32
        part = torch.empty((rows, K), dtype=acc, device=dev)
    s_arg = out if prev_saved is None else prev_saved  # dummy without an activation
    args = (
        dz, weight, s_arg, out, out if part is None else part, float(prev_slope), M, K, N,
        dz.stride(0), dz.stride(1), weight.stride(0), weight.stride(1),
        s_arg.stride(0), s_arg.stride(1), out.stride(0), out.stride(1),
    )  # fmt: skip
    consts = dict(
        ACTIVATION=prev_act,
        COMPUTE_DB=compute_db,
        ACC_FP64=dt == torch.float64,
        INPUT_PRECISION=precision,
    )
    if fixed:
        chain_grad_kernel[grid_for(M, K)](*args, **consts, **INTERPRETER_CONFIG)
        block_m = INTERPRETER_CONFIG["BLOCK_M"]
    else:
        tuned = _tuned_chain(*key)
        tuned[grid_for(M, K)](*args, **consts)
        block_m = tuned.best_config.kwargs["BLOCK_M"]  # the config of the launch that counts
    db = _reduce_bias(part, triton.cdiv(M, block_m), dz) if compute_db else None
    return out, db


def linear_backward_chain(
    grad_y: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    saved: torch.Tensor | None,
    activation: str | None,
    negative_slope: float,
    prev_saved: torch.Tensor | None,
    prev_activation: str | None,
    prev_negative_slope: float,
    *,
    needs_grad: tuple[bool, bool, bool, bool],
    dw_splits: int | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Backward of the upper layer of ``Linear -> act_p -> Linear (-> act)`` down to the lower
    layer's pre-activation gradient, with ``H = act_p(Z_p)`` the upper layer's input ``x``:

        dZ   = dY * act'(saved)               (act_grad_kernel; db = sum_rows dZ)
        dW   = dZ^T H                         (split-K GEMM)
        dZ_p = (dZ W) * act_p'(prev_saved)    (one GEMM, act_p' in its epilogue;
        db_p = sum_rows dZ_p                   row-block partials, then bias_grad_kernel)

    ``dZ W`` is the lower layer's dY (its ``dH``): it is never written. The lower layer's
    ``dW_p = dZ_p^T X`` and ``dX = dZ_p W_p`` are :func:`linear_backward` of ``dZ_p`` without
    activation.

    Args:
        grad_y, x, weight, saved, activation, negative_slope: the upper layer's, as in
            :func:`linear_backward` (``x`` (M, N_p) is the lower layer's output H).
        prev_saved: what the lower layer's activation saves (its output H or its
            pre-activation Z_p, ``Activation.saved_for``), (M, N_p); ``None`` without one.
        prev_activation, prev_negative_slope: the lower layer's activation.
        needs_grad: ``(dz_prev, dweight, dbias, dbias_prev)``.

    Returns:
        ``(dz_prev (M, N_p), dweight (N, N_p), dbias (N,), dbias_prev (N_p,))``, new contiguous
        tensors of ``grad_y.dtype``, ``None`` where not needed. Deterministic (no atomics).
    """
    need_dzp, need_dw, need_db, need_dbp = needs_grad
    need_chain = need_dzp or need_dbp
    M, N = grad_y.shape
    K = weight.shape[1] if weight is not None else x.shape[1]
    dev, dt = grad_y.device, grad_y.dtype

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=dt, device=dev)

    if M == 0:  # sums over no rows
        return (zeros(0, K) if need_dzp else None, zeros(N, K) if need_dw else None,
                zeros(N) if need_db else None, zeros(K) if need_dbp else None)  # fmt: skip
    dz, dw, db = grad_y, None, None
    if N > 0:
        act = constexpr_name(activation)
        dz, dw, db = _upper_grads(
            grad_y, x, saved, act, negative_slope, need_chain, need_dw, need_db, dw_splits
        )
    else:
        dw, db = (zeros(0, K) if need_dw else None), (zeros(0) if need_db else None)
    dzp = dbp = None
    if need_chain:
        prev = constexpr_name(prev_activation)
        if K == 0:
            dzp, dbp = zeros(M, 0), zeros(0)
        elif N == 0:  # dH = dZ W is a sum over nothing: zeros, then act_p' as usual
            dzp, dbp = _act_grad_and_bias(
                zeros(M, K), prev_saved, prev, prev_negative_slope, True, need_dbp
            )
        else:
            dzp, dbp = _chain_gemm(dz, weight, prev_saved, prev, prev_negative_slope, need_dbp)
    return (dzp if need_dzp else None), dw, db, (dbp if need_dbp else None)
