"""Mean-squared-error kernels: fused forward (loss + gradient), elementwise backward, scaling.

Launchers take tensors and return tensors; nothing here records autograd.

Memory traffic. The kernels are bandwidth bound. On the common, contiguous layout (below) the
blocks wholly inside the ``N`` elements load and store unmasked, at offsets Triton knows to be
contiguous and block aligned, so with 16-byte aligned pointers (Triton specialises pointers on
that) every access is a 128-bit ``ld/st.global.v4`` (``v2.b64`` for fp64); only the last,
partial block is masked. An unaligned view (say at storage offset 1) compiles to scalar accesses
and stays correct. The fused forward reads ``input`` and ``target`` once and writes the gradient
once: 12 bytes per fp32 element, plus at most ``PARTIALS`` partial sums per launch.

Layout handling. ``input`` and ``target`` share a shape but not strides (the caller broadcasts
with ``expand`` views: stride 0 is common). Instead of materialising them, the launchers
*coalesce* the shape: size-1 dims are dropped and adjacent dims ``i, i+1`` merged where
``stride[i] == stride[i+1] * size[i+1]`` for every operand. One unit-stride dim left for every
operand is the *contiguous* layout (the vector path). Otherwise up to :data:`MAX_DIMS` dims are
indexed in-kernel (the linear index decomposed per dim and dotted with each operand's strides,
in int64, every access masked); more (rare: a 5-d permuted view) fall back to ``.contiguous()``.

Persistent grids. The forward and the in-place scale run a small fixed grid of ``P`` programs,
program ``p`` taking units ``p, p + P, ...``: a few per SM for the forward (its config's
``PROGRAMS_PER_SM``), at most one per SM for the scale. ``P`` depends only on the work and the
SM count (:func:`programs`; the interpreter stands in for :data:`INTERPRETER_SMS` SMs).

Reductions are deterministic, take one launch, and do not depend on ``P``. The ``cdiv(N, BLOCK)``
blocks are cut into at most ``PARTIALS`` *segments* of consecutive blocks, by ``N`` and the
config only. A program sums each of its segments in a fixed order (per lane of a ``BLOCK``-wide
fp32 accumulator, fp64 for fp64, block after block, then a fixed tree over the lanes) into
``partials[segment]``, then takes a ticket from an int32 counter (``atomic_add``, acq_rel; it
only orders programs, no float is added atomically). The program drawing the last ticket sums
the partials with one masked load and a fixed tree, divides by ``N`` for ``"mean"``, stores the
loss and resets the counter to 0: runs and grids of any size give bitwise equal losses. The
counter is one int32 per (device, stream), left at 0 by every launch; under CUDA-graph capture
each call takes a fresh zeroed one (a memset node), so graphs never share one with eager work.

The scale by the upstream gradient (:func:`mse_grad_scale_`) reads that gradient on the device:
autograd hands it over as a device tensor, so the host could only learn its value with a sync,
and under CUDA-graph capture it may change between replays. Every program loads it first and
returns at once when it is exactly 1 (one scalar load per program, nothing written).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._host import (
    FLOAT_DTYPES,
    acc_dtype,
    gpu_code,
    interpreting,
    launch,
    on_device,
    stream_key,
    strided_4d,
    target,
    unaligned,
)  # fmt: skip
from ._runtime import load, store, tl_acc_dtype

__all__ = ["CONFIGS", "INTERPRETER_SMS", "MAX_DIMS", "ForwardPlan", "forward_plan", "launch_config",
           "mse_backward", "mse_forward", "mse_grad_scale_", "programs",
           "scale_programs"]  # fmt: skip

#: Most dimensions (after coalescing) that the kernels index with strides.
MAX_DIMS = 4

#: The SM count the CPU interpreter stands in for: the persistent grids get a few programs
#: with unequal shares of the work.
INTERPRETER_SMS = 3

_REDUCTIONS = ("none", "mean", "sum")

# Fixed launch configurations, as data (the audit compiles the "cuda" ones).
# * "fwd": the forward kernel for contiguous layouts (one merged dim): 2048 elements a block,
#   4 programs per SM (4096 with 2 spilled in fp16/bf16 under Triton 3.6 on sm_80: the same
#   bytes in flight per SM); "fwd_fp64" the same bytes for fp64 (2048 with 2 spilled on sm_80
#   under Triton 3.6),
#   "fwd_strided" for 2 to 4 merged dims (the per-element div/mod index math: 4096 x 8 warps
#   took 168-200 registers for 2 dims and spilled for 4). PARTIALS: the most segments (and
#   partial sums) a reduction is cut into, and the lanes of the last program's single load
#   over them. PROGRAMS_PER_SM: the persistent grid's programs per SM, all resident at once:
#   PROGRAMS_PER_SM * num_warps * 32 threads * registers <= 64K (the audit's register counts:
#   at most 64 for "fwd", 128 for the others, on sm_80 and sm_90).
# * "elementwise": the recomputing backward (one block per program).
# * "scale": the in-place scale of the forward's gradient, at most one program per SM: a wide
#   block keeps 32 KB of fp32 loads in flight per SM. fp64 ("scale_fp64"): 8 warps, whose
#   255-register cap fits the 4-d strided index math (16 warps cap a thread at 128 and spill).
# The interpreter gets small blocks so that small test tensors still cover several programs,
# multi-block segments, full and partial blocks; tests may patch these.
CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    "cuda": {
        "fwd": dict(BLOCK=2048, PARTIALS=2048, PROGRAMS_PER_SM=4, num_warps=8),
        "fwd_fp64": dict(BLOCK=1024, PARTIALS=2048, PROGRAMS_PER_SM=4, num_warps=8),
        "fwd_strided": dict(BLOCK=1024, PARTIALS=2048, PROGRAMS_PER_SM=4, num_warps=4),
        "elementwise": dict(BLOCK=2048, num_warps=8),
        "scale": dict(BLOCK=8192, num_warps=16),
        "scale_fp64": dict(BLOCK=4096, num_warps=8),
    },
    "interpreter": {
        "fwd": dict(BLOCK=64, PARTIALS=8, PROGRAMS_PER_SM=1, num_warps=1),
        "fwd_fp64": dict(BLOCK=64, PARTIALS=8, PROGRAMS_PER_SM=1, num_warps=1),
        "fwd_strided": dict(BLOCK=64, PARTIALS=8, PROGRAMS_PER_SM=1, num_warps=1),
        "elementwise": dict(BLOCK=64, num_warps=1),
        "scale": dict(BLOCK=64, num_warps=1),
        "scale_fp64": dict(BLOCK=64, num_warps=1),
    },
}


def launch_config(
    kind: str, ndim: int = 1, *, cuda: bool | None = None, dtype: torch.dtype | None = None
) -> dict[str, int]:
    """The launch config of ``kind`` (``"fwd"``, ``"elementwise"`` or ``"scale"``) for a layout
    of ``ndim`` merged dims of ``dtype``: the CUDA one or the interpreter's (``cuda=None``:
    whichever this process runs). ``"fwd"`` resolves to ``"fwd_strided"`` for 2 or more dims,
    else to ``"fwd_fp64"`` for fp64; ``"scale"`` to ``"scale_fp64"`` for fp64."""
    if kind == "fwd" and ndim >= 2:
        kind = "fwd_strided"
    elif kind in ("fwd", "scale") and dtype == torch.float64:
        kind += "_fp64"
    if cuda is None:
        cuda = not interpreting()
    return CONFIGS["cuda" if cuda else "interpreter"][kind]


def programs(units: int, per_sm: int, device: torch.device) -> int:
    """The persistent grid for ``units`` of work on ``device``: ``per_sm`` programs per SM of
    the GPU the launch compiles for (:data:`INTERPRETER_SMS` under the interpreter), never more
    than there are units, at least 1."""
    facts = target(device)
    sms = facts[1] if facts is not None else INTERPRETER_SMS
    return max(1, min(units, per_sm * sms))


def scale_programs(n: int, device: torch.device, dtype: torch.dtype | None = None) -> int:
    """The grid of :func:`mse_grad_scale_` on ``n`` elements: at most one program per SM."""
    block = launch_config("scale", cuda=gpu_code(device), dtype=dtype)["BLOCK"]
    return programs(triton.cdiv(n, block), 1, device)


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
def _block_indices(block, BLOCK: tl.constexpr):
    """Block ``block``'s first linear index (int64) and its ``BLOCK`` contiguous indices."""
    start = tl.cast(block, tl.int64) * BLOCK
    idx = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
    return start, idx


@triton.jit
def _fwd_block(
    x_ptr, t_ptr, out_ptr, grad_ptr, idx, x_off, t_off, N,
    MASKED: tl.constexpr, REDUCE: tl.constexpr, MEAN: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """One block of ``(x - t)**2``: stored at ``out[idx]`` (``REDUCE=False``) or returned for
    the caller to sum (0 where masked), with the gradient ``2 (x - t) [/ N]`` stored at
    ``grad[idx]``."""
    mask = idx < N
    x = load(x_ptr, x_off, mask, ACC, MASKED)
    t = load(t_ptr, t_off, mask, ACC, MASKED)
    d = x - t
    squares = d * d
    if REDUCE:
        if COMPUTE_GRAD:
            scale = 2.0 / N.to(ACC) if MEAN else 2.0
            store(grad_ptr, idx, d * scale, mask, MASKED)
    else:
        store(out_ptr, idx, squares, mask, MASKED)
    return squares


@triton.jit
def _fwd_full_block(
    x_ptr, t_ptr, out_ptr, grad_ptr, block, N, S1, S2, S3, xs0, xs1, xs2, xs3, ts0, ts1, ts2, ts3,
    NDIM: tl.constexpr, CONTIG: tl.constexpr, REDUCE: tl.constexpr, MEAN: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """:func:`_fwd_block` on block ``block``: unmasked on the contiguous path (where the caller
    passes full blocks only), masked and strided otherwise."""
    _, idx = _block_indices(block, BLOCK)
    if CONTIG:
        squares = _fwd_block(x_ptr, t_ptr, out_ptr, grad_ptr, idx, idx, idx, N,
                             False, REDUCE, MEAN, COMPUTE_GRAD, ACC)  # fmt: skip
    else:
        x_off = _strided_offsets(idx, S1, S2, S3, xs0, xs1, xs2, xs3, NDIM)
        t_off = _strided_offsets(idx, S1, S2, S3, ts0, ts1, ts2, ts3, NDIM)
        squares = _fwd_block(x_ptr, t_ptr, out_ptr, grad_ptr, idx, x_off, t_off, N,
                             True, REDUCE, MEAN, COMPUTE_GRAD, ACC)  # fmt: skip
    return squares


@triton.jit
def _fwd_last_block(
    x_ptr, t_ptr, out_ptr, grad_ptr, block, N, REDUCE: tl.constexpr, MEAN: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The contiguous path's masked last block ``block``; returns its sum. In chunks of a
    quarter block: per-element masks of a whole block (16 per thread and operand) made ptxas
    spill for fp16."""
    start = tl.cast(block, tl.int64) * BLOCK
    total = tl.zeros((), ACC)
    for s in range(0, BLOCK, BLOCK // 4):
        sub = start + s + tl.arange(0, BLOCK // 4)
        squares = _fwd_block(x_ptr, t_ptr, out_ptr, grad_ptr, sub, sub, sub, N,
                             True, REDUCE, MEAN, COMPUTE_GRAD, ACC)  # fmt: skip
        total += tl.sum(squares, axis=0)
    return total


@triton.jit
def _sum_partials(part_ptr, count_ptr, out_ptr, N, n_segments, MEAN: tl.constexpr,
                  ACC: tl.constexpr, PARTIALS: tl.constexpr):  # fmt: skip
    """Take a ticket once this program's partials are stored; the program drawing the last
    ticket sums all ``n_segments`` partials with one fixed tree into ``out`` (``/ N`` when
    ``MEAN``) and resets the counter."""
    tl.debug_barrier()  # the partials' stores precede the (release) ticket in this CTA
    ticket = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) - 1:
        i = tl.arange(0, PARTIALS)
        # .cg: read at L2, where the other programs' partials are, never a stale L1 line.
        partials = tl.load(part_ptr + i, mask=i < n_segments, other=0.0, cache_modifier=".cg")
        total = tl.sum(partials, axis=0)
        if MEAN:
            total = total / N.to(ACC)
        tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))
        tl.store(count_ptr, 0)


@triton.jit(do_not_specialize=["N", "segment_blocks", "n_segments"])
def _mse_fwd_kernel(
    x_ptr, t_ptr, out_ptr, grad_ptr, part_ptr, count_ptr, N, segment_blocks, n_segments,
    S1, S2, S3,
    xs0, xs1, xs2, xs3,
    ts0, ts1, ts2, ts3,
    NDIM: tl.constexpr, CONTIG: tl.constexpr, REDUCE: tl.constexpr, MEAN: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, PARTIALS: tl.constexpr,
):  # fmt: skip
    """``(x - t)**2``: summed over segments ``pid, pid + P, ...`` (``segment_blocks`` blocks
    each) into ``partials``, with the gradient ``2 (x - t) [/ N]`` written contiguously
    alongside, the last program to finish writing the loss (see the module docstring); or,
    with ``REDUCE=False``, stored elementwise over blocks ``pid, pid + P, ...``."""
    pid, n_programs = tl.program_id(0), tl.num_programs(0)
    # The contiguous path's loops take the full blocks; the masked last block (if any) is
    # handled after them, by the last segment's program (or the last program).
    loop_blocks = N // BLOCK if CONTIG else tl.cdiv(N, BLOCK)
    has_last_block = CONTIG and loop_blocks * BLOCK < N
    if REDUCE:
        for segment in range(pid, n_segments, n_programs):
            first = segment * segment_blocks
            acc = tl.zeros((BLOCK,), ACC)  # per lane, block after block
            for block in range(first, tl.minimum(first + segment_blocks, loop_blocks)):
                acc += _fwd_full_block(x_ptr, t_ptr, out_ptr, grad_ptr, block, N, S1, S2, S3,
                                       xs0, xs1, xs2, xs3, ts0, ts1, ts2, ts3, NDIM, CONTIG,
                                       REDUCE, MEAN, COMPUTE_GRAD, ACC, BLOCK)  # fmt: skip
            partial = tl.sum(acc, axis=0)
            if has_last_block and segment == n_segments - 1:
                partial += _fwd_last_block(x_ptr, t_ptr, out_ptr, grad_ptr, loop_blocks, N,
                                           REDUCE, MEAN, COMPUTE_GRAD, ACC, BLOCK)  # fmt: skip
            tl.store(part_ptr + segment, partial)
        _sum_partials(part_ptr, count_ptr, out_ptr, N, n_segments, MEAN, ACC, PARTIALS)
    else:
        for block in range(pid, loop_blocks, n_programs):
            _fwd_full_block(x_ptr, t_ptr, out_ptr, grad_ptr, block, N, S1, S2, S3,
                            xs0, xs1, xs2, xs3, ts0, ts1, ts2, ts3, NDIM, CONTIG, REDUCE,
                            MEAN, COMPUTE_GRAD, ACC, BLOCK)  # fmt: skip
        if has_last_block and pid == n_programs - 1:
            _fwd_last_block(x_ptr, t_ptr, out_ptr, grad_ptr, loop_blocks, N, REDUCE,
                            MEAN, COMPUTE_GRAD, ACC, BLOCK)  # fmt: skip


@triton.jit
def _bwd_block(go_ptr, x_ptr, t_ptr, out_ptr, idx, g_off, x_off, t_off, N, go_scalar,
               MASKED: tl.constexpr, GO_SCALAR: tl.constexpr, MEAN: tl.constexpr,
               ACC: tl.constexpr):  # fmt: skip
    mask = idx < N
    x = load(x_ptr, x_off, mask, ACC, MASKED)
    t = load(t_ptr, t_off, mask, ACC, MASKED)
    go = go_scalar if GO_SCALAR else load(go_ptr, g_off, mask, ACC, MASKED)
    scale = 2.0 / N.to(ACC) if MEAN else 2.0
    store(out_ptr, idx, (scale * (x - t)) * go, mask, MASKED)


@triton.jit(do_not_specialize=["N"])
def _mse_bwd_kernel(
    go_ptr, x_ptr, t_ptr, out_ptr, N,
    S1, S2, S3,
    gs0, gs1, gs2, gs3,
    xs0, xs1, xs2, xs3,
    ts0, ts1, ts2, ts3,
    NDIM: tl.constexpr, CONTIG: tl.constexpr, GO_SCALAR: tl.constexpr, MEAN: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``out = (2 [/ N]) * (x - t) * go``, ``out`` contiguous, ``go`` a scalar or strided."""
    start, idx = _block_indices(tl.program_id(0), BLOCK)
    go_scalar = tl.load(go_ptr).to(ACC) if GO_SCALAR else tl.zeros((), ACC)
    if CONTIG:
        if start + BLOCK <= N:
            _bwd_block(go_ptr, x_ptr, t_ptr, out_ptr, idx, idx, idx, idx, N, go_scalar,
                       False, GO_SCALAR, MEAN, ACC)  # fmt: skip
        else:
            _bwd_block(go_ptr, x_ptr, t_ptr, out_ptr, idx, idx, idx, idx, N, go_scalar,
                       True, GO_SCALAR, MEAN, ACC)  # fmt: skip
    else:
        x_off = _strided_offsets(idx, S1, S2, S3, xs0, xs1, xs2, xs3, NDIM)
        t_off = _strided_offsets(idx, S1, S2, S3, ts0, ts1, ts2, ts3, NDIM)
        # (grad_output's offsets: unused when it is a scalar)
        g_off = idx if GO_SCALAR else _strided_offsets(idx, S1, S2, S3, gs0, gs1, gs2, gs3, NDIM)
        _bwd_block(go_ptr, x_ptr, t_ptr, out_ptr, idx, g_off, x_off, t_off, N, go_scalar,
                   True, GO_SCALAR, MEAN, ACC)  # fmt: skip


@triton.jit(do_not_specialize=["N"])
def _grad_scale_kernel(
    g_ptr, go_ptr, N, S1, S2, S3, gs0, gs1, gs2, gs3,
    NDIM: tl.constexpr, CONTIG: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``g *= go`` in place over blocks ``pid, pid + P, ...``, ``go`` a 1-element tensor read on
    the device; every program returns right after reading ``go`` when it is exactly 1."""
    go = tl.load(go_ptr).to(ACC)
    if go != 1.0:
        for block in range(tl.program_id(0), tl.cdiv(N, BLOCK), tl.num_programs(0)):
            start, idx = _block_indices(block, BLOCK)
            mask = idx < N
            if CONTIG:
                if start + BLOCK <= N:
                    g = load(g_ptr, idx, mask, ACC, False)
                    store(g_ptr, idx, g * go, mask, False)
                else:
                    g = load(g_ptr, idx, mask, ACC, True)
                    store(g_ptr, idx, g * go, mask, True)
            else:
                off = _strided_offsets(idx, S1, S2, S3, gs0, gs1, gs2, gs3, NDIM)
                g = load(g_ptr, off, mask, ACC, True)
                store(g_ptr, off, g * go, mask, True)


# --------------------------------------------------------------------------------------------
# Host-side helpers
# --------------------------------------------------------------------------------------------
def _coalesce(
    shape: tuple[int, ...], strides: list[tuple[int, ...]]
) -> tuple[list[int], list[list[int]]]:
    """``(sizes, per-operand strides)`` with size-1 dims dropped and adjacent dims merged where
    mergeable for *every* stride tuple; at least one dimension (a single element is the 1-d
    unit-stride layout ``[1]``, ``[1]``)."""
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
        return [1], [[1] for _ in strides]
    return sizes, out


def _layout(*tensors: Tensor) -> tuple[list[Tensor], int, bool, list[int], list[list[int]]]:
    """``(tensors, *_padded(...))``: the coalesced layout shared by ``tensors`` (all of one
    shape), which are the inputs, or contiguous copies of them when more than :data:`MAX_DIMS`
    dims would remain (documented fallback)."""
    shape = tuple(tensors[0].shape)
    sizes, strides = _coalesce(shape, [tuple(t.stride()) for t in tensors])
    if len(sizes) > MAX_DIMS:
        tensors = tuple(t.contiguous() for t in tensors)
        sizes, strides = _coalesce(shape, [tuple(t.stride()) for t in tensors])
    return (list(tensors), *_padded(sizes, strides))


def _padded(sizes: list[int], strides: list[list[int]]) -> tuple[int, bool, list, list]:
    """``(ndim, contiguous, sizes[4], strides[k][4])`` of a coalesced layout, right-aligned in
    4-d; ``contiguous``: one merged dim with unit stride for every operand."""
    ndim, pad = len(sizes), MAX_DIMS - len(sizes)
    contiguous = ndim == 1 and all(st[0] == 1 for st in strides)
    return ndim, contiguous, [1] * pad + sizes, [[0] * pad + st for st in strides]


def _check_pair(input: Tensor, target: Tensor, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction!r} is not a valid value for reduction")
    if input.shape != target.shape:
        raise ValueError(
            f"mse kernels need input and target of the same shape (expand them first), got "
            f"{tuple(input.shape)} and {tuple(target.shape)}"
        )
    if input.dtype != target.dtype or input.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"mse kernels need input and target of one floating dtype among fp16/bf16/fp32/fp64, "
            f"got {input.dtype} and {target.dtype}"
        )
    if input.device != target.device:
        raise ValueError(f"input on {input.device} but target on {target.device}")


class ForwardPlan(NamedTuple):
    """How :func:`mse_forward` cuts its ``n`` elements: blocks of ``block`` elements; for a
    reduction, ``segments`` segments of ``segment_blocks`` blocks (the last ones may be short),
    one partial each; ``programs`` programs (the grid); ``config`` the launch config."""

    config: dict[str, int]
    block: int
    segment_blocks: int
    segments: int
    programs: int


def forward_plan(
    n: int, ndim: int, dtype: torch.dtype, device: torch.device, *, reduce: bool = True
) -> ForwardPlan:
    """The forward's cut of ``n >= 1`` elements of ``dtype`` in a layout of ``ndim`` merged dims
    on ``device``: the segments depend only on ``n`` and the config, the grid also on the
    device's SMs. Without ``reduce`` the programs stride over single blocks (``segments``:
    the blocks)."""
    cfg = launch_config("fwd", ndim, cuda=gpu_code(device), dtype=dtype)
    block = cfg["BLOCK"]
    n_blocks = triton.cdiv(n, block)
    segment_blocks = triton.cdiv(n_blocks, cfg["PARTIALS"]) if reduce else 1
    segments = triton.cdiv(n_blocks, segment_blocks)
    grid = programs(segments, cfg["PROGRAMS_PER_SM"], device)
    return ForwardPlan(cfg, block, segment_blocks, segments, grid)


_counters: dict[tuple, Tensor] = {}


def _ticket_counter(device: torch.device) -> Tensor:
    """A zeroed int32 ticket counter for a reducing forward launch (module docstring): one per
    (device, stream), reused (each launch leaves it at 0); a fresh one under graph capture."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing or device.type == "meta":  # meta: a recorded launch (audit, --plan)
        return torch.zeros(1, dtype=torch.int32, device=device)
    key = (device, stream_key(device))
    if key not in _counters:
        _counters[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _counters[key]


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def mse_forward(
    input: Tensor, target: Tensor, reduction: str, *, compute_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """``(loss, grad)`` of ``input`` against ``target`` (one shape, any strides, one floating
    dtype; each read once), in one launch of a persistent grid (none for ``N == 0``: ``"mean"``
    gives nan as ``F.mse_loss`` does, ``"sum"`` 0, ``"none"`` an empty tensor).

    * ``loss``: for ``"mean"``/``"sum"`` a 0-dim tensor in the input dtype, accumulated in fp32
      (fp64 for fp64) by the deterministic reduction of the module docstring (its cut:
      :func:`forward_plan`); for ``"none"`` the contiguous ``(input - target)**2``.
    * ``grad``: only with ``compute_grad`` and a reduction (else ``None``): ``d loss / d input``
      for an upstream gradient of 1, ``2 (input - target) [/ N]``, a new contiguous tensor of
      the input's shape and dtype; scale it by the real one with :func:`mse_grad_scale_`.
    """
    _check_pair(input, target, reduction)
    reduce = reduction != "none"
    want_grad = compute_grad and reduce
    n = input.numel()
    dtype, device = input.dtype, input.device
    grad = torch.empty(input.shape, dtype=dtype, device=device) if want_grad else None
    if n == 0:
        if reduce:
            return torch.full((), float("nan") if reduction == "mean" else 0.0, dtype=dtype,
                              device=device), grad  # fmt: skip
        return torch.empty(input.shape, dtype=dtype, device=device), grad
    out = torch.empty(input.shape if not reduce else (), dtype=dtype, device=device)

    (x, t), ndim, contiguous, sizes, (xs, ts) = _layout(input, target)
    plan = forward_plan(n, ndim, dtype, device, reduce=reduce)
    if reduce:
        partials = torch.empty(plan.segments, dtype=acc_dtype(dtype), device=device)
        counter = _ticket_counter(device)
    else:  # unused by the kernel
        partials = counter = out
    with on_device(device):
        launch(
            _mse_fwd_kernel, (plan.programs,), x, t, out, grad if grad is not None else out,
            partials, counter, n, plan.segment_blocks, plan.segments,
            sizes[1], sizes[2], sizes[3], *xs, *ts,
            NDIM=ndim, CONTIG=contiguous, REDUCE=reduce, MEAN=reduction == "mean",
            COMPUTE_GRAD=want_grad, ACC=tl_acc_dtype(dtype), BLOCK=plan.block,
            PARTIALS=plan.config["PARTIALS"], num_warps=plan.config["num_warps"],
        )  # fmt: skip
    return out, grad


def mse_backward(grad_output: Tensor, input: Tensor, target: Tensor, reduction: str) -> Tensor:
    """Elementwise MSE backward: ``grad_output * 2 (input - target)`` (``/ N`` for ``"mean"``).

    ``grad_output`` is a 1-element tensor (``"mean"``/``"sum"``; read on the device) or has
    ``input``'s shape with any strides (``"none"``). Returns a new contiguous tensor of
    ``input``'s shape and dtype, in one launch (none for ``N == 0``). For a gradient that
    :func:`mse_forward` already produced, :func:`mse_grad_scale_` is cheaper.
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
        (x, t), ndim, contiguous, sizes, (xs, ts) = _layout(input, target)
        go, gs = grad_output, [0, 0, 0, 0]
    else:
        (go, x, t), ndim, contiguous, sizes, (gs, xs, ts) = _layout(grad_output, input, target)
    cfg = launch_config("elementwise", cuda=gpu_code(input.device))
    with on_device(input.device):
        launch(
            _mse_bwd_kernel, (triton.cdiv(n, cfg["BLOCK"]),), go, x, t, out, n,
            sizes[1], sizes[2], sizes[3], *gs, *xs, *ts,
            NDIM=ndim, CONTIG=contiguous, GO_SCALAR=scalar, MEAN=reduction == "mean",
            ACC=tl_acc_dtype(input.dtype), BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
        )  # fmt: skip
    return out


def mse_grad_scale_(grad: Tensor, grad_output: Tensor) -> Tensor:
    """``grad *= grad_output`` in place, on the device, without a host sync; returns ``grad``:
    the backward of a reducing MSE whose forward (:func:`mse_forward` with ``compute_grad``)
    wrote the gradient for an upstream gradient of 1.

    ``grad``: floating, any strides without stride-0 dims (no overlapping memory); contiguous,
    as :func:`mse_forward` returns it, takes the vector path. ``grad_output``: a 1-element
    floating tensor on ``grad``'s device, read by the kernel only. The product is computed in
    fp32 (fp64 for fp64 ``grad``) and rounded once; ``grad_output == 1`` leaves ``grad``
    bitwise unchanged. One launch of at most one program per SM (:func:`scale_programs`). Not
    recorded by autograd, and Triton's write does not bump ``grad``'s version counter: the
    caller must own ``grad`` (e.g. scale a saved gradient at most once).
    """
    if grad_output.numel() != 1:
        raise ValueError(
            f"mse_grad_scale_ needs a 1-element grad_output, got {tuple(grad_output.shape)}"
        )
    if grad.dtype not in FLOAT_DTYPES:
        raise TypeError(f"mse_grad_scale_ needs a floating grad, got {grad.dtype}")
    if not grad_output.dtype.is_floating_point:
        raise TypeError(f"mse_grad_scale_ needs a floating grad_output, got {grad_output.dtype}")
    if grad_output.device != grad.device:
        raise ValueError(f"grad_output on {grad_output.device} but grad on {grad.device}")
    n = grad.numel()
    if n == 0:
        return grad
    sizes, (strides,) = _coalesce(tuple(grad.shape), [tuple(grad.stride())])
    if any(st == 0 for size, st in zip(sizes, strides, strict=True) if size > 1):
        raise ValueError(
            "mse_grad_scale_ cannot write in place into a tensor with stride-0 dimensions"
        )
    if len(sizes) > MAX_DIMS:
        # Rare: too many non-mergeable dims. Scale a contiguous copy and write it back.
        tmp = grad.contiguous()
        mse_grad_scale_(tmp, grad_output)
        return grad.copy_(tmp)
    ndim, contiguous, sizes, (strides,) = _padded(sizes, [strides])
    cfg = launch_config("scale", cuda=gpu_code(grad.device), dtype=grad.dtype)
    with on_device(grad.device):
        launch(
            _grad_scale_kernel, (scale_programs(n, grad.device, grad.dtype),), grad, grad_output, n,
            sizes[1], sizes[2], sizes[3], *strides,
            NDIM=ndim, CONTIG=contiguous, ACC=tl_acc_dtype(grad.dtype), BLOCK=cfg["BLOCK"],
            num_warps=cfg["num_warps"],
        )  # fmt: skip
    return grad


# --------------------------------------------------------------------------------------------
# Audit cases (triton_kernels/audit.py): calls of the launchers on small CPU tensors, recorded
# --------------------------------------------------------------------------------------------
AUDIT_BY_PRECISION = False  # recorded again for TF32 tl.dot
call = functools.partial


def audit_cases(dtype: torch.dtype, quick: bool) -> Iterator[tuple[str, Callable[[], object]]]:
    """The MSE kernels on contiguous, unaligned, 2-d (a broadcast target) and 4-d strided
    operands."""
    z, u = call(torch.zeros, dtype=dtype), call(unaligned, dtype=dtype)
    x, t, go, x4, t4 = z(32, 64), z(32, 64), z(()), strided_4d(dtype), z(2, 8, 16, 32)
    fwd = mse_forward
    yield "mean+grad contig", call(fwd, x, t, "mean", compute_grad=True)
    yield "mean contig", call(mse_backward, go, x, t, "mean")
    yield "contig", call(mse_grad_scale_, z(32, 64), go)
    if quick:
        return
    yield "mean+grad unaligned", call(fwd, u(32, 64), u(32, 64), "mean", compute_grad=True)
    yield "mean+grad ndim2", call(fwd, x, z(1, 64).expand(32, 64), "mean", compute_grad=True)
    yield "mean+grad ndim4", call(fwd, x4, t4, "mean", compute_grad=True)
    yield "mean contig", call(fwd, x, t, "mean", compute_grad=False)
    yield "none contig", call(fwd, x, t, "none", compute_grad=False)
    yield "none ndim4", call(fwd, x4, t4, "none", compute_grad=False)
    yield "none contig", call(mse_backward, z(32, 64), x, t, "none")
    yield "none ndim4", call(mse_backward, strided_4d(dtype), x4, t4, "none")
    yield "ndim4", call(mse_grad_scale_, strided_4d(dtype), go)
