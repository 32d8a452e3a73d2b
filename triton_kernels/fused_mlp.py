"""A fully fused narrow MLP: every layer of ``act_o(... act_h(x W_0^T + b_0) ... W_{L-1}^T + b)``
in one forward launch, the whole gradient chain in one backward launch, and the weight
gradients from a deterministic split-row reduction.

Layout. Every width (input, hidden, output) is at most :data:`MAX_WIDTH` (128); a launch pads
them all to one ``WIDTH`` (a power of two >= 16) in registers, held as ``WIDTH / NC`` column
chunks of ``NC`` columns (see "Device helpers" below). The layer dims are constexprs
(``DIMS = (k_0, n_0, n_1, ..., n_{L-1})``), the weights / biases a tuple of pointers to the
layers' own ``(n, k)`` / ``(n,)`` tensors (loaded with masks, so nothing is packed or copied),
and the layer loop a ``tl.static_range``: each layer is compiled with its own shapes.

Launches (``M`` rows, ``L`` layers):

1. :func:`mlp_forward_kernel`, one program per ``BLOCK_M`` rows: loads its row tile once and
   carries it through every layer (``tl.dot`` with the layer's ``W^T``, bias, activation), all
   in registers. It writes the output and, when a backward will follow, per hidden layer what
   the activation's derivative reads (``Activation.saved_for``: the output y, or the
   pre-activation z), plus the last layer's z when the output activation derives from z.
2. :func:`mlp_backward_kernel`, one program per ``BLOCK_M`` rows, layers in reverse:
   ``dZ_l = dY_l * act'(saved_l)`` (written, for step 3), ``dY_{l-1} = dZ_l W_l``, and at the end
   ``dX``.
3. :func:`mlp_wgrad_kernel`, grid ``(S, L, blocks)``: program ``(s, l, b)`` sums block ``b``
   of ``dZ_l^T H_{l-1}`` (and of ``sum_rows dZ_l``) over its ``s``-th chunk of rows
   (``H_{l-1}`` is x, the saved y, or ``act(saved z)`` recomputed), into a fp32 (fp64)
   partials buffer.
4. :func:`mlp_wgrad_reduce_kernel` sums the ``S`` partials of each layer in a fixed order and
   writes ``dW_l`` / ``db_l`` into the layers' own gradient tensors. With a single chunk
   (``S == 1``, small ``M``) step 3 writes them directly and this launch is skipped.

With the MSE loss folded in (:func:`mlp_mse_forward`), step 1's last-layer epilogue also
reads the target and writes each row tile's ``sum (y - t)^2`` to a partials buffer (and, for
a backward, y), and :func:`mlp_loss_reduce_kernel` sums the partials in a fixed order: forward
2 launches. Step 2 then forms its first ``dY = g * norm (y - t)`` from y, the target and the
loss's upstream gradient g (``G_MODE="mse"``), rounded once, as natively.

No atomics anywhere: the gradients are bitwise reproducible. ``S`` depends on ``M`` and ``L``
only (:func:`wgrad_splits`). Rounding follows native ``nn.Linear`` + activation modules: z, y,
dZ and each ``dY`` are rounded to the input dtype where native rounds them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
import triton
import triton.language as tl

from ._activations import (
    activation_grad,
    activation_grad2,
    apply_activation,
    constexpr,
    slope_as,
)
from ._host import acc_dtype, gpu_code, launch
from ._host import target as gpu_target
from ._runtime import cast_out, dtype_class, input_precision_for

__all__ = [
    "CONFIGS",
    "LOSS_MODES",
    "MAX_LAYERS",
    "MAX_WIDTH",
    "launch_config",
    "mlp_backward",
    "mlp_backward_kernel",
    "mlp_forward",
    "mlp_forward_kernel",
    "mlp_loss_reduce_kernel",
    "mlp_mse_forward",
    "mlp_wgrad_kernel",
    "mlp_wgrad_reduce_kernel",
    "padded_width",
    "shipped_widths",
    "second_order_supports",
    "supports",
    "wgrad_splits",
]

MAX_WIDTH = 128
MAX_LAYERS = 32  # every layer is unrolled into the kernels; deeper nets run layer by layer
_ALIGN = 64  # elements: per-layer segments of one buffer start 128-byte aligned (fp16)


def _cfg(
    block_m: int, warps: int, chunk: int, block_r: int, wg_chunk: int, wg_warps: int
) -> dict[str, int]:
    """Row tile and warps of the forward / backward-chain kernels (``BLOCK_M``, ``num_warps``)
    and the most columns of one of their chunks (``CHUNK``: NC = min(CHUNK, WIDTH)); the
    weight-gradient kernel's rows per ``tl.dot`` step, block side and warps (``BLOCK_R``,
    ``WGRAD_CHUNK``, ``wgrad_warps``)."""
    return dict(BLOCK_M=block_m, num_warps=warps, CHUNK=chunk, BLOCK_R=block_r,
                WGRAD_CHUNK=wg_chunk, wgrad_warps=wg_warps)  # fmt: skip


# Configs as data, by (architecture family, dtype class, WIDTH); the audit compiles each one
# under Triton 3.6 and 3.9 and every entry is spill-free there. Dtype classes as in
# _matmul.dtype_class: "fp16" (fp16/bf16) and "tf32" run on tensor cores (wgmma on sm_90: 64
# rows a warpgroup), "fp32" (IEEE) on the FMA units, whose operand fragments sit in registers
# (a thread holds a whole K slice of each dot operand): spill-free up to WIDTH 64, with 32-row
# tiles and 8 warps at 64. WIDTH 128 found none: with 16-column chunks the forward fits (16
# rows, 8 warps: 174 registers) but the backward chain spills 164 bytes on sm_90 (Triton
# 3.9), 16 rows x 32 columns 192+, 16 warps caps a thread at 128 registers and spills KBs
# (the K-outer loop order and barriers between chunks did not help); so wider IEEE fp32 MLPs
# run layer by layer (see supports()). Tensor cores: up to 32 columns, 128 rows with 4 warps;
# from 64, 8 warps (64 accumulator elements a thread spill with an erf-GELU epilogue) and, at
# 128, narrower chunks where 64 columns spill (sm_80, and TF32 under Triton 3.6; sm_80 TF32
# needs 16).
_NARROW = {w: _cfg(128, 4, 64, 64, 64, 4) for w in (16, 32)}
_WIDE64 = _cfg(128, 8, 64, 64, 64, 4)
_FMA = {16: _cfg(64, 4, 16, 32, 16, 4), 32: _cfg(32, 4, 32, 32, 32, 4),
        64: _cfg(32, 8, 64, 32, 32, 4)}  # fmt: skip
CONFIGS: dict[tuple[int, str], dict[int, dict[str, int]]] = {
    (90, "fp16"): {**_NARROW, 64: _WIDE64, 128: _cfg(128, 8, 64, 64, 64, 4)},
    (90, "tf32"): {**_NARROW, 64: _WIDE64, 128: _cfg(128, 8, 32, 64, 64, 4)},
    (90, "fp32"): _FMA,
    (80, "fp16"): {**_NARROW, 64: _WIDE64, 128: _cfg(128, 8, 32, 64, 64, 4)},
    # VALUE_AS_Y: the folded loss without a backward (no store at all) spills there (44-48
    # bytes under Triton 3.9 at 32 to 128 rows): it runs the storing variant into scratch.
    (80, "tf32"): {
        **_NARROW,
        64: _WIDE64,
        128: {**_cfg(128, 8, 16, 64, 64, 4), "VALUE_AS_Y": 1},
    },
    (80, "fp32"): _FMA,
}
# The second order's R-op (mlp_rop_kernel) keeps more tiles live than the chain (the tangent,
# its pre-activation, the recomputed upstream gradient, dZ and s of a layer): fewer rows where
# the chain's tile spills there (ROP_BLOCK_M; else BLOCK_M). Up to ROP_MAX_WIDTH: at 128 it
# spills with every row count tried (16-64) under one Triton version or the other, so there the
# R-op runs in torch ops (manualbp.ops.fused_mlp.reference_second_order; cuBLAS GEMMs).
ROP_MAX_WIDTH = 64
ROP_ROWS: dict[tuple[int, str], dict[int, int]] = {
    (90, "fp16"): {32: 64, 64: 64}, (90, "tf32"): {32: 64, 64: 64}, (90, "fp32"): {64: 16},
    (80, "tf32"): {32: 64, 64: 32}, (80, "fp32"): {64: 16},
}  # fmt: skip
for _key, _rows in ROP_ROWS.items():
    for _width, _block_m in _rows.items():
        CONFIGS[_key][_width] = {**CONFIGS[_key][_width], "ROP_BLOCK_M": _block_m}
# The interpreter: small row tiles and, up to 32 columns, 16-column chunks, so that the tests'
# small, odd row counts span several programs and the chunked paths run; wider layers in one
# chunk and weight-gradient blocks as wide as the layers (each interpreted op and program
# costs Python time, whatever its size).
INTERPRETER_CONFIG = {w: _cfg(32, 4, 16 if w <= 32 else w, 16, w, 4) for w in (16, 32, 64, 128)}
# Weight-gradient splits: at least MIN_SPLIT_ROWS rows per chunk, at most about TARGET_PROGRAMS
# programs over all layers. REDUCE_BLOCK: partial elements summed per reduction program.
MIN_SPLIT_ROWS = {"cuda": 1024, "interpreter": 32}
TARGET_PROGRAMS = 256
# Software-pipelining stages of the weight-gradient kernel's row loop: Triton's default 3
# spills at width 32 on sm_90 (fp16); 2 double-buffers the loads, as much as the loop needs.
WGRAD_STAGES = 2
# The forward and backward-chain kernels have no loop to pipeline (the layers are unrolled):
# one stage, which also keeps the prefetch registers of Triton's default 3 (sm_80 TF32 at width
# 128, the folded loss without stores, spilled 16 bytes).
CHAIN_STAGES = 1
REDUCE_BLOCK = {"cuda": 1024, "interpreter": 256}


def padded_width(dims: tuple[int, ...]) -> int:
    """The register width every layer is padded to: a power of two >= 16."""
    return max(16, triton.next_power_of_2(max(dims)))


def second_order_supports(dims: tuple[int, ...]) -> bool:
    """Whether :func:`mlp_second_order` takes an MLP of these dims (one :func:`supports`
    takes): padded widths up to :data:`ROP_MAX_WIDTH`."""
    return padded_width(dims) <= ROP_MAX_WIDTH


def supports(dims: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the fused kernels take layers of these dims (``k_0, n_0, ..., n_{L-1}``) in
    ``dtype`` on ``device``: widths <= :data:`MAX_WIDTH`, at most :data:`MAX_LAYERS` layers and,
    on a GPU, a shipped config (:data:`CONFIGS`: fp16/bf16, TF32 fp32, IEEE fp32 up to width
    64; fp64 and wider IEEE fp32 run layer by layer). The interpreter takes every float dtype."""
    if not (2 <= len(dims) <= MAX_LAYERS + 1 and min(dims) >= 1 and max(dims) <= MAX_WIDTH):
        return False
    gpu = gpu_target(device)
    if gpu is None:
        return dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return padded_width(dims) in shipped_widths(gpu[0], dtype, input_precision_for(dtype, device))


def launch_config(device: torch.device, dtype: torch.dtype, width: int) -> dict[str, int]:
    """The block shapes for a launch of ``width`` on ``device`` (the interpreter's, off a GPU)."""
    gpu = gpu_target(device)
    if gpu is None:
        return INTERPRETER_CONFIG[width]
    return _table(gpu[0], dtype, input_precision_for(dtype, device))[width]


def _table(arch: int, dtype: torch.dtype, precision: str) -> dict[int, dict[str, int]]:
    return CONFIGS.get((90 if arch >= 90 else 80, dtype_class(dtype, precision)), {})


def shipped_widths(arch: int, dtype: torch.dtype, precision: str) -> list[int]:
    """The WIDTHs :data:`CONFIGS` has for ``arch`` / ``dtype`` / ``tl.dot`` precision."""
    return sorted(_table(arch, dtype, precision))


def wgrad_splits(M: int, num_layers: int, block_r: int, *, cuda: bool) -> tuple[int, int]:
    """``(S, chunk)``: the row chunks of the weight-gradient step (a multiple of ``block_r``
    rows each, ``S`` of them cover ``M``). A function of ``M`` and ``L`` only: deterministic."""
    min_rows = MIN_SPLIT_ROWS["cuda" if cuda else "interpreter"]
    target = max(1, TARGET_PROGRAMS // num_layers)
    splits = max(1, min(triton.cdiv(M, min_rows), target))
    chunk = triton.cdiv(triton.cdiv(M, splits), block_r) * block_r
    return triton.cdiv(M, chunk), chunk


# --------------------------------------------------------------------------------------------
# Device helpers. A row tile's activations live in registers as a tuple of CH column chunks of
# NC columns each (WIDTH = CH * NC): a layer is CH x CH (BLOCK_M, NC) x (NC, NC) dots, and one
# output chunk's accumulator and epilogue are live at a time (a whole 128-wide tile through an
# erf-GELU epilogue spills). Chunks beyond a layer's width are skipped at compile time.
# --------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b``; under the interpreter bf16 operands are upcast (it has no bf16 dot)."""
    if INPUT_PRECISION == "upcast_ieee":
        acc = tl.dot(
            a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=acc.dtype
        )
    else:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def _rows(ptr, offs_m, offs_c, M, stride_m, stride_n, N):
    """The (rows, NC) tile ``ptr[offs_m, offs_c]`` of a strided (M, N) tensor, zero outside
    (int64 offsets: a user tensor's strides may be anything)."""
    mask = (offs_m[:, None] < M) & (offs_c[None, :] < N)
    return tl.load(ptr + offs_m[:, None] * stride_m + offs_c[None, :] * stride_n, mask=mask,
                   other=0.0)  # fmt: skip


@triton.jit
def _load_tile(ptr, row0, rows_left, offs_r, offs_c, N):
    """The (rows, NC) tile at row ``row0``, columns ``offs_c`` of a contiguous (M, N) tensor,
    zero outside. The tile's offsets are int32 (``BLOCK * N`` is small), the row start int64."""
    mask = (offs_r[:, None] < rows_left) & (offs_c[None, :] < N)
    return tl.load(ptr + row0 * N + (offs_r[:, None] * N + offs_c[None, :]), mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, value, row0, rows_left, offs_r, offs_c, N):
    """Store a (rows, NC) tile at row ``row0``, columns ``offs_c`` of a contiguous (M, N)
    tensor (columns past N are dropped)."""
    mask = (offs_r[:, None] < rows_left) & (offs_c[None, :] < N)
    tl.store(ptr + row0 * N + (offs_r[:, None] * N + offs_c[None, :]),
             cast_out(value, ptr.dtype.element_ty), mask=mask)  # fmt: skip


@triton.jit
def _wblock(w_ptr, K, N, n0, k0, NC: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The (NC, NC) block of the contiguous (N, K) weight at rows n0, columns k0, zero outside:
    ``W[n0:, k0:]``, or its transpose ``[k, n] = W[n0 + n, k0 + k]``."""
    offs_n = n0 + tl.arange(0, NC)
    offs_k = k0 + tl.arange(0, NC)
    if TRANSPOSED:
        mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        return tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=mask, other=0.0)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    return tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0.0)


@triton.jit
def _load_chunks(ptr, offs_m, M, stride_m, stride_n, N, NC: tl.constexpr, CH: tl.constexpr):
    """A strided (M, N) tensor's row tile as CH chunks of NC columns (zeros past N)."""
    out = ()
    for c in tl.static_range(CH):
        out = out + (_rows(ptr, offs_m, c * NC + tl.arange(0, NC), M, stride_m, stride_n, N),)  # noqa: RUF005 (Triton has no tuple unpacking)
    return out


@triton.jit
def _store_chunks(ptr, h, row0, rows_left, offs_r, N, NC: tl.constexpr, CH: tl.constexpr):
    for c in tl.static_range(CH):
        if c * NC < N:
            _store_tile(ptr, h[c], row0, rows_left, offs_r, c * NC + tl.arange(0, NC), N)


# --------------------------------------------------------------------------------------------
# 1. Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _preact_chunk(
    h, w_ptr, b_ptr, j: tl.constexpr, K: tl.constexpr, N: tl.constexpr, HAS_B: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, NC: tl.constexpr,
    CH: tl.constexpr,
):  # fmt: skip
    """Output chunk ``j`` of ``z = h W^T + b``, rounded to the input dtype before the
    activation, as native Linear + activation modules round it."""
    offs_n = j * NC + tl.arange(0, NC)
    acc = tl.zeros((h[0].shape[0], NC), ACC_DTYPE)
    for c in tl.static_range(CH):
        if c * NC < K:
            acc = _dot(h[c], _wblock(w_ptr, K, N, j * NC, c * NC, NC, True), acc, INPUT_PRECISION)
    if HAS_B:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC_DTYPE)[None, :]
    return cast_out(acc, h[0].dtype)


@triton.jit
def _forward_layer(
    h, w_ptr, b_ptr, s_ptr, y_ptr, zo_ptr, row0, rows_left, offs_r, slope,
    K: tl.constexpr, N: tl.constexpr, HAS_B: tl.constexpr, LAST: tl.constexpr,
    ACT: tl.constexpr, STORE_S: tl.constexpr, S_PREACT: tl.constexpr,
    STORE_ZO: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    NC: tl.constexpr, CH: tl.constexpr,
):  # fmt: skip
    """``act(h W^T + b)`` for one layer of one row tile, chunk by output chunk; stores what
    backward reads (hidden) or the output (last); returns the new chunks."""
    out = ()
    for j in tl.static_range(CH):
        zero = tl.zeros((offs_r.shape[0], NC), h[0].dtype)
        if j * NC < N:
            offs_n = j * NC + tl.arange(0, NC)
            z = _preact_chunk(h, w_ptr, b_ptr, j, K, N, HAS_B, ACC_DTYPE, INPUT_PRECISION, NC, CH)
            hj = cast_out(apply_activation(z.to(ACC_DTYPE), slope, ACT), h[0].dtype)
            if LAST:
                _store_tile(y_ptr, hj, row0, rows_left, offs_r, offs_n, N)
                if STORE_ZO:
                    _store_tile(zo_ptr, z, row0, rows_left, offs_r, offs_n, N)
            elif STORE_S:
                _store_tile(s_ptr, z if S_PREACT else hj, row0, rows_left, offs_r, offs_n, N)
            out = out + (hj,)  # noqa: RUF005 (Triton has no tuple unpacking)
        else:
            out = out + (zero,)  # noqa: RUF005 (Triton has no tuple unpacking)
    return out


@triton.jit
def _loss_layer(
    h, w_ptr, b_ptr, y_ptr, zo_ptr, t_ptr, row0, rows_left, offs_r, slope, norm,
    K: tl.constexpr, N: tl.constexpr, HAS_B: tl.constexpr,
    ACT: tl.constexpr, LOSS: tl.constexpr, STORE_ZO: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, NC: tl.constexpr,
    CH: tl.constexpr,
):  # fmt: skip
    """The last layer with the MSE loss folded into its epilogue: ``y = act(h W^T + b)``,
    ``D = y - t``; returns this row tile's ``sum D^2`` and stores, by ``LOSS``, nothing
    (``"value"``) or ``y`` (and its z when ``STORE_ZO``; ``"y"``). The target is contiguous
    (int32 tile offsets, as for the layers' own buffers: a strided target's int64 addressing
    spills on sm_80 TF32 at 128)."""
    rowsq = tl.zeros((offs_r.shape[0],), ACC_DTYPE)
    for j in tl.static_range(CH):
        if j * NC < N:
            offs_n = j * NC + tl.arange(0, NC)
            z = _preact_chunk(h, w_ptr, b_ptr, j, K, N, HAS_B, ACC_DTYPE, INPUT_PRECISION, NC, CH)
            hj = cast_out(apply_activation(z.to(ACC_DTYPE), slope, ACT), h[0].dtype)
            t = _load_tile(t_ptr, row0, rows_left, offs_r, offs_n, N).to(ACC_DTYPE)
            # D from the prediction rounded to the input dtype, as the unfused loss reads it.
            # Padding columns hold act(0) (rows past M are dropped below, once).
            d = hj.to(ACC_DTYPE) - t
            if ACT != "none":
                d = tl.where((offs_n < N)[None, :], d, 0.0)
            rowsq += tl.sum(d * d, axis=1)
            if LOSS == "y":
                _store_tile(y_ptr, hj, row0, rows_left, offs_r, offs_n, N)
                if STORE_ZO:
                    _store_tile(zo_ptr, z, row0, rows_left, offs_r, offs_n, N)
    return tl.sum(tl.where(offs_r < rows_left, rowsq, 0.0), axis=0)


@triton.jit
def _loss_norm(numel, MEAN: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``norm`` in ``dL/dD = norm * D``: ``2 / numel`` for the mean, 2 for the sum (computed
    here, in the accumulator dtype: a float argument would reach the kernel as fp32)."""
    if MEAN:
        return 2.0 / tl.cast(numel, ACC_DTYPE)
    return tl.cast(2.0, ACC_DTYPE)


@triton.jit
def mlp_forward_kernel(
    x_ptr, y_ptr, zo_ptr, ws, bs, ss, t_ptr, lp_ptr, hidden_slope: tl.float64,
    out_slope: tl.float64, M, stride_xm, stride_xk, numel, DIMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NUM_LAYERS: tl.constexpr, HIDDEN_ACT: tl.constexpr, OUT_ACT: tl.constexpr,
    HIDDEN_PREACT: tl.constexpr, STORE: tl.constexpr, STORE_OUT_PREACT: tl.constexpr,
    LOSS: tl.constexpr, LOSS_MEAN: tl.constexpr,
    ACC_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr,
    NC: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """One tile of rows through every layer. ``ws`` / ``bs``: per-layer weight and bias
    pointers (``HAS_BIAS[l]`` False: a dummy); ``ss``: per hidden layer, the (M, n_l) tensor
    the activation's derivative reads (z when ``HIDDEN_PREACT``, else y), written when
    ``STORE``; ``zo_ptr``: the last layer's z, written when ``STORE_OUT_PREACT``.

    ``LOSS`` (``"none"``: no loss) folds ``mse(y, t)`` into the last layer (see
    :func:`_loss_layer`; ``t_ptr`` a contiguous (M, n_{L-1}) target, ``numel`` its elements,
    ``OUT_PREACT``: the output activation's derivative reads z): each program writes its
    rows' ``sum (y - t)^2`` to ``lp_ptr[program]``, for :func:`mlp_loss_reduce_kernel`."""
    acc_dtype: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    h_slope = slope_as(hidden_slope, acc_dtype)
    o_slope = slope_as(out_slope, acc_dtype)
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    offs_r = tl.arange(0, BLOCK_M)
    h = _load_chunks(x_ptr, row0 + offs_r, M, stride_xm, stride_xk, DIMS[0], NC, WIDTH // NC)
    # li (the layer) is a constexpr: each layer is compiled with its own shapes and conditions.
    for li in tl.static_range(NUM_LAYERS - 1):
        h = _forward_layer(h, ws[li], bs[li], ss[li], y_ptr, zo_ptr, row0, M - row0, offs_r,
                           h_slope, DIMS[li], DIMS[li + 1], HAS_BIAS[li], False, HIDDEN_ACT, STORE,
                           HIDDEN_PREACT, False, acc_dtype, INPUT_PRECISION, NC,
                           WIDTH // NC)  # fmt: skip
    last: tl.constexpr = NUM_LAYERS - 1
    if LOSS == "none":
        _forward_layer(h, ws[last], bs[last], y_ptr, y_ptr, zo_ptr, row0, M - row0, offs_r,
                       o_slope, DIMS[last], DIMS[NUM_LAYERS], HAS_BIAS[last], True, OUT_ACT,
                       False, False, STORE_OUT_PREACT, acc_dtype, INPUT_PRECISION, NC,
                       WIDTH // NC)  # fmt: skip
    else:
        norm = _loss_norm(numel, LOSS_MEAN, acc_dtype)
        part = _loss_layer(h, ws[last], bs[last], y_ptr, zo_ptr, t_ptr, row0, M - row0, offs_r,
                           o_slope, norm, DIMS[last], DIMS[NUM_LAYERS], HAS_BIAS[last], OUT_ACT,
                           LOSS, STORE_OUT_PREACT, acc_dtype, INPUT_PRECISION, NC,
                           WIDTH // NC)  # fmt: skip
        tl.store(lp_ptr + tl.program_id(0), part)


@triton.jit
def mlp_loss_reduce_kernel(lp_ptr, loss_ptr, T, numel, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the ``T`` row tiles' partial sums of squares added lane by lane in a fixed
    order, then across lanes; divided by ``numel`` for the mean; the loss, in its dtype."""
    acc = tl.zeros((BLOCK,), lp_ptr.dtype.element_ty)
    for i in range(0, T, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(lp_ptr + offs, mask=offs < T, other=0.0)
    total = tl.sum(acc, axis=0)
    if MEAN:  # one division, in fp64, rounded once to the loss dtype
        total = total.to(tl.float64) / tl.cast(numel, tl.float64)
    tl.store(loss_ptr, cast_out(total, loss_ptr.dtype.element_ty))


# --------------------------------------------------------------------------------------------
# 2. Backward through the chain
# --------------------------------------------------------------------------------------------
@triton.jit
def _dz_chunk(
    gj, s_ptr, dz_ptr, inj_ptr, row0, rows_left, offs_r, slope, j: tl.constexpr,
    N: tl.constexpr, ACT: tl.constexpr, INJECT: tl.constexpr, INJECT_Z: tl.constexpr,
    ACC_DTYPE: tl.constexpr, NC: tl.constexpr,
):  # fmt: skip
    """Chunk ``j`` of ``dZ = dY * act'(s)``, stored, and returned. ``INJECT``: a gradient
    reaching the layer's saved tensor itself (a second order) adds to dY (saved y) or, with
    ``INJECT_Z``, to dZ (saved z)."""
    offs_n = j * NC + tl.arange(0, NC)
    dzj = gj
    if INJECT and not INJECT_Z:
        inj = _load_tile(inj_ptr, row0, rows_left, offs_r, offs_n, N)
        dzj = cast_out(dzj.to(ACC_DTYPE) + inj.to(ACC_DTYPE), gj.dtype)
    if ACT != "none":
        s = _load_tile(s_ptr, row0, rows_left, offs_r, offs_n, N).to(ACC_DTYPE)
        dzj = cast_out(activation_grad(dzj.to(ACC_DTYPE), s, slope, ACT), gj.dtype)
    if INJECT and INJECT_Z:
        inj = _load_tile(inj_ptr, row0, rows_left, offs_r, offs_n, N)
        dzj = cast_out(dzj.to(ACC_DTYPE) + inj.to(ACC_DTYPE), gj.dtype)
    _store_tile(dz_ptr, dzj, row0, rows_left, offs_r, offs_n, N)
    return dzj


@triton.jit
def _backward_layer(
    g, w_ptr, s_ptr, dz_ptr, inj_ptr, row0, rows_left, offs_r, slope, K: tl.constexpr,
    N: tl.constexpr, ACT: tl.constexpr, NEED_PREV: tl.constexpr, INJECT: tl.constexpr,
    INJECT_Z: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    NC: tl.constexpr, CH: tl.constexpr,
):  # fmt: skip
    """From this layer's ``dY`` chunks: ``dZ = dY * act'(s)`` (stored; an injected gradient
    added, see :func:`_dz_chunk`), and when ``NEED_PREV`` the chunks of ``dY_prev = dZ W``
    (else an empty tuple)."""
    dz = ()
    for j in tl.static_range(CH):
        if j * NC < N:
            dzj = _dz_chunk(g[j], s_ptr, dz_ptr, inj_ptr, row0, rows_left, offs_r, slope, j, N,
                            ACT, INJECT, INJECT_Z, ACC_DTYPE, NC)  # fmt: skip
            dz = dz + (dzj,)  # noqa: RUF005 (Triton has no tuple unpacking)
    out = ()
    if NEED_PREV:
        for c in tl.static_range(CH):
            acc = tl.zeros((offs_r.shape[0], NC), ACC_DTYPE)
            if c * NC < K:
                for j in tl.static_range(CH):
                    if j * NC < N:
                        acc = _dot(dz[j], _wblock(w_ptr, K, N, j * NC, c * NC, NC, False), acc,
                                   INPUT_PRECISION)  # fmt: skip
            out = out + (cast_out(acc, g[0].dtype),)  # noqa: RUF005 (Triton has no tuple unpacking)
    return out


@triton.jit
def _loss_grad_chunks(
    g_ptr, t_ptr, gs_ptr, norm, row0, offs_r, M, N: tl.constexpr, ACC_DTYPE: tl.constexpr,
    NC: tl.constexpr, CH: tl.constexpr,
):  # fmt: skip
    """The row tile's ``dY = norm * (y - t) * g`` of a folded loss from the stored prediction
    ``y`` (``g_ptr``), the target and the upstream gradient ``g = *gs_ptr``, formed in the
    accumulator dtype and rounded once, as native autograd rounds ``dY``. ``g_ptr`` and
    ``t_ptr`` are contiguous (M, N)."""
    gs = tl.load(gs_ptr).to(ACC_DTYPE)
    out = ()
    for c in tl.static_range(CH):
        offs_c = c * NC + tl.arange(0, NC)
        v = _load_tile(g_ptr, row0, M - row0, offs_r, offs_c, N).to(ACC_DTYPE)
        v = norm * (v - _load_tile(t_ptr, row0, M - row0, offs_r, offs_c, N).to(ACC_DTYPE))
        out = out + (cast_out(v * gs, g_ptr.dtype.element_ty),)  # noqa: RUF005
    return out


@triton.jit
def mlp_backward_kernel(
    g_ptr, so_ptr, dx_ptr, ws, ss, dzs, injs, gs_ptr, t_ptr, hidden_slope: tl.float64,
    out_slope: tl.float64, M, stride_gm, stride_gn, numel, DIMS: tl.constexpr,
    NUM_LAYERS: tl.constexpr,
    HIDDEN_ACT: tl.constexpr, OUT_ACT: tl.constexpr, NEED_DX: tl.constexpr,
    G_MODE: tl.constexpr, LOSS_MEAN: tl.constexpr, INJECT: tl.constexpr,
    HIDDEN_PREACT: tl.constexpr, ACC_FP64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr, NC: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """One tile of rows back through every layer: writes ``dZ_l`` into ``dzs[l]`` (M, n_l) and,
    when ``NEED_DX``, ``dX`` (M, k_0). ``so_ptr``: the last layer's saved tensor (y or z).

    ``G_MODE``: where ``dY`` comes from: ``"grad"``, the strided (M, n_{L-1}) ``g_ptr``; a
    folded loss, ``"mse"`` (:func:`_loss_grad_chunks`: ``g_ptr`` holds y, ``t_ptr`` the target,
    both contiguous, ``numel`` their size; ``gs_ptr`` the loss's upstream gradient); or
    ``"zero"`` (none: only injected gradients). ``INJECT[l]``: ``injs[l]``, a contiguous
    (M, n_l) gradient of layer l's saved tensor (a second order), is added where it meets the
    chain (dY for a saved y, dZ for a saved z: ``HIDDEN_PREACT``; the last layer's is its z:
    a gradient of its y is ``g_ptr`` itself)."""
    acc_dtype: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    h_slope = slope_as(hidden_slope, acc_dtype)
    o_slope = slope_as(out_slope, acc_dtype)
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    offs_r = tl.arange(0, BLOCK_M)
    L: tl.constexpr = NUM_LAYERS
    CH: tl.constexpr = WIDTH // NC
    if G_MODE == "grad":
        g = _load_chunks(g_ptr, row0 + offs_r, M, stride_gm, stride_gn, DIMS[L], NC, CH)
    elif G_MODE == "mse":
        g = _loss_grad_chunks(g_ptr, t_ptr, gs_ptr, _loss_norm(numel, LOSS_MEAN, acc_dtype),
                              row0, offs_r, M, DIMS[L], acc_dtype, NC, CH)  # fmt: skip
    else:
        g = ()
        for _ in tl.static_range(CH):
            g = g + (tl.zeros((BLOCK_M, NC), g_ptr.dtype.element_ty),)  # noqa: RUF005
    g = _backward_layer(g, ws[L - 1], so_ptr, dzs[L - 1], injs[L - 1], row0, M - row0, offs_r,
                        o_slope, DIMS[L - 1], DIMS[L], OUT_ACT, L > 1 or NEED_DX, INJECT[L - 1],
                        True, acc_dtype, INPUT_PRECISION, NC, CH)  # fmt: skip
    for i in tl.static_range(1, L):  # layer L - 1 - i, a constexpr
        g = _backward_layer(g, ws[L - 1 - i], ss[L - 1 - i], dzs[L - 1 - i], injs[L - 1 - i],
                            row0, M - row0, offs_r, h_slope, DIMS[L - 1 - i], DIMS[L - i],
                            HIDDEN_ACT, i < L - 1 or NEED_DX, INJECT[L - 1 - i], HIDDEN_PREACT,
                            acc_dtype, INPUT_PRECISION, NC, CH)  # fmt: skip
    if NEED_DX:
        _store_chunks(dx_ptr, g, row0, M - row0, offs_r, DIMS[0], NC, CH)


# --------------------------------------------------------------------------------------------
# 2b. The second order: the backward of the backward, given dL/d(dX) (docs/derivations.md, 10)
# --------------------------------------------------------------------------------------------
@triton.jit
def _dy_chunks(dz_ptr, w_ptr, row0, rows_left, offs_r, K: tl.constexpr, N: tl.constexpr,
               ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, NC: tl.constexpr,
               CH: tl.constexpr):  # fmt: skip
    """The chunks of ``dY = dZ W`` from the first order's stored (M, N) dZ and the (N, K) W,
    rounded as the first order rounded them."""
    dz = ()
    for j in tl.static_range(CH):
        offs_n = j * NC + tl.arange(0, NC)
        dz = dz + (_load_tile(dz_ptr, row0, rows_left, offs_r, offs_n, N),)  # noqa: RUF005
    out = ()
    for c in tl.static_range(CH):
        acc = tl.zeros((offs_r.shape[0], NC), ACC_DTYPE)
        if c * NC < K:
            for j in tl.static_range(CH):
                if j * NC < N:
                    acc = _dot(dz[j], _wblock(w_ptr, K, N, j * NC, c * NC, NC, False), acc,
                               INPUT_PRECISION)  # fmt: skip
        out = out + (cast_out(acc, dz_ptr.dtype.element_ty),)  # noqa: RUF005
    return out


@triton.jit
def _rop_layer(
    a, w_ptr, s_ptr, g, gs_ptr, row0, rows_left, offs_r, slope, K: tl.constexpr,
    N: tl.constexpr, ACT: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    NC: tl.constexpr, CH: tl.constexpr,
):  # fmt: skip
    """One layer of the R-op sweep: ``zdot = a W^T``; with an activation, ``dL/ds =
    act2(zdot * dY, s)`` stored and ``a = act'(s) * zdot``; returns the new ``a`` chunks."""
    out = ()
    for j in tl.static_range(CH):
        zero = tl.zeros((offs_r.shape[0], NC), a[0].dtype)
        if j * NC < N:
            offs_n = j * NC + tl.arange(0, NC)
            zd = _preact_chunk(a, w_ptr, w_ptr, j, K, N, False, ACC_DTYPE, INPUT_PRECISION, NC, CH)
            if ACT != "none":
                s = _load_tile(s_ptr, row0, rows_left, offs_r, offs_n, N).to(ACC_DTYPE)
                zf = zd.to(ACC_DTYPE)
                gs = activation_grad2(zf * g[j].to(ACC_DTYPE), s, slope, ACT)
                _store_tile(gs_ptr, gs, row0, rows_left, offs_r, offs_n, N)
                zd = cast_out(activation_grad(zf, s, slope, ACT), a[0].dtype)
            out = out + (zd,)  # noqa: RUF005 (Triton has no tuple unpacking)
        else:
            out = out + (zero,)  # noqa: RUF005 (Triton has no tuple unpacking)
    return out


@triton.jit
def mlp_rop_kernel(
    ddx_ptr, v_ptr, gv_ptr, so_ptr, gso_ptr, ws, ss, dzs, as_, gss, hidden_slope: tl.float64,
    out_slope: tl.float64, M, stride_vm, stride_vn, DIMS: tl.constexpr,
    NUM_LAYERS: tl.constexpr, HIDDEN_ACT: tl.constexpr, OUT_ACT: tl.constexpr,
    ACC_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr,
    NC: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """One tile of rows through the R-op sweep, layers forward, ``a_{-1} = dL/d(dX)``
    (``ddx_ptr``, contiguous (M, k_0)): per layer ``zdot_l = a_{l-1} W_l^T``; where layer l has
    an activation, ``dL/ds_l = act2(zdot_l * dY_l, s_l)`` into ``gss[l]`` (the last layer's into
    ``gso_ptr``; ``dY_l = dZ_{l+1} W_{l+1}`` from the first order's dZ (``dzs``), the last
    layer's the strided upstream ``v``) and ``a_l = act'(s_l) * zdot_l``; the hidden layers' a_l
    into ``as_[l]`` (for the weight gradients dL/dW_l = dZ_l^T a_{l-1}); ``dL/dv = a_{L-1}``
    into ``gv_ptr``. Every buffer but v is contiguous."""
    acc_dtype: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    h_slope = slope_as(hidden_slope, acc_dtype)
    o_slope = slope_as(out_slope, acc_dtype)
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    offs_r = tl.arange(0, BLOCK_M)
    L: tl.constexpr = NUM_LAYERS
    CH: tl.constexpr = WIDTH // NC
    a = _load_chunks(ddx_ptr, row0 + offs_r, M, DIMS[0], 1, DIMS[0], NC, CH)
    for li in tl.static_range(L - 1):  # the hidden layers
        g = _dy_chunks(dzs[li + 1], ws[li + 1], row0, M - row0, offs_r, DIMS[li + 1],
                       DIMS[li + 2], acc_dtype, INPUT_PRECISION, NC, CH)  # fmt: skip
        a = _rop_layer(a, ws[li], ss[li], g, gss[li], row0, M - row0, offs_r, h_slope, DIMS[li],
                       DIMS[li + 1], HIDDEN_ACT, acc_dtype, INPUT_PRECISION, NC, CH)  # fmt: skip
        _store_chunks(as_[li], a, row0, M - row0, offs_r, DIMS[li + 1], NC, CH)
    v = _load_chunks(v_ptr, row0 + offs_r, M, stride_vm, stride_vn, DIMS[L], NC, CH)
    a = _rop_layer(a, ws[L - 1], so_ptr, v, gso_ptr, row0, M - row0, offs_r, o_slope,
                   DIMS[L - 1], DIMS[L], OUT_ACT, acc_dtype, INPUT_PRECISION, NC, CH)  # fmt: skip
    _store_chunks(gv_ptr, a, row0, M - row0, offs_r, DIMS[L], NC, CH)


# --------------------------------------------------------------------------------------------
# 3. Weight and bias gradients, per (row chunk, layer, NC x NC block of dW)
# --------------------------------------------------------------------------------------------
@triton.jit
def _wgrad_block(
    x_ptr, h_ptr, dz_ptr, dw_ptr, db_ptr, part_ptr, slope, M, stride_xm, stride_xk, chunk,
    pid_s, S, n0, k0, li: tl.constexpr, K: tl.constexpr, N: tl.constexpr, HAS_B: tl.constexpr,
    HIDDEN_ACT: tl.constexpr, HIDDEN_PREACT: tl.constexpr, DIRECT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr,
    NC: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``dW[n0:n0+NC, k0:k0+NC] = sum_rows dZ^T H`` (and ``db[n0:n0+NC]`` when k0 == 0) over
    rows ``[pid_s * chunk, (pid_s + 1) * chunk)``; ``H`` is x (layer 0), the saved y, or
    ``act(saved z)`` recomputed and rounded as in forward."""
    offs_n = n0 + tl.arange(0, NC)
    offs_k = k0 + tl.arange(0, NC)
    acc = tl.zeros((NC, NC), ACC_DTYPE)
    db = tl.zeros((NC,), ACC_DTYPE)
    row0 = pid_s.to(tl.int64) * chunk
    for r in range(0, chunk, BLOCK_R):
        offs_r = r + tl.arange(0, BLOCK_R)
        r_ok = offs_r < M - row0
        # dZ^T block (NC, BLOCK_R), read straight from the row-major (M, N) dZ.
        dzt = tl.load(dz_ptr + row0 * N + (offs_r[None, :] * N + offs_n[:, None]),
                      mask=r_ok[None, :] & (offs_n[:, None] < N), other=0.0)  # fmt: skip
        if li == 0:
            h = _rows(x_ptr, row0 + offs_r, offs_k, M, stride_xm, stride_xk, K)
        else:
            h = _load_tile(h_ptr, row0 + r, M - row0 - r, tl.arange(0, BLOCK_R), offs_k, K)
            if HIDDEN_PREACT:
                h = cast_out(
                    apply_activation(h.to(ACC_DTYPE), slope, HIDDEN_ACT), dz_ptr.dtype.element_ty
                )
        acc = _dot(dzt, h, acc, INPUT_PRECISION)
        if HAS_B:
            db += tl.sum(dzt.to(ACC_DTYPE), axis=1)
    # The bias gradient comes from the blocks of the first column (k0 == 0): a vector mask
    # (the interpreter rejects a vector & scalar one).
    db_mask = (offs_n < N) & (offs_k == offs_n - n0)
    if DIRECT:  # one chunk: the final gradients, in the parameters' dtype
        tl.store(dw_ptr + offs_n[:, None] * K + offs_k[None, :],
                 cast_out(acc, dw_ptr.dtype.element_ty),
                 mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))  # fmt: skip
        if HAS_B:
            tl.store(db_ptr + offs_n, cast_out(db, db_ptr.dtype.element_ty), mask=db_mask)
    else:  # partials[l, pid_s] = (dW padded to WIDTH x WIDTH, then db padded to WIDTH)
        base = part_ptr + (li * S + pid_s).to(tl.int64) * (WIDTH * (WIDTH + 1))
        tl.store(base + offs_n[:, None] * WIDTH + offs_k[None, :], acc)
        if HAS_B:
            tl.store(base + WIDTH * WIDTH + offs_n, db, mask=db_mask)


@triton.jit
def mlp_wgrad_kernel(
    x_ptr, ss, dzs, dws, dbs, part_ptr, hidden_slope: tl.float64, M, stride_xm, stride_xk,
    chunk, S,
    DIMS: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_LAYERS: tl.constexpr,
    HIDDEN_ACT: tl.constexpr, HIDDEN_PREACT: tl.constexpr, DIRECT: tl.constexpr,
    ACC_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr,
    NC: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Program ``(s, l, b)``: block ``b`` of layer ``l``'s weight gradient (and its bias
    gradient) over row chunk ``s``. Each layer is compiled with its own constexpr shapes; a
    program runs only its own layer, and blocks past the layer's dims return at once."""
    pid_s = tl.program_id(0)
    pid_l = tl.program_id(1)
    n0 = (tl.program_id(2) // (WIDTH // NC)) * NC
    k0 = (tl.program_id(2) % (WIDTH // NC)) * NC
    acc_dtype: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    slope = slope_as(hidden_slope, acc_dtype)
    for li in tl.static_range(NUM_LAYERS):
        if (pid_l == li) & (n0 < DIMS[li + 1]) & (k0 < DIMS[li]):
            _wgrad_block(
                x_ptr, ss[li - 1] if li > 0 else x_ptr, dzs[li], dws[li], dbs[li], part_ptr, slope,
                M, stride_xm, stride_xk, chunk, pid_s, S, n0, k0, li, DIMS[li], DIMS[li + 1],
                HAS_BIAS[li], HIDDEN_ACT, HIDDEN_PREACT, DIRECT, acc_dtype, INPUT_PRECISION,
                WIDTH, NC, BLOCK_R,
            )  # fmt: skip


# --------------------------------------------------------------------------------------------
# 4. Fixed-order reduction of the partials
# --------------------------------------------------------------------------------------------
@triton.jit
def _reduce_layer(part_ptr, dw_ptr, db_ptr, pid_e, S, li: tl.constexpr, K: tl.constexpr,
                  N: tl.constexpr, HAS_B: tl.constexpr, ACC_FP64: tl.constexpr,
                  WIDTH: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    E: tl.constexpr = WIDTH * (WIDTH + 1)
    offs = pid_e * BLOCK + tl.arange(0, BLOCK)
    n = offs // WIDTH
    k = offs % WIDTH
    is_w = offs < WIDTH * WIDTH
    nb = offs - WIDTH * WIDTH
    # Only the partials' entries that hold gradient elements are read (blocks past the
    # layer's dims were never written).
    used = (is_w & (n < N) & (k < K)) | ((nb >= 0) & (nb < N) & HAS_B)
    acc = tl.zeros((BLOCK,), tl.float64 if ACC_FP64 else tl.float32)
    for s in range(S):  # chunk 0, 1, ..., S-1: the same order every time
        acc += tl.load(part_ptr + (li * S + s).to(tl.int64) * E + offs, mask=used, other=0.0)
    tl.store(dw_ptr + n * K + k, cast_out(acc, dw_ptr.dtype.element_ty),
             mask=is_w & (n < N) & (k < K))  # fmt: skip
    if HAS_B:
        tl.store(db_ptr + nb, cast_out(acc, db_ptr.dtype.element_ty), mask=(nb >= 0) & (nb < N))


@triton.jit
def mlp_wgrad_reduce_kernel(
    part_ptr, dws, dbs, S, DIMS: tl.constexpr, HAS_BIAS: tl.constexpr,
    NUM_LAYERS: tl.constexpr, ACC_FP64: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program ``(e, l)``: ``BLOCK`` elements of layer ``l``'s partials summed over chunks."""
    pid_e = tl.program_id(0)
    pid_l = tl.program_id(1)
    for li in tl.static_range(NUM_LAYERS):
        if pid_l == li:
            _reduce_layer(part_ptr, dws[li], dbs[li], pid_e, S, li, DIMS[li], DIMS[li + 1],
                          HAS_BIAS[li], ACC_FP64, WIDTH, BLOCK)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _dims(weights: list[torch.Tensor]) -> tuple[int, ...]:
    return (weights[0].shape[1], *(w.shape[0] for w in weights))


def _segments(total_rows: int, widths: list[int], like: torch.Tensor) -> list[torch.Tensor]:
    """Contiguous (rows, w) tensors, one per width, carved from one allocation; each starts
    128-byte aligned (so Triton's alignment specialisation does not depend on the row count).
    For the backward's internal dZ buffers: the saved tensors, which leave the launcher (as
    outputs of an autograd Function or a custom op), are allocated one each."""
    sizes = [triton.cdiv(total_rows * w, _ALIGN) * _ALIGN for w in widths]
    flat = like.new_empty(max(sum(sizes), 1))
    out, start = [], 0
    for w, size in zip(widths, sizes, strict=True):
        out.append(flat[start : start + total_rows * w].view(total_rows, w))
        start += size
    return out


def _common(x: torch.Tensor, dims: tuple[int, ...], hidden_act, out_act):
    precision = input_precision_for(x.dtype, x.device)
    width = padded_width(dims)
    cfg = launch_config(x.device, x.dtype, width)
    meta = dict(
        DIMS=dims, NUM_LAYERS=len(dims) - 1, HIDDEN_ACT=constexpr(hidden_act),
        OUT_ACT=constexpr(out_act), ACC_FP64=x.dtype == torch.float64,
        INPUT_PRECISION=precision, WIDTH=width, NC=min(cfg["CHUNK"], width),
    )  # fmt: skip
    return cfg, meta


def _launch_forward(x, y, zo, saved, weights, biases, slopes, cfg, meta, *, target=None,
                    partials=None, **flags) -> None:  # fmt: skip
    """One :func:`mlp_forward_kernel` launch (``flags``: its store / loss constexprs)."""
    M, L = x.shape[0], len(weights)
    t = x if target is None else target
    launch(
        mlp_forward_kernel, (triton.cdiv(M, cfg["BLOCK_M"]),), x, y, y if zo is None else zo,
        tuple(weights),
        tuple(w if b is None else b for w, b in zip(weights, biases, strict=True)),
        tuple(saved) if saved else (y,) * max(L - 1, 1), t, y if partials is None else partials,
        float(slopes[0]), float(slopes[1]), M, x.stride(0), x.stride(1), M * meta["DIMS"][-1],
        HAS_BIAS=tuple(b is not None for b in biases),
        STORE=bool(saved), BLOCK_M=cfg["BLOCK_M"], num_warps=cfg["num_warps"],
        num_stages=CHAIN_STAGES, **meta, **flags,
    )  # fmt: skip


def mlp_forward(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    hidden_act: str | None,
    out_act: str | None,
    slopes: tuple[float, float],
    *,
    store: tuple[bool, bool, bool],
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The MLP forward in one launch.

    Args:
        x: (M, k_0), any strides. weights: contiguous (n_l, k_l) with ``k_l = n_{l-1}``;
            biases: (n_l,) or ``None``. Every width <= :data:`MAX_WIDTH` (see :func:`supports`).
        hidden_act, out_act: registry names (or ``None``) of the hidden layers' and the last
            layer's activation; slopes: their leaky_relu slopes.
        store: ``(hidden, hidden_preact, out_preact)``: write the hidden layers' saved tensors
            (their z when ``hidden_preact``, else their y), and the last layer's z.
        out: a contiguous (M, n_{L-1}) tensor to write the output into.

    Returns:
        ``(y, saved)``: ``saved`` has one entry per layer: the hidden layers' (M, n_l) tensors
        (when stored) and the last layer's z (or ``None``); an empty list without ``store``.
    """
    M = x.shape[0]
    dims = _dims(weights)
    y = out if out is not None else x.new_empty((M, dims[-1]))
    store_hidden, hidden_preact, out_preact = store
    saved = [x.new_empty((M, w)) for w in dims[1:-1]] if store_hidden else []
    zo = x.new_empty((M, dims[-1])) if out_preact else None
    result = [*saved, zo] if store_hidden else []
    if M == 0:
        return y, result
    cfg, meta = _common(x, dims, hidden_act, out_act)
    _launch_forward(x, y, zo, saved, weights, biases, slopes, cfg, meta,
                    HIDDEN_PREACT=hidden_preact, STORE_OUT_PREACT=out_preact, LOSS="none",
                    LOSS_MEAN=False)  # fmt: skip
    return y, result


LOSS_MODES = ("value", "y")


def mlp_mse_forward(
    x: torch.Tensor,
    target: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    hidden_act: str | None,
    out_act: str | None,
    slopes: tuple[float, float],
    *,
    reduction: str,
    loss_dtype: torch.dtype,
    mode: str,
    hidden_preact: bool,
    out_preact: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
    """``mse(mlp(x), target)`` (``reduction`` ``"mean"`` or ``"sum"``) in two launches: the
    forward with the loss folded into the last layer's epilogue (each row tile's sum of
    squares into a partials buffer), then their fixed-order sum.

    Args:
        x, weights, biases, activations, slopes: as in :func:`mlp_forward`.
        target: (M, n_{L-1}), any float dtype (read in the accumulator dtype); made contiguous
            if it is not. loss_dtype: the loss's dtype.
        mode: what else is written: ``"value"`` nothing (no backward follows); ``"y"`` the
            hidden layers' saved tensors, y, and the last layer's z when ``out_preact`` (a
            backward then forms ``dY`` once the upstream gradient is known).
        hidden_preact / out_preact: the activations' derivatives read z (else y).

    Returns:
        ``(loss, y, saved)``: the 0-dim loss; y (M, n_{L-1}) (``None`` for ``"value"``);
        ``saved`` as :func:`mlp_forward` returns it with ``store`` (empty for ``"value"``).
    """
    if mode not in LOSS_MODES or reduction not in ("mean", "sum"):
        raise ValueError(f"mlp_mse_forward: mode {mode!r}, reduction {reduction!r}")
    M = x.shape[0]
    dims = _dims(weights)
    cfg, meta = _common(x, dims, hidden_act, out_act)
    grad = mode != "value"
    # VALUE_AS_Y: where the store-free "value" variant spills, the "y" one runs instead, into
    # scratch buffers that are dropped.
    stores = grad or bool(cfg.get("VALUE_AS_Y"))
    head = x.new_empty((M, dims[-1])) if stores else None
    saved = [x.new_empty((M, w)) for w in dims[1:-1]] if stores else []
    zo = x.new_empty((M, dims[-1])) if stores and out_preact else None
    result = [*saved, zo] if grad else []
    loss = torch.empty((), dtype=loss_dtype, device=x.device)
    if M == 0:  # the mean of no elements is NaN, as natively
        return loss.fill_(float("nan") if reduction == "mean" else 0.0), head, result
    tiles = triton.cdiv(M, cfg["BLOCK_M"])
    target = target.contiguous()
    partials = torch.empty(tiles, dtype=acc_dtype(x.dtype), device=x.device)
    _launch_forward(x, x if head is None else head, zo, saved, weights, biases, slopes, cfg,
                    meta, target=target, partials=partials, HIDDEN_PREACT=hidden_preact,
                    STORE_OUT_PREACT=zo is not None, LOSS="y" if stores else "value",
                    LOSS_MEAN=reduction == "mean")  # fmt: skip
    cuda = gpu_code(x.device)
    launch(
        mlp_loss_reduce_kernel, (1,), partials, loss, tiles, M * dims[-1], MEAN=reduction == "mean",
        BLOCK=REDUCE_BLOCK["cuda" if cuda else "interpreter"], num_warps=4,
    )  # fmt: skip
    if not grad:
        head = None
    return loss, head, result


def mlp_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weights: list[torch.Tensor],
    saved: list[torch.Tensor | None],
    out_saved: torch.Tensor | None,
    hidden_act: str | None,
    out_act: str | None,
    slopes: tuple[float, float],
    *,
    has_bias: tuple[bool, ...],
    hidden_preact: bool,
    need_dx: bool,
    need_params: bool,
    loss: tuple[torch.Tensor, torch.Tensor | None, str] | None = None,
    inject: list[torch.Tensor | None] | None = None,
    return_dz: bool = False,
) -> tuple:
    """Gradients of :func:`mlp_forward`, in 2 launches (one weight-gradient chunk) or 3.

    Args:
        grad_y: (M, n_{L-1}), any strides. x, weights, slopes, activations: as in the forward.
        saved: the hidden layers' saved tensors, contiguous (M, n_l) (z when
            ``hidden_preact``, else y). out_saved: the last layer's saved tensor, contiguous
            (M, n_{L-1}) (y or z, whatever ``out_act`` derives from; ``None`` without).
        has_bias: per layer. need_dx / need_params: which gradients to compute.
        loss: for the gradients of :func:`mlp_mse_forward`: ``(grad_loss, target,
            reduction)``, the loss's 0-dim upstream gradient; ``grad_y`` is then that
            forward's (contiguous) y (``target`` is made contiguous if it is not).
        inject: per layer, a gradient reaching its saved tensor (hidden: ``saved[l]``; last:
            its z when the output activation reads z), contiguous (M, n_l), or ``None``; with
            ``grad_y`` ``None`` these alone flow back (the second order's last step).
        return_dz: also return each layer's dZ (M, n_l), as the second order reads them.

    Returns:
        ``(dx (M, k_0), [dW_l], [db_l or None])`` (and ``[dZ_l]`` with ``return_dz``), fresh
        tensors; ``None`` where not needed. Deterministic (no atomics).
    """
    zero = grad_y is None  # only injected gradients flow back
    grad_y = x if zero else grad_y  # then any tensor of the dtype stands for it
    M = grad_y.shape[0]
    dims = _dims(weights)
    L = len(weights)
    dx = grad_y.new_empty((M, dims[0])) if need_dx else None
    dws = [torch.empty_like(w) for w in weights] if need_params else None
    dbs = [
        grad_y.new_empty(n) if b and need_params else None
        for n, b in zip(dims[1:], has_bias, strict=True)
    ]
    if return_dz:  # they leave the launcher: one allocation each
        dzs = [grad_y.new_empty((M, n)) for n in dims[1:]]
    else:
        dzs = _segments(M, list(dims[1:]), grad_y)
    result = (dx, dws, dbs if need_params else None, *((dzs,) if return_dz else ()))
    if M == 0:
        for t in [*(dws or []), *dbs]:
            if t is not None:
                t.zero_()
        return result
    g_mode, scale, target = "grad", grad_y, grad_y
    if loss is not None:
        g_mode, scale, target = "mse", loss[0], loss[1].contiguous()
    elif zero:
        g_mode = "zero"
    injs = [None] * L if inject is None else list(inject)
    cfg, meta = _common(grad_y, dims, hidden_act, out_act)
    ss = tuple(saved) if L > 1 else (grad_y,)
    launch(
        mlp_backward_kernel, (triton.cdiv(M, cfg["BLOCK_M"]),), grad_y,
        grad_y if out_saved is None else out_saved, grad_y if dx is None else dx,
        tuple(weights), ss, tuple(dzs), tuple(grad_y if t is None else t for t in injs), scale,
        target, float(slopes[0]), float(slopes[1]), M, grad_y.stride(0), grad_y.stride(1),
        M * dims[-1], NEED_DX=need_dx, G_MODE=g_mode,
        LOSS_MEAN=loss is not None and loss[2] == "mean",
        INJECT=tuple(t is not None for t in injs), HIDDEN_PREACT=hidden_preact,
        BLOCK_M=cfg["BLOCK_M"], num_warps=cfg["num_warps"], num_stages=CHAIN_STAGES, **meta,
    )  # fmt: skip
    if need_params:
        _weight_grads(x, ss, dzs, dws, dbs, slopes[0], has_bias, hidden_preact, cfg, meta)
    return result


def mlp_second_order(
    ddx: torch.Tensor,
    v: torch.Tensor,
    weights: list[torch.Tensor],
    saved: list[torch.Tensor | None],
    out_saved: torch.Tensor | None,
    dzs: list[torch.Tensor],
    hidden_act: str | None,
    out_act: str | None,
    slopes: tuple[float, float],
    *,
    hidden_preact: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor | None]]:
    """The second order of :func:`mlp_backward` for ``dL/d(dX) = ddx`` (contiguous (M, k_0)):
    ``(dL/dv, [dL/dW_l], [dL/ds_l or None])`` (``manualbp.ops.fused_mlp.reference_second_order``
    computes the same), in 2 launches (one weight-gradient chunk) or 3: :func:`mlp_rop_kernel`,
    then the weight-gradient step (and its reduction) on ``dZ_l^T a_{l-1}``.

    Args:
        v: the first order's upstream gradient (M, n_{L-1}), any strides. weights, saved,
            out_saved, activations, slopes, hidden_preact: as in :func:`mlp_backward`.
        dzs: the first order's dZ_l (M, n_l), contiguous (``mlp_backward(..., return_dz=True)``).
    """
    M, L = ddx.shape[0], len(weights)
    dims = _dims(weights)
    grad_v = v.new_empty((M, dims[-1]))
    grad_w = [torch.empty_like(w) for w in weights]
    grad_s: list[torch.Tensor | None] = [v.new_empty((M, n)) for n in dims[1:-1]]
    grad_s.append(None if out_act is None else v.new_empty((M, dims[-1])))
    if hidden_act is None:
        grad_s[:-1] = [None] * (L - 1)
    if M == 0:
        for t in grad_w:
            t.zero_()
        return grad_v, grad_w, grad_s
    cfg, meta = _common(v, dims, hidden_act, out_act)
    a_bufs = [v.new_empty((M, n)) for n in dims[1:-1]]
    dummy = (grad_v,)
    rows = cfg.get("ROP_BLOCK_M", cfg["BLOCK_M"])
    launch(
        mlp_rop_kernel, (triton.cdiv(M, rows),), ddx, v, grad_v,
        grad_v if out_saved is None else out_saved,
        grad_v if grad_s[-1] is None else grad_s[-1], tuple(weights),
        tuple(saved) if L > 1 else dummy, tuple(dzs), tuple(a_bufs) or dummy,
        tuple(grad_v if t is None else t for t in grad_s[:-1]) or dummy, float(slopes[0]),
        float(slopes[1]), M, v.stride(0), v.stride(1), BLOCK_M=rows,
        num_warps=cfg["num_warps"], num_stages=CHAIN_STAGES, **meta,
    )  # fmt: skip
    # dL/dW_l = dZ_l^T a_{l-1} (a_{-1} = ddx): the weight-gradient step with a in place of H
    # (read as is: no activation recomputed) and no bias.
    no_bias = (False,) * L
    _weight_grads(ddx, tuple(a_bufs) or dummy, dzs, grad_w, [None] * L, slopes[0], no_bias,
                  False, cfg, meta)  # fmt: skip
    return grad_v, grad_w, grad_s


def _weight_grads(x, ss, dzs, dws, dbs, hidden_slope, has_bias, hidden_preact, cfg, meta):
    """Launch the weight-gradient step (and the reduction when there is more than one chunk)."""
    M, L, width = x.shape[0], meta["NUM_LAYERS"], meta["WIDTH"]
    cuda = gpu_code(x.device)
    S, chunk = wgrad_splits(M, L, cfg["BLOCK_R"], cuda=cuda)
    direct = S == 1
    part = x.new_empty((1,) if direct else (L, S, width * (width + 1)), dtype=acc_dtype(x.dtype))
    db_args = tuple(dw if db is None else db for dw, db in zip(dws, dbs, strict=True))
    nc = min(cfg["WGRAD_CHUNK"], width)
    launch(
        mlp_wgrad_kernel, (S, L, (width // nc) ** 2), x, ss, tuple(dzs), tuple(dws), db_args,
        part, float(hidden_slope), M, x.stride(0),
        x.stride(1), chunk, S, DIMS=meta["DIMS"], HAS_BIAS=has_bias, NUM_LAYERS=L,
        HIDDEN_ACT=meta["HIDDEN_ACT"], HIDDEN_PREACT=hidden_preact, DIRECT=direct,
        ACC_FP64=meta["ACC_FP64"], INPUT_PRECISION=meta["INPUT_PRECISION"], WIDTH=width,
        NC=nc, BLOCK_R=cfg["BLOCK_R"], num_warps=cfg["wgrad_warps"], num_stages=WGRAD_STAGES,
    )  # fmt: skip
    if not direct:
        block = REDUCE_BLOCK["cuda" if cuda else "interpreter"]
        launch(
            mlp_wgrad_reduce_kernel, (triton.cdiv(width * (width + 1), block), L), part,
            tuple(dws), db_args, S, DIMS=meta["DIMS"], HAS_BIAS=has_bias, NUM_LAYERS=L,
            ACC_FP64=meta["ACC_FP64"], WIDTH=width, BLOCK=block, num_warps=4,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Audit cases (triton_kernels/audit.py): calls of the launchers on small CPU tensors, recorded
# --------------------------------------------------------------------------------------------
AUDIT_BY_PRECISION = True  # recorded again for TF32 tl.dot
call = functools.partial


MLP_LAYERS = 4


def audit_cases(dtype: torch.dtype, quick: bool) -> Iterator[tuple[str, Callable[[], object]]]:
    """The fused MLP: 4 layers at every shipped width, erf-GELU hidden layers (the heaviest:
    z stored, recomputed by the weight gradient), plain and with the MSE folded in (each mode);
    2048 rows, so that the weight gradient takes two chunks and their reduction."""
    cpu = torch.device("cpu")
    widths = shipped_widths(gpu_target(cpu)[0], dtype, input_precision_for(dtype, cpu))
    z = call(torch.zeros, dtype=dtype)
    for width in widths[-1:] if quick else widths:
        x, t, gy = z(2048, width), z(2048, width), z(2048, width)
        ws, bs = [z(width, width) for _ in range(MLP_LAYERS)], [z(width) for _ in range(MLP_LAYERS)]
        acts = dict(hidden_act="gelu", out_act=None, slopes=(0.01, 0.01))
        saved = [z(2048, width) for _ in range(MLP_LAYERS - 1)]
        bwd = call(mlp_backward, x=x, weights=ws, saved=saved, out_saved=None,
                   has_bias=(True,) * MLP_LAYERS, hidden_preact=True, need_dx=True,
                   need_params=True, **acts)  # fmt: skip
        label = f"{MLP_LAYERS}x{width}"
        yield label, call(mlp_forward, x, ws, bs, store=(True, True, False), **acts)
        yield label, call(bwd, gy)
        for mode in LOSS_MODES:
            yield f"{label} mse:{mode}", call(mlp_mse_forward, x, t, ws, bs, **acts,
                                              reduction="mean", loss_dtype=dtype, mode=mode,
                                              hidden_preact=True, out_preact=False)  # fmt: skip
        yield f"{label} mse", call(bwd, gy, loss=(z(()), t, "mean"))
        # The second order (an input gradient in the loss): the first-order backward keeping
        # dZ, the R-op with its weight gradients, and the backward with gradients injected.
        dzs = [z(2048, width) for _ in range(MLP_LAYERS)]
        yield f"{label} keep dz", call(bwd, gy, return_dz=True)
        if width <= ROP_MAX_WIDTH:
            yield f"{label} rop", call(mlp_second_order, x, gy, ws, saved, None, dzs,
                                       hidden_preact=True, **acts)  # fmt: skip
        yield f"{label} inject", call(bwd, gy, inject=[*saved, None])
