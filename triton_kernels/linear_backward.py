"""Linear backward: ``dZ = dY * act'(.)``, ``dX = dZ @ W``, ``dW = dZ^T @ X``, ``db = sum_rows dZ``.

Design (deterministic, no atomics):

1. :func:`act_grad_kernel`, one elementwise pass over (M, N): reads dY and the saved tensor
   (activation output or pre-activation), writes dZ once in the input dtype, and writes the
   fp32 (fp64) column sums of its row block into a ``(cdiv(M, BLOCK_M), N)`` partials buffer.
2. :func:`bias_grad_kernel` sums the partials over row blocks in a fixed order: db.
3. dX and dW are two calls of the strided GEMM of :mod:`triton_kernels._matmul` (dZ^T is a
   stride-swapped view, no copy). Without an activation dZ is dY itself and step 1 only
   computes the bias partials (or is skipped when db is not needed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._activations import NO_ACTIVATION, activation_grad, constexpr_name, slope_as
from ._matmul import cast_out, matmul
from ._runtime import interpreting

__all__ = ["linear_backward", "act_grad_kernel", "bias_grad_kernel", "ELEMENTWISE_CONFIGS"]

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


def elementwise_config(device: torch.device, dtype: torch.dtype) -> dict[str, int]:
    """The block shapes of the elementwise kernels for ``device`` / ``dtype``."""
    if interpreting() or device.type != "cuda":
        return ELEMENTWISE_CONFIGS["interpreter"]
    return ELEMENTWISE_CONFIGS["cuda_fp64" if dtype == torch.float64 else "cuda"]


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
    db = None
    if compute_db:
        db = torch.empty((N,), dtype=grad_y.dtype, device=grad_y.device)
        bias_grad_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
            part,
            db,
            grid_m,
            N,
            db.stride(0),
            BLOCK_R=cfg["BLOCK_R"],
            BLOCK_N=cfg["BLOCK_N"],
            ACC_FP64=acc_fp64,
            num_warps=cfg["num_warps"],
        )
    return dz, db


def linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    saved: torch.Tensor | None,
    activation: str | None,
    negative_slope: float,
    *,
    needs_grad: tuple[bool, bool, bool],
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

    need_gemm = need_dx or need_dw
    store_dz = act != NO_ACTIVATION and need_gemm
    dz, db = grad_y, None
    if store_dz or need_db:
        dz_act, db = _act_grad_and_bias(grad_y, saved, act, negative_slope, store_dz, need_db)
        if dz_act is not None:
            dz = dz_act
    dx = matmul(dz, weight) if need_dx else None  # (M, N) @ (N, K)
    dw = matmul(dz.t(), x) if need_dw else None  # (N, M) @ (M, K)
    return dx, dw, db
