"""Linear's epilogue as a pass of its own: ``z = acc + b``, ``y = act(z)`` after a GEMM run
elsewhere (cuBLAS: ``torch.mm`` / ``torch.addmm``).

One elementwise kernel over the (M, N) GEMM output ``acc``: each program reads one
(BLOCK_M, BLOCK_N) tile of it once, adds the bias (broadcast along the rows) in fp32 (fp64 for
fp64), rounds the pre-activation ``z`` to the output dtype (as native Linear does before its
activation, and as the fused epilogue of :mod:`.linear_forward` does), stores ``z`` only when
asked, and stores ``y = act(z)`` computed in fp32 (fp64). Outputs may alias ``acc`` (each
element is read, then written, by the same thread), so the pass can run in place on the GEMM's
output. This is the forward half of the "cuBLAS + Triton elementwise" Linear candidate of
``manualbp.backends.linear_choice``; the backward half is :func:`.linear_backward.act_grad_kernel`
and :func:`.linear_backward.bias_grad_kernel`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._activations import apply_activation, constexpr_name, slope_as
from ._matmul import cast_out
from ._runtime import interpreting

__all__ = ["EPILOGUE_CONFIGS", "epilogue_config", "linear_epilogue", "linear_epilogue_kernel"]

# Block shapes, as data (the audit compiles the CUDA ones): 8 x 256 elements per program with
# 4 warps, 16 per thread, loaded in 128-bit vectors along a contiguous row. fp64 math
# (libdevice erf, exp) needs twice the registers per element: half the tile.
EPILOGUE_CONFIGS: dict[str, dict[str, int]] = {
    "cuda": dict(BLOCK_M=8, BLOCK_N=256, num_warps=4),
    "cuda_fp64": dict(BLOCK_M=4, BLOCK_N=256, num_warps=4),
    "interpreter": dict(BLOCK_M=16, BLOCK_N=64, num_warps=4),
}


@triton.jit
def linear_epilogue_kernel(
    acc_ptr,
    b_ptr,
    y_ptr,
    z_ptr,
    negative_slope: tl.float64,
    M,
    N,
    stride_am,
    stride_an,
    stride_b,
    stride_ym,
    stride_yn,
    stride_zm,
    stride_zn,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile: ``z = round(acc + b)``, ``y = round(act(z))``."""
    # int64 offsets: (M, N) tensors may exceed 2**31 elements.
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_m[:, None] < M) & mask_n[None, :]
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    a_ptrs = acc_ptr + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an
    v = tl.load(a_ptrs, mask=mask, other=0.0).to(acc_dtype)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0)
        v += bias.to(acc_dtype)[None, :]
    # Round the pre-activation to the output dtype first, as native Linear + activation does.
    z = cast_out(v, y_ptr.dtype.element_ty)
    if STORE_PREACT:
        z_ptrs = z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn
        tl.store(z_ptrs, z, mask=mask)
    y = apply_activation(z.to(acc_dtype), slope_as(negative_slope, acc_dtype), ACTIVATION)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, cast_out(y, y_ptr.dtype.element_ty), mask=mask)


def epilogue_config(device: torch.device, dtype: torch.dtype) -> dict[str, int]:
    """The block shape for ``device`` / ``dtype`` (:data:`EPILOGUE_CONFIGS`)."""
    if interpreting() or device.type != "cuda":
        return EPILOGUE_CONFIGS["interpreter"]
    return EPILOGUE_CONFIGS["cuda_fp64" if dtype == torch.float64 else "cuda"]


def linear_epilogue(
    acc: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    negative_slope: float = 0.01,
    *,
    out: torch.Tensor | None = None,
    preact_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y = act(acc + bias)`` and, into ``preact_out`` if given, ``z = acc + bias``.

    Args:
        acc: (M, N) GEMM output ``x @ weight.T``, any strides; may be ``out`` or
            ``preact_out`` itself (the pass then runs in place).
        bias: (N,) or ``None``.
        activation, negative_slope: as in :func:`.linear_forward.linear_forward`.
        out: (M, N) tensor to write y into (any strides); a new one of ``acc.dtype`` if
            ``None``.
        preact_out: (M, N) tensor of ``out``'s dtype to write z into, or ``None``.

    Returns:
        ``(y, z)``, ``z`` being ``preact_out``. z is rounded to ``out``'s dtype before the
        activation; the bias is added in fp32 (fp64) to ``acc`` as loaded. Inputs are assumed
        validated (one device; 2-D shapes). M == 0 or N == 0 launches nothing.
    """
    M, N = acc.shape
    y = out if out is not None else torch.empty((M, N), dtype=acc.dtype, device=acc.device)
    if M == 0 or N == 0:
        return y, preact_out
    has_bias, store = bias is not None, preact_out is not None
    b_arg = bias if has_bias else y  # dummy pointer, never read when HAS_BIAS is False
    z_arg = preact_out if store else y  # dummy pointer, never written without STORE_PREACT
    cfg = epilogue_config(y.device, y.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    linear_epilogue_kernel[grid](
        acc, b_arg, y, z_arg, float(negative_slope), M, N,
        acc.stride(0), acc.stride(1), bias.stride(0) if has_bias else 0,
        y.stride(0), y.stride(1), z_arg.stride(0), z_arg.stride(1),
        HAS_BIAS=has_bias, ACTIVATION=constexpr_name(activation), STORE_PREACT=store,
        ACC_FP64=y.dtype == torch.float64, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return y, preact_out
