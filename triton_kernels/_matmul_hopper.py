"""The Hopper (sm_90+) GEMM path: a persistent, TMA-fed GEMM with the fused Linear epilogue.

``C = epilogue(A @ B)`` for A (M, K) and B (K, N), the contract of the pointer kernels of
:mod:`._matmul` and :mod:`.linear`, built the Hopper way:

* **persistent grid**: one program per SM, looping over output tiles in grouped order (L2
  reuse); Triton flattens the tile and K loops so the next tile's loads overlap this epilogue;
* **tensor descriptors** (TMA, ``triton.tools.tensor_descriptor.TensorDescriptor``) for every
  load and store, made on the host: the hardware clips and zero-fills the tile edges, so the
  main loop has no masks and no address arithmetic;
* **epilogue subtiling**: the accumulator is split into two (BLOCK_M, BLOCK_N / 2) halves, each
  biased, activated and stored on its own (half the registers and store buffer);
* **warp specialisation**: the tile loop's ``tl.range(..., warp_specialize=WARP_SPECIALIZE)``,
  off in every shipped config. On sm_90 neither supported Triton specialises this loop: with
  8 warps 3.6 and 3.9 compile it to the very same PTX as without, with 4 warps their Hopper
  pass (``NVGPUWarpSpecialization``) fails ("descriptor block and tensor must have the same
  number of elements"). The switch stays so that a Triton that does it needs a config entry,
  not a new kernel.

TMA reads 2-D row-major boxes: a 16-byte aligned base and row stride, a unit last stride. An
operand stored transposed is read through a descriptor on its transpose and transposed back in
registers (``A_T`` / ``B_T``), so ``x @ W^T``, ``dZ @ W`` (dX) and ``dZ^T @ X`` (dW) need no
copies (in TF32 only the forward: an MN-major fp32 operand takes a trip through registers per K
step). :func:`tma_eligible` decides; everything else (sm_80, the interpreter, fp64, IEEE fp32,
misaligned or overlapping views) stays on the pointer kernels. Accumulation is fp32. The config
is tuned per size bucket (:func:`~._tuning.tuned_launch`); each config's launch builds its own
descriptors (their boxes are its block shapes).

The interpreter executes tensor descriptors, so tests run these launchers on the CPU (with
:data:`INTERPRETER_CONFIG`); what only the GPU shows (TMA, wgmma, spills) is in the audit.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._activations import apply_activation, constexpr, slope_as
from ._host import target
from ._runtime import cast_out, dtype_class, input_precision_for, size_bucket, smem_limit
from ._tuning import tuned_launch

__all__ = ["HOPPER_CONFIGS", "INTERPRETER_CONFIG", "hopper_configs_for", "launch_gemm",
           "matmul_tma", "matmul_tma_kernel", "tma_eligible", "tma_layout",
           "tma_supported"]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Configs, as data: (dtype class, fused epilogue) -> the configs the autotuner tries.
#
# BLOCK_K is 128 bytes of operand (64 fp16/bf16, 32 fp32), the TMA box's 128-byte swizzle.
# With 8 warps, two warpgroups split BLOCK_M: 128x256 keeps 128 fp32 accumulator elements
# per thread. An activation epilogue needs registers next to the accumulator, so its lists
# stop at 128x128 (64 per thread): 128x256 w8 with an erf-GELU or SiLU epilogue compiles
# without spills but at 239-255 registers (no margin), 128x128 w4 at 233-255. The
# epilogue-free lists (plain GEMMs, dX/dW, a Linear without activation, bias or not) are
# uncapped. Shared memory: stages x (A + B tile) + one half-tile store buffer; 227 KiB on
# H100/H200. Every entry is compiled by the audit for sm_90 under Triton 3.6 and 3.9 (TMA
# loads and stores, wgmma, 0 spills required).
# ---------------------------------------------------------------------------------------------
def _cfg(m: int, n: int, k: int, warps: int, stages: int, ws: bool = False,
         group: int = 8) -> dict[str, int]:  # fmt: skip
    return dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=group, WARP_SPECIALIZE=ws,
                num_warps=warps, num_stages=stages)  # fmt: skip


HOPPER_CONFIGS: dict[tuple[str, bool], list[dict[str, int]]] = {
    ("fp16", False): [_cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(64, 128, 64, 4, 4)],
    ("fp16", True): [_cfg(128, 128, 64, 8, 4), _cfg(64, 128, 64, 4, 4)],
    ("tf32", False): [_cfg(128, 256, 32, 8, 3), _cfg(128, 128, 32, 8, 4), _cfg(64, 128, 32, 4, 4)],
    ("tf32", True): [_cfg(128, 128, 32, 8, 4), _cfg(64, 128, 32, 4, 4)],
}
# The one config used under the CPU interpreter (tests): small blocks so that odd shapes span
# several tiles, and a 3-program "persistent grid" so that programs loop over tiles.
INTERPRETER_CONFIG: dict[str, int] = dict(
    BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, WARP_SPECIALIZE=False, num_warps=4,
    num_stages=1,
)  # fmt: skip
INTERPRETER_NUM_SMS = 3
# Input dtypes the TMA path takes (fp32 only with TF32 tl.dot).
TMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def smem_estimate(cfg: dict[str, int], elsize: int, out_elsize: int = 0,
                  accumulate: bool = False) -> int:  # fmt: skip
    """Shared memory: the pipelined operand buffers plus a half-tile output buffer of
    ``out_elsize`` bytes an element (default ``elsize``), two when ``accumulate`` (C's tile is
    loaded too: an fp32 C doubles the epilogue's share)."""
    operands = cfg["num_stages"] * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * elsize
    half_tile = cfg["BLOCK_M"] * (cfg["BLOCK_N"] // 2) * (out_elsize or elsize)
    return operands + half_tile * (2 if accumulate else 1)


def hopper_configs_for(
    arch: int, dtype: torch.dtype, input_precision: str, *, epilogue: bool,
    out_dtype: torch.dtype | None = None, accumulate: bool = False,
) -> list[dict[str, int]]:  # fmt: skip
    """The shipped configs for ``dtype`` inputs (fp16/bf16, or fp32 with ``"tf32"``), with or
    without an activation ``epilogue``, writing (``accumulate``: reading and writing) an
    ``out_dtype`` output (default ``dtype``), that fit ``arch``'s shared memory (may be
    empty)."""
    cls = dtype_class(dtype, input_precision)
    if cls not in ("fp16", "tf32"):
        return []
    elsize = torch.empty((), dtype=dtype).element_size()
    out = torch.empty((), dtype=out_dtype or dtype).element_size()
    limit = smem_limit(arch)
    return [c for c in HOPPER_CONFIGS[(cls, epilogue)]
            if smem_estimate(c, elsize, out, accumulate) <= limit]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Eligibility
# ---------------------------------------------------------------------------------------------
def tma_layout(t: torch.Tensor) -> bool | None:
    """How a TMA descriptor reads the 2-D tensor ``t``: ``False`` row-major (unit column
    stride), ``True`` through its transpose (unit row stride), ``None`` neither: a misaligned
    base or outer stride, no unit stride, an outer stride that overlaps rows (stride 0 of an
    expanded tensor included), or an empty tensor."""
    if t.dim() != 2 or t.numel() == 0 or t.data_ptr() % 16:
        return None
    es = t.element_size()
    rows, cols = t.stride()
    if cols == 1 and rows >= max(t.shape[1], 1) and (rows * es) % 16 == 0:
        return False
    if rows == 1 and cols >= max(t.shape[0], 1) and (cols * es) % 16 == 0:
        return True
    return None


def tma_supported(arch: int, input_precision: str, operands: tuple[torch.Tensor, torch.Tensor],
                  outputs: tuple[torch.Tensor, ...], *, epilogue: bool = False,
                  accumulate: bool = False) -> bool:  # fmt: skip
    """The device-independent half of :func:`tma_eligible`: compute capability ``arch`` 9.0+,
    fp16/bf16 inputs or fp32 ones under TF32 ``input_precision``, both operands TMA-readable
    and every output row-major (:func:`tma_layout`), and a shipped config of the class
    (``epilogue``: with an activation) that fits ``arch``'s shared memory. TF32 also needs
    both operands K-major (A row-major, B read through its transpose): an MN-major fp32
    operand reaches wgmma only through registers, a shared-memory round trip per K step."""
    a, b = operands
    if arch < 90 or a.dtype not in TMA_DTYPES:
        return False
    a_t, b_t = tma_layout(a), tma_layout(b)
    if a_t is None or b_t is None or any(tma_layout(t) is not False for t in outputs):
        return False
    if input_precision == "tf32" and (a_t or not b_t):
        return False
    return bool(hopper_configs_for(arch, a.dtype, input_precision, epilogue=epilogue,
                                   out_dtype=outputs[0].dtype, accumulate=accumulate))  # fmt: skip


def tma_eligible(operands: tuple[torch.Tensor, torch.Tensor], outputs: tuple[torch.Tensor, ...],
                 *, epilogue: bool = False, accumulate: bool = False) -> bool:  # fmt: skip
    """Whether the Hopper path runs a GEMM on ``operands`` (A, B) into ``outputs``
    (``accumulate``: adding to the first): GPU code (not the interpreter) and
    :func:`tma_supported` for the device and ``tl.dot`` precision."""
    device = operands[0].device
    gpu = target(device)
    if gpu is None:
        return False
    precision = input_precision_for(operands[0].dtype, device)
    return tma_supported(gpu[0], precision, operands, outputs, epilogue=epilogue,
                         accumulate=accumulate)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Device code
# ---------------------------------------------------------------------------------------------
@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row-block, column-block) of output tile ``tile_id`` in grouped order."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
    if INPUT_PRECISION == "upcast_ieee":
        # CPU interpreter only: it has no bf16 dot, so multiply the fp32 upcasts.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)


@triton.jit
def _store_half(
    acc, off_m, off_n,
    c_desc, z_desc, bias_ptr,
    stride_bias,
    negative_slope,
    N, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr,
    ACCUMULATE: tl.constexpr, HALF_N: tl.constexpr,
):  # fmt: skip
    """Epilogue of one (BLOCK_M, BLOCK_N / 2) half: bias, pre-activation store, activation (or,
    ``ACCUMULATE``, the sum with C's current tile: C += A @ B, C fp32 for 16-bit A and B)."""
    if ACCUMULATE:
        acc += c_desc.load([off_m, off_n]).to(tl.float32)
    if HAS_BIAS:
        offs_n = off_n + tl.arange(0, HALF_N)
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    # Round z to the output dtype before the activation, as native Linear + activation does.
    z = cast_out(acc, c_desc.dtype)
    if STORE_PREACT:
        z_desc.store([off_m, off_n], z)
    if ACTIVATION == "none":
        c_desc.store([off_m, off_n], z)
    else:
        y = apply_activation(z.to(tl.float32), slope_as(negative_slope, tl.float32), ACTIVATION)
        c_desc.store([off_m, off_n], cast_out(y, c_desc.dtype))


@triton.jit
def matmul_tma_kernel(
    a_desc, b_desc, c_desc, z_desc, bias_ptr,
    negative_slope: tl.float64,
    M, N, K,
    stride_bias,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr,
    ACCUMULATE: tl.constexpr, A_T: tl.constexpr, B_T: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):  # fmt: skip
    """``C = act(A @ B + bias)`` (and ``Z = A @ B + bias``) over a persistent grid.

    ``a_desc`` reads A (M, K) in (BLOCK_M, BLOCK_K) boxes, or A^T (K, M) in (BLOCK_K, BLOCK_M)
    boxes when ``A_T``; ``b_desc`` reads B (K, N) in (BLOCK_K, BLOCK_N) boxes, or B^T (N, K) in
    (BLOCK_N, BLOCK_K) boxes when ``B_T``; ``c_desc`` / ``z_desc`` write (BLOCK_M, BLOCK_N / 2)
    boxes. ``bias_ptr`` (N,) is read only when ``HAS_BIAS``, ``z_desc`` only used when
    ``STORE_PREACT``.
    """
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    # The epilogue recomputes its tile from a counter of its own (as Triton's persistent
    # matmul tutorial does), so the flattened loop's prologue and epilogue stay independent.
    tile_id_c = start_pid - NUM_SMS
    for tile_id in tl.range(
        start_pid, num_tiles, NUM_SMS, flatten=True, warp_specialize=WARP_SPECIALIZE
    ):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = a_desc.load([off_k, off_m]).T if A_T else a_desc.load([off_m, off_k])
            b = b_desc.load([off_n, off_k]).T if B_T else b_desc.load([off_k, off_n])
            acc = _dot(a, b, acc, INPUT_PRECISION)
        tile_id_c += NUM_SMS
        pid_m, pid_n = _tile_coords(tile_id_c, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        # Epilogue subtiling: two (BLOCK_M, BLOCK_N / 2) halves, stored one after the other.
        acc = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        acc0, acc1 = tl.split(acc)
        # The string constexpr ACTIVATION is passed on its own: compiled code cannot put it in
        # a tuple (Triton 3.6 and 3.9: "cannot convert gelu of type str to tensor").
        for_half = (c_desc, z_desc, bias_ptr, stride_bias, negative_slope, N, HAS_BIAS)
        _store_half(acc0, off_m, off_n, *for_half, ACTIVATION, STORE_PREACT, ACCUMULATE,
                    BLOCK_N // 2)  # fmt: skip
        _store_half(acc1, off_m, off_n + BLOCK_N // 2, *for_half, ACTIVATION, STORE_PREACT,
                    ACCUMULATE, BLOCK_N // 2)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _descriptor(t: torch.Tensor, transposed: bool, block: list[int]) -> TensorDescriptor:
    """A descriptor on ``t`` (on ``t.T`` when ``transposed``) reading ``block`` boxes."""
    base = t.t() if transposed else t
    return TensorDescriptor(base, list(base.shape), list(base.stride()), block)


def launch_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, z: torch.Tensor | None,
                bias: torch.Tensor | None, activation: str | None, negative_slope: float,
                accumulate: bool = False) -> None:  # fmt: skip
    """``c = act(a @ b + bias)`` (``z = a @ b + bias`` too, if given; ``c += a @ b`` when
    ``accumulate``) on the Hopper path, every shape non-empty, operands TMA-readable and outputs
    row-major (:func:`tma_eligible`), with the config kept for its bucket (each config's launch
    builds its own descriptors: nothing of a call is left on a shared object). The Linear
    forward is ``launch_gemm(x, weight.t(), y, z, bias, activation, slope)``."""
    M, K = a.shape
    N = b.shape[1]
    a_t, b_t = tma_layout(a), tma_layout(b)
    outputs = [t for t in (c, z) if t is not None]
    if a_t is None or b_t is None or any(tma_layout(t) is not False for t in outputs):
        raise ValueError("operands not TMA-readable or outputs not row-major: see tma_eligible")
    gpu = target(a.device)
    precision = input_precision_for(a.dtype, a.device)
    sms = INTERPRETER_NUM_SMS if gpu is None else gpu[1]
    meta = dict(HAS_BIAS=bias is not None, ACTIVATION=constexpr(activation),
                STORE_PREACT=z is not None, ACCUMULATE=accumulate, A_T=a_t, B_T=b_t,
                INPUT_PRECISION=precision, NUM_SMS=sms)  # fmt: skip

    def make(cfg: dict[str, Any]) -> tuple[tuple[int], tuple, dict[str, Any]]:
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        c_desc = _descriptor(c, False, [bm, bn // 2])
        args = (
            _descriptor(a, a_t, [bk, bm] if a_t else [bm, bk]),
            _descriptor(b, b_t, [bn, bk] if b_t else [bk, bn]),
            c_desc, c_desc if z is None else _descriptor(z, False, [bm, bn // 2]),
            c if bias is None else bias,  # dummy pointer, never read without HAS_BIAS
            float(negative_slope), M, N, K, 0 if bias is None else bias.stride(0),
        )  # fmt: skip
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        return (min(sms, tiles),), args, {**meta, **cfg}

    if gpu is None:
        cfgs = [INTERPRETER_CONFIG]
    else:
        cfgs = hopper_configs_for(gpu[0], a.dtype, precision, epilogue=activation is not None,
                                  out_dtype=c.dtype, accumulate=accumulate)  # fmt: skip
    flags = "".join(str(int(v)) for k, v in meta.items() if isinstance(v, bool))
    key = f"{a.dtype}|{precision}|{meta['ACTIVATION']}|{flags}|{size_bucket(M, N, K)}"
    tuned_launch(matmul_tma_kernel, key, cfgs, make, a.device,
                 restore=(c,) if accumulate else ())  # timing must not add into C  # fmt: skip


def matmul_tma(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False
) -> torch.Tensor:
    """``a @ b`` on the Hopper path for 2-D ``a`` (M, K), ``b`` (K, N) of one dtype, each
    TMA-readable (:func:`tma_layout`; check :func:`tma_eligible` first on a GPU), into ``out``
    (row-major, any float dtype) or a new contiguous (M, N) tensor; ``accumulate``: ``out +=
    a @ b``. K == 0 gives zeros (``out`` unchanged when accumulating); an empty output launches
    nothing."""
    M, K = a.shape
    N = b.shape[1]
    c = out if out is not None else torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0 or (K == 0 and accumulate):
        return c
    if K == 0:
        return c.zero_()
    launch_gemm(a, b, c, None, None, None, 0.0, accumulate)
    return c
