"""Fused Linear forward: ``Y = act(X @ W^T + b)`` in one kernel.

One program computes one (BLOCK_M, BLOCK_N) tile of Y: the K loop accumulates ``X @ W^T`` in
fp32 (fp64 for fp64 inputs), then the epilogue adds the bias to the accumulator, rounds Z to
the output dtype (as native Linear does before its activation), stores Z only when the backward
pass needs it, and applies the activation in fp32 (fp64). Tiles are
visited in grouped order for L2 reuse; block shapes are autotuned from the per-architecture
config lists in :mod:`triton_kernels._matmul`.

On sm_90+ (fp16/bf16, or fp32 under TF32) with TMA-readable operands and row-major outputs,
:func:`linear_forward` runs the same epilogue on the persistent TMA kernel of
:mod:`triton_kernels._matmul_hopper` instead; this pointer kernel stays for sm_80, fp64, IEEE
fp32, misaligned views and the CPU interpreter.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from ._activations import apply_activation, constexpr_name, slope_as
from ._matmul import (
    INTERPRETER_CONFIG,
    arch_of,
    cast_out,
    configs_for,
    gemm_mainloop,
    grid_for,
    input_precision_for,
    size_bucket,
    tile_offsets,
    to_triton_configs,
    use_fixed_config,
)
from ._matmul_hopper import linear_forward_tma, tma_eligible

__all__ = ["linear_forward", "linear_forward_kernel"]


@triton.jit
def linear_forward_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    z_ptr,
    negative_slope: tl.float64,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_b,
    stride_ym,
    stride_yn,
    stride_zm,
    stride_zn,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    ACC_FP64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of ``act(X @ W^T + b)``; W (N, K) is read as B = W^T."""
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # B[k, n] = W[n, k]: B's (k, n) strides are W's (k, n) strides.
    acc = gemm_mainloop(
        x_ptr,
        w_ptr,
        offs_m,
        offs_n,
        M,
        N,
        K,
        stride_xm,
        stride_xk,
        stride_wk,
        stride_wn,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        ACC_FP64,
        INPUT_PRECISION,
    )
    # Epilogue on the accumulator: bias, optional pre-activation store, activation.
    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0)
        acc += bias.to(acc.dtype)[None, :]
    mask = (offs_m[:, None] < M) & mask_n[None, :]
    # Round the pre-activation to the output dtype first, as native Linear + activation does
    # (a no-op for fp32/fp64): y matches native rounding and is consistent with the stored z
    # that the backward pass differentiates at.
    z = cast_out(acc, y_ptr.dtype.element_ty)
    if STORE_PREACT:
        z_ptrs = z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn
        tl.store(z_ptrs, z, mask=mask)
    y = apply_activation(z.to(acc.dtype), slope_as(negative_slope, acc.dtype), ACTIVATION)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, cast_out(y, y_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _tuned_forward(
    arch: int, dtype: torch.dtype, input_precision: str, bucket: tuple[int, ...]
) -> Any:
    # One autotuner per power-of-two size bucket (see _matmul.size_bucket), so a new token
    # count re-tunes only when it crosses a power of two.
    # Y and Z are fully overwritten by each launch: no reset_to_zero needed when autotuning.
    return triton.autotune(
        configs=to_triton_configs(configs_for(arch, dtype, input_precision, epilogue=True)),
        key=[
            "HAS_BIAS",
            "ACTIVATION",
            "STORE_PREACT",
            "ACC_FP64",
            "INPUT_PRECISION",
        ],
    )(linear_forward_kernel)


def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    negative_slope: float = 0.01,
    *,
    store_preact: bool,
    out: torch.Tensor | None = None,
    preact_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused ``y = act(x @ weight.T + bias)``.

    Args:
        x: (M, K), any strides / storage offset.
        weight: (N, K) in ``nn.Linear`` layout, any strides.
        bias: (N,) or ``None``.
        activation: ``None``, ``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ``"tanh"``,
            ``"sigmoid"`` or ``"leaky_relu"``.
        negative_slope: leaky_relu slope (ignored otherwise).
        store_preact: also return the pre-activation ``z = x @ weight.T + bias``.
        out, preact_out: (M, N) tensors of ``x.dtype`` to write y and z into (any strides),
            instead of new ones.

    Returns:
        ``(y, z)``: new contiguous (M, N) tensors of ``x.dtype``; ``z`` is ``None`` unless
        ``store_preact``. Inputs are assumed validated (same dtype and device, 2-D shapes).
        M == 0 or N == 0 launches nothing; K == 0 gives ``act(bias)`` (or ``act(0)``).
    """
    M, K = x.shape
    N = weight.shape[0]
    y = out if out is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    z = None
    if store_preact:
        z = preact_out if preact_out is not None else torch.empty_like(y)
    if M == 0 or N == 0:
        return y, z
    outputs = (y,) if z is None else (y, z)
    if K > 0 and tma_eligible((x, weight), outputs, epilogue=activation is not None):
        linear_forward_tma(x, weight, bias, activation, negative_slope, y, z)
        return y, z
    # With K == 0 the K loop runs zero times and the epilogue sees a zero accumulator.
    has_bias = bias is not None
    b_arg = bias if has_bias else y  # dummy pointer, never read when HAS_BIAS is False
    z_arg = z if store_preact else y  # dummy pointer, never written when STORE_PREACT is False
    args = (
        x,
        weight,
        b_arg,
        y,
        z_arg,
        float(negative_slope),
        M,
        N,
        K,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        bias.stride(0) if has_bias else 0,
        y.stride(0),
        y.stride(1),
        z_arg.stride(0),
        z_arg.stride(1),
    )
    meta = dict(
        HAS_BIAS=has_bias,
        ACTIVATION=constexpr_name(activation),
        STORE_PREACT=store_preact,
        ACC_FP64=x.dtype == torch.float64,
        INPUT_PRECISION=input_precision_for(x.dtype),
    )
    if use_fixed_config(x.device):
        linear_forward_kernel[grid_for(M, N)](*args, **meta, **INTERPRETER_CONFIG)
    else:
        bucket = size_bucket(M, N, K)
        tuned = _tuned_forward(arch_of(x.device), x.dtype, meta["INPUT_PRECISION"], bucket)
        tuned[grid_for(M, N)](*args, **meta)
    return y, z
