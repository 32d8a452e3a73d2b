"""Mean-squared-error kernels: fused forward (+ gradient), elementwise backward, in-place scale.

Launchers take tensors and return tensors; nothing here records autograd.

Layout handling. ``input`` and ``target`` arrive with the same shape but arbitrary strides (the
caller broadcasts with ``expand`` views, so stride-0 dimensions are common). Instead of
materialising them, the launchers *coalesce* the shared shape: size-1 dimensions are dropped and
adjacent dimensions ``i, i+1`` are merged when ``stride[i] == stride[i+1] * size[i+1]`` holds for
every operand. What is left (at most :data:`MAX_DIMS` dimensions) is indexed in-kernel by
decomposing the row-major linear index into per-dimension indices and dotting them with each
operand's strides, in int64. Only when more than :data:`MAX_DIMS` non-mergeable dimensions remain
(rare: e.g. a 5-d permuted view) do the launchers fall back to ``.contiguous()`` copies.

Reductions are deterministic: every program of the first pass sums its block (a tree reduction
in fp32, or fp64 for fp64 inputs) into one partial; then fixed-shape passes of
:func:`_sum_kernel` sum blocks of partials until one value is left, which is divided by ``N``
for ``"mean"`` and cast to the input dtype. No atomics; the order depends only on ``N`` and the
block sizes, and the whole sum is a tree, so large ``N`` loses no precision.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["mse_forward", "mse_backward", "scale_", "MAX_DIMS"]

#: Most dimensions (after coalescing) that the kernels index with strides.
MAX_DIMS = 4

_REDUCTIONS = ("none", "mean", "sum")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Fixed launch configurations (BLOCK, num_warps). The interpreter gets small blocks so that tests
# on small tensors still cover several programs and several reduction passes; tests may patch these.
_CUDA_FWD = (4096, 8)
# Views that stay 3- or 4-d after merging dims carry per-element index math (div/mod by each
# size, four strides per operand): at 4096 x 8 warps that spilled (the audit shows it).
_CUDA_FWD_STRIDED = (1024, 4)
_INTERP_FWD_STRIDED = (64, 1)
_CUDA_ELEMWISE = (2048, 8)
_CUDA_SUM = (1024, 4)
_INTERP_FWD = (64, 1)
_INTERP_ELEMWISE = (64, 1)
_INTERP_SUM = (16, 1)


def _cfg(kind: str) -> tuple[int, int]:
    prefix = "_INTERP_" if _interpreting() else "_CUDA_"
    return globals()[prefix + kind]


def fwd_config(ndim: int, *, cuda: bool | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) of the forward kernel for a layout of ``ndim`` merged dims; the
    CUDA or the interpreter's (``cuda=None``: whichever this process runs)."""
    kind = "FWD_STRIDED" if ndim >= 3 else "FWD"
    if cuda is None:
        return _cfg(kind)
    return globals()[("_CUDA_" if cuda else "_INTERP_") + kind]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _strided_offsets(idx, S1, S2, S3, st0, st1, st2, st3, NDIM: tl.constexpr):
    """Element offsets (int64) of the row-major linear indices ``idx`` in a view of shape
    ``(S0, S1, S2, S3)`` (the last ``NDIM`` of them used) with strides ``st0..st3``."""
    if NDIM == 1:
        off = idx * st3
    else:
        i3 = idx % S3
        r = idx // S3
        off = i3 * st3
        if NDIM == 2:
            off += r * st2
        else:
            i2 = r % S2
            r = r // S2
            off += i2 * st2
            if NDIM == 3:
                off += r * st1
            else:
                i1 = r % S1
                r = r // S1
                off += i1 * st1 + r * st0
    return off


@triton.jit
def _load_block(
    x_ptr, t_ptr, N, S1, S2, S3, xs0, xs1, xs2, xs3, ts0, ts1, ts2, ts3,
    NDIM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """This program's block of linear indices, its mask, and ``x``, ``t`` there (in ACC)."""
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    x_off = _strided_offsets(idx, S1, S2, S3, xs0, xs1, xs2, xs3, NDIM)
    t_off = _strided_offsets(idx, S1, S2, S3, ts0, ts1, ts2, ts3, NDIM)
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)
    t = tl.load(t_ptr + t_off, mask=mask, other=0.0).to(ACC)
    return idx, mask, x, t


@triton.jit(do_not_specialize=["N"])
def _mse_fwd_kernel(
    x_ptr, t_ptr, out_ptr, grad_ptr, part_ptr, N,
    S1, S2, S3,
    xs0, xs1, xs2, xs3,
    ts0, ts1, ts2, ts3,
    NDIM: tl.constexpr, REDUCE: tl.constexpr, MEAN: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One block of ``(x - t)**2``: stored elementwise (``REDUCE=False``) or summed into
    ``part_ptr[pid]``, with the gradient ``2 (x - t) [/ N]`` written contiguously alongside."""
    idx, mask, x, t = _load_block(
        x_ptr, t_ptr, N, S1, S2, S3, xs0, xs1, xs2, xs3, ts0, ts1, ts2, ts3, NDIM, ACC, BLOCK
    )
    d = x - t
    sq = d * d
    if REDUCE:
        tl.store(part_ptr + tl.program_id(0), tl.sum(sq, axis=0))
        if COMPUTE_GRAD:
            scale = 2.0 / N.to(ACC) if MEAN else 2.0
            g = d * scale
            tl.store(grad_ptr + idx, g.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + idx, sq.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n", "N"])
def _sum_kernel(in_ptr, out_ptr, n, N, FINAL_MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """``out[pid] = sum(in[pid*BLOCK : (pid+1)*BLOCK])`` (a fixed tree), divided by ``N`` when
    ``FINAL_MEAN``, cast to ``out``'s dtype."""
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(in_ptr + idx, mask=idx < n, other=0.0)
    s = tl.sum(v, axis=0)
    if FINAL_MEAN:
        s = s / N.to(s.dtype)
    tl.store(out_ptr + pid, s.to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["N"])
def _mse_bwd_kernel(
    go_ptr, x_ptr, t_ptr, out_ptr, N,
    S1, S2, S3,
    gs0, gs1, gs2, gs3,
    xs0, xs1, xs2, xs3,
    ts0, ts1, ts2, ts3,
    NDIM: tl.constexpr, GO_SCALAR: tl.constexpr, MEAN: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``out = (2 [/ N]) * (x - t) * go``, ``out`` contiguous, ``go`` a scalar or strided."""
    idx, mask, x, t = _load_block(
        x_ptr, t_ptr, N, S1, S2, S3, xs0, xs1, xs2, xs3, ts0, ts1, ts2, ts3, NDIM, ACC, BLOCK
    )
    if GO_SCALAR:
        go = tl.load(go_ptr).to(ACC)
    else:
        g_off = _strided_offsets(idx, S1, S2, S3, gs0, gs1, gs2, gs3, NDIM)
        go = tl.load(go_ptr + g_off, mask=mask, other=0.0).to(ACC)
    scale = 2.0 / N.to(ACC) if MEAN else 2.0
    g = (scale * (x - t)) * go
    tl.store(out_ptr + idx, g.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N"])
def _scale_kernel(
    g_ptr, go_ptr, N, S1, S2, S3, gs0, gs1, gs2, gs3,
    NDIM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``g *= go`` in place, ``go`` a 0-dim tensor read on the device."""
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    off = _strided_offsets(idx, S1, S2, S3, gs0, gs1, gs2, gs3, NDIM)
    go = tl.load(go_ptr).to(ACC)
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(ACC)
    tl.store(g_ptr + off, (g * go).to(g_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host-side helpers
# --------------------------------------------------------------------------------------------


def _coalesce(
    shape: tuple[int, ...], strides: list[tuple[int, ...]]
) -> tuple[list[int], list[list[int]]]:
    """Drop size-1 dims and merge adjacent dims that are mergeable for *every* stride tuple.

    Returns ``(sizes, per-operand strides)``, with at least one dimension.
    """
    sizes: list[int] = []
    out: list[list[int]] = [[] for _ in strides]
    for d, size in enumerate(shape):
        if size == 1:
            continue
        if sizes and all(st[-1] == s[d] * size for st, s in zip(out, strides, strict=True)):
            sizes[-1] *= size
            for st, s in zip(out, strides, strict=True):
                st[-1] = s[d]
            continue
        sizes.append(size)
        for st, s in zip(out, strides, strict=True):
            st.append(s[d])
    if not sizes:
        return [1], [[0] for _ in strides]
    return sizes, out


def _layout(*tensors: Tensor) -> tuple[list[Tensor], int, list[int], list[list[int]]]:
    """Coalesced, right-aligned 4-d layout shared by ``tensors`` (all of the same shape).

    Returns ``(tensors, ndim, sizes[4], strides[k][4])``; the tensors are the inputs, or
    contiguous copies of them when more than :data:`MAX_DIMS` dims would remain (documented
    fallback).
    """
    shape = tuple(tensors[0].shape)
    sizes, strides = _coalesce(shape, [tuple(t.stride()) for t in tensors])
    if len(sizes) > MAX_DIMS:
        tensors = tuple(t.contiguous() for t in tensors)
        sizes, strides = _coalesce(shape, [tuple(t.stride()) for t in tensors])
    ndim = len(sizes)
    pad = MAX_DIMS - ndim
    sizes4 = [1] * pad + sizes
    strides4 = [[0] * pad + st for st in strides]
    return list(tensors), ndim, sizes4, strides4


def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_pair(input: Tensor, target: Tensor, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction!r} is not a valid value for reduction")
    if input.shape != target.shape:
        raise ValueError(
            f"mse kernels need input and target of the same shape (expand them first), got "
            f"{tuple(input.shape)} and {tuple(target.shape)}"
        )
    if input.dtype != target.dtype or input.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"mse kernels need input and target of one floating dtype among fp16/bf16/fp32/fp64, "
            f"got {input.dtype} and {target.dtype}"
        )
    if input.device != target.device:
        raise ValueError(f"input on {input.device} but target on {target.device}")


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for the launch when it is a CUDA device (no-op otherwise)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _reduce_partials(partials: Tensor, out: Tensor, n_total: int, mean: bool) -> None:
    """Sum ``partials`` into the 0-dim ``out`` by fixed-shape passes of :func:`_sum_kernel`."""
    block, warps = _cfg("SUM")
    while True:
        n = partials.numel()
        if n <= block:
            _sum_kernel[(1,)](partials, out, n, n_total, FINAL_MEAN=mean, BLOCK=block,
                              num_warps=warps)  # fmt: skip
            return
        nxt = torch.empty(triton.cdiv(n, block), dtype=partials.dtype, device=partials.device)
        _sum_kernel[(nxt.numel(),)](partials, nxt, n, n_total, FINAL_MEAN=False, BLOCK=block,
                                    num_warps=warps)  # fmt: skip
        partials = nxt


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def mse_forward(
    input: Tensor, target: Tensor, reduction: str, *, compute_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """MSE loss of ``input`` against ``target`` and, optionally, its gradient, in one pass.

    ``input`` and ``target`` have the same shape (any strides, stride 0 included) and the same
    floating dtype; each is read once. Returns ``(loss, grad)``:

    * ``loss``: for ``"mean"``/``"sum"`` a 0-dim tensor in the input dtype, accumulated in fp32
      (fp64 for fp64) by the deterministic two-stage reduction described in the module docstring;
      for ``"none"`` the contiguous elementwise ``(input - target)**2``.
    * ``grad``: only when ``compute_grad`` and ``reduction != "none"`` (else ``None``):
      ``d loss / d input`` for an upstream gradient of 1, i.e. ``2 (input - target) / N`` for
      ``"mean"`` and ``2 (input - target)`` for ``"sum"``, a new contiguous tensor of the input's
      shape and dtype, written by the same kernel.

    With ``N == 0`` elements: ``"mean"`` gives nan (as ``F.mse_loss``), ``"sum"`` gives 0,
    ``"none"`` an empty tensor.
    """
    _check_pair(input, target, reduction)
    reduce = reduction != "none"
    want_grad = compute_grad and reduce
    n = input.numel()
    dtype, device = input.dtype, input.device
    grad = torch.empty(input.shape, dtype=dtype, device=device) if want_grad else None
    if not reduce:
        out = torch.empty(input.shape, dtype=dtype, device=device)
    else:
        out = torch.empty((), dtype=dtype, device=device)
    if n == 0:
        if reduce:
            out.fill_(float("nan") if reduction == "mean" else 0.0)
        return out, grad

    (x, t), ndim, sizes, (xs, ts) = _layout(input, target)
    block, warps = fwd_config(ndim)
    grid = triton.cdiv(n, block)
    acc = _acc_torch_dtype(dtype)
    partials = torch.empty(grid if reduce else 1, dtype=acc, device=device)
    with _on_device(device):
        _mse_fwd_kernel[(grid,)](
            x, t, out, grad if grad is not None else out, partials, n,
            sizes[1], sizes[2], sizes[3], *xs, *ts,
            NDIM=ndim, REDUCE=reduce, MEAN=reduction == "mean", COMPUTE_GRAD=want_grad,
            ACC=_acc_dtype(dtype), BLOCK=block, num_warps=warps,
        )  # fmt: skip
        if reduce:
            _reduce_partials(partials, out, n, reduction == "mean")
    return out, grad


def mse_backward(grad_output: Tensor, input: Tensor, target: Tensor, reduction: str) -> Tensor:
    """Elementwise MSE backward: ``grad_output * 2 (input - target)`` (``/ N`` for ``"mean"``).

    ``grad_output`` is a 0-dim tensor (``"mean"``/``"sum"``; read on the device) or has
    ``input``'s shape with any strides (``"none"``). Returns a new contiguous tensor of
    ``input``'s shape and dtype.
    """
    _check_pair(input, target, reduction)
    scalar = reduction != "none"
    if scalar and grad_output.numel() != 1:
        raise ValueError(
            f"mse_backward with reduction={reduction!r} needs a 1-element grad_output, got shape "
            f"{tuple(grad_output.shape)}"
        )
    if not scalar and grad_output.shape != input.shape:
        raise ValueError(
            f"mse_backward with reduction='none' needs grad_output of shape "
            f"{tuple(input.shape)}, got {tuple(grad_output.shape)}"
        )
    if grad_output.device != input.device:
        raise ValueError(f"grad_output on {grad_output.device} but input on {input.device}")
    n = input.numel()
    out = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    if n == 0:
        return out
    if scalar:
        (x, t), ndim, sizes, (xs, ts) = _layout(input, target)
        go, gs = grad_output, [0, 0, 0, 0]
    else:
        (go, x, t), ndim, sizes, (gs, xs, ts) = _layout(grad_output, input, target)
    block, warps = _cfg("ELEMWISE")
    with _on_device(input.device):
        _mse_bwd_kernel[(triton.cdiv(n, block),)](
            go, x, t, out, n, sizes[1], sizes[2], sizes[3], *gs, *xs, *ts,
            NDIM=ndim, GO_SCALAR=scalar, MEAN=reduction == "mean",
            ACC=_acc_dtype(input.dtype), BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return out


def scale_(grad: Tensor, grad_output: Tensor) -> Tensor:
    """``grad *= grad_output`` in place, ``grad_output`` a 1-element tensor read on the device
    (no host sync). ``grad`` may have any strides but must not overlap itself. Returns ``grad``.
    """
    if grad_output.numel() != 1:
        raise ValueError(f"scale_ needs a 1-element grad_output, got {tuple(grad_output.shape)}")
    if grad.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"scale_ needs a floating grad, got {grad.dtype}")
    if grad_output.device != grad.device:
        raise ValueError(f"grad_output on {grad_output.device} but grad on {grad.device}")
    n = grad.numel()
    if n == 0:
        return grad
    sizes, (strides,) = _coalesce(tuple(grad.shape), [tuple(grad.stride())])
    if any(st == 0 for size, st in zip(sizes, strides, strict=True) if size > 1):
        raise ValueError("scale_ cannot write in place into a tensor with stride-0 dimensions")
    if len(sizes) > MAX_DIMS:
        # Rare: too many non-mergeable dims. Scale a contiguous copy and write it back.
        tmp = grad.contiguous()
        scale_(tmp, grad_output)
        return grad.copy_(tmp)
    ndim = len(sizes)
    sizes = [1] * (MAX_DIMS - ndim) + sizes
    strides = [0] * (MAX_DIMS - ndim) + strides
    block, warps = _cfg("ELEMWISE")
    with _on_device(grad.device):
        _scale_kernel[(triton.cdiv(n, block),)](
            grad, grad_output, n, sizes[1], sizes[2], sizes[3], *strides,
            NDIM=ndim, ACC=_acc_dtype(grad.dtype), BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return grad
