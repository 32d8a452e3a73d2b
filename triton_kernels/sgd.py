"""Multi-tensor SGD step: one kernel launch updates a whole list of same-dtype, same-device params.

How one launch covers many tensors. The grid is the flattened list of (tensor, block) pairs over
all tensors, ``BLOCK`` elements a block, so no program is idle whatever the size mix. The
launcher builds a *block map* on the params' device, one row of four int64 per block: ``(param
address, grad address, momentum-buffer address, 2 * elements_left + init)``, the addresses
advanced to the block's first element (``init``: the momentum buffer is new, its old value
unused). Program ``pid`` loads its row (four independent loads: one round trip) and casts the
addresses to typed pointers (``int64 -> tl.pointer_type``, which the interpreter runs too).

Bandwidth. A full block (``elements_left >= BLOCK``) takes an unmasked path; a tensor's last,
partial block is masked. When every address is 16-byte aligned (checked on the host; fresh
allocations are) the launch passes ``ALIGNED=True`` and the kernel marks the pointers
``tl.multiple_of(ptr, 16)``: blocks start at multiples of ``BLOCK`` elements, so full blocks
compile to 128-bit ``ld/st.global.v4`` (``v2.b64`` for fp64); otherwise scalar accesses.

The block map depends only on addresses, sizes, dtype and the ``init`` flags, so it is cached
(keyed by exactly those: a hit is always correct); a miss moves O(tensors) integers to the
device and expands them there (no host sync). Hyper-parameters travel in a small fp64 device
tensor (Triton passes Python floats as fp32, which would round an fp64 model's learning rate),
cached alike; a tensor ``lr`` is read on the device (no ``.item()``). Arithmetic is fp32 for
fp16/bf16/fp32 params and fp64 for fp64.

Streams. A cached tensor is made by work queued on the stream current at the miss, and when the
LRU evicts it the caching allocator hands its memory to later work on *that* stream without
waiting for any other: safe exactly when the tensor is only read on the stream that made it. So
the caches are keyed by the current stream too (:func:`_stream_key`): a step on another stream
makes its own block map and hyper-parameters there, once. No ``record_stream``, event or
``wait_stream`` is needed; the cost is one miss per stream and parameter set.
"""

from __future__ import annotations

import functools
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._host import FLOAT_DTYPES, gpu_code, interpreting, launch, on_device, unaligned
from ._host import stream_key as _stream_key  # a module global: tests patch it
from ._runtime import load, store, tl_acc_dtype

__all__ = ["CONFIGS", "launch_config", "sgd_step_", "supports"]

# Fixed launch configurations, as data (the audit compiles the "cuda" one). The interpreter's
# small block makes small test tensors span several blocks, full and partial.
CONFIGS: dict[str, dict[str, int]] = {
    "cuda": dict(BLOCK=1024, num_warps=4),
    "interpreter": dict(BLOCK=64, num_warps=1),
}
_CACHE_SIZE = 32
_ALIGN = 16  # bytes: the alignment of a 128-bit access


def launch_config(*, cuda: bool | None = None) -> dict[str, int]:
    """The CUDA launch config or the interpreter's (``cuda=None``: whichever this process runs)."""
    if cuda is None:
        cuda = not interpreting()
    return CONFIGS["cuda" if cuda else "interpreter"]


@triton.jit
def _typed_pointer(addr, witness, ALIGNED: tl.constexpr):
    """The int64 address ``addr`` as a pointer of ``witness``'s type, marked 16-byte aligned
    when ``ALIGNED``."""
    ptr = addr.to(witness.dtype)
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _sgd_block(
    p_ptr, g_ptr, b_ptr, n_left, init, lr, wd, momentum, one_minus_damp,
    MASKED: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The update of one block's ``BLOCK`` elements (the first ``n_left`` when ``MASKED``)."""
    offs = tl.max_contiguous(tl.arange(0, BLOCK), BLOCK)
    mask = offs < n_left
    p = load(p_ptr, offs, mask, COMPUTE, MASKED)
    g = load(g_ptr, offs, mask, COMPUTE, MASKED)
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        g = g + wd * p
    if HAS_MOMENTUM:
        # On the first step the buffer is freshly allocated (valid memory, arbitrary bits):
        # its value is loaded but replaced by the selects below.
        old = load(b_ptr, offs, mask, COMPUTE, MASKED)
        old = tl.where(init, 0.0, old)
        buf = tl.where(init, g, old * momentum + one_minus_damp * g)
        store(b_ptr, offs, buf, mask, MASKED)
        g = g + momentum * buf if NESTEROV else buf
    p = p - lr * g
    store(p_ptr, offs, p, mask, MASKED)


@triton.jit
def _sgd_kernel(
    p_witness, rows_ptr, hp_ptr, lr_ptr,
    HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, LR_TENSOR: tl.constexpr, ALIGNED: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One block of one tensor, described by row ``pid`` of the block map (module docstring).
    ``p_witness`` is any param of the group: only its pointer type is used, to type the row's
    addresses. ``hp_ptr`` holds (fp64) ``lr, weight_decay, momentum, 1 - dampening``;
    ``lr_ptr`` a device lr when ``LR_TENSOR``."""
    row = rows_ptr + tl.program_id(0).to(tl.int64) * 4
    # The row's loads are independent of each other and of the hyper-parameters' loads.
    p_addr = tl.load(row)
    g_addr = tl.load(row + 1)
    left_init = tl.load(row + 3)
    b_addr = tl.load(row + 2) if HAS_MOMENTUM else p_addr
    lr = tl.load(lr_ptr).to(COMPUTE) if LR_TENSOR else tl.load(hp_ptr).to(COMPUTE)
    wd = tl.load(hp_ptr + 1).to(COMPUTE) if HAS_WD else 0.0
    momentum = tl.load(hp_ptr + 2).to(COMPUTE) if HAS_MOMENTUM else 0.0
    one_minus_damp = tl.load(hp_ptr + 3).to(COMPUTE) if HAS_MOMENTUM else 0.0

    p_ptr = _typed_pointer(p_addr, p_witness, ALIGNED)
    g_ptr = _typed_pointer(g_addr, p_witness, ALIGNED)
    b_ptr = _typed_pointer(b_addr, p_witness, ALIGNED)
    n_left = left_init >> 1
    init = (left_init & 1) != 0
    if n_left >= BLOCK:
        _sgd_block(p_ptr, g_ptr, b_ptr, n_left, init, lr, wd, momentum, one_minus_damp,
                   False, HAS_WD, HAS_MOMENTUM, NESTEROV, MAXIMIZE, COMPUTE, BLOCK)  # fmt: skip
    else:
        _sgd_block(p_ptr, g_ptr, b_ptr, n_left, init, lr, wd, momentum, one_minus_damp,
                   True, HAS_WD, HAS_MOMENTUM, NESTEROV, MAXIMIZE, COMPUTE, BLOCK)  # fmt: skip


# Keyed by (device, stream, ...): see "Streams" in the module docstring.
_meta_cache: OrderedDict[tuple, Tensor] = OrderedDict()
_hp_cache: OrderedDict[tuple, Tensor] = OrderedDict()


def _to_device(values: list[int] | list[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    if device.type == "cuda":
        host = torch.tensor(values, dtype=dtype, pin_memory=True)
        return host.to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype, device=device)


def _cached(cache: OrderedDict[tuple, Tensor], key: tuple, make: Callable[[], Tensor]) -> Tensor:
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    value = make()
    cache[key] = value
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _block_map(
    params: list[Tensor], grads: list[Tensor], bufs: list[int], init: list[int], block: int,
    stream: int,
) -> tuple[Tensor, int]:  # fmt: skip
    """The block map (see module docstring), ``(n_blocks, 4)`` int64 on the params' device, made
    on (and cached for) the current stream, whose :func:`_stream_key` is ``stream``, and the
    block count."""
    device, dtype = params[0].device, params[0].dtype
    p_addr = [p.data_ptr() for p in params]
    g_addr = [g.data_ptr() for g in grads]
    numels = [p.numel() for p in params]
    key = (device, stream, dtype, block, tuple(p_addr), tuple(g_addr), tuple(bufs), tuple(numels),
           tuple(init))  # fmt: skip
    counts = [triton.cdiv(n, block) for n in numels]
    n_blocks = sum(counts)

    def make() -> Tensor:
        first = list(itertools.accumulate(counts, initial=0))[:-1]
        # Only O(tensors) values cross from the host; the O(blocks) rows are expanded on the
        # device (output_size given: no host sync), so a miss stays cheap for a model of
        # billions of parameters.
        head = _to_device(p_addr + g_addr + bufs + numels + first + init + counts, torch.int64,
                          device).view(7, len(params))  # fmt: skip
        p, g, b, numel, first_dev, init_dev, counts_dev = head.unbind(0)
        tensor = torch.arange(len(params), device=device)
        t = torch.repeat_interleave(tensor, counts_dev, output_size=n_blocks)
        start = (torch.arange(n_blocks, device=device) - first_dev[t]) * block  # elements
        byte = start * dtype.itemsize
        # Without momentum the buffer addresses are 0 and the third column is never read.
        rows = [p[t] + byte, g[t] + byte, b[t] + byte, (numel[t] - start) * 2 + init_dev[t]]
        return torch.stack(rows, dim=1).contiguous()

    return _cached(_meta_cache, key, make), n_blocks


def supports(params: list[Tensor], grads: list[Tensor],
             momentum_buffers: list[Tensor | None]) -> bool:  # fmt: skip
    """Whether :func:`sgd_step_` can take these tensors: one device and one floating dtype for
    all, dense, contiguous, same sizes, and (if given) buffers alike."""
    if not params:
        return True
    dev, dtype = params[0].device, params[0].dtype
    if dtype not in FLOAT_DTYPES:
        return False
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        buf = momentum_buffers[i] if i < len(momentum_buffers) else None
        for t in (p, g) if buf is None else (p, g, buf):
            if t.layout != torch.strided or t.device != dev or t.dtype != dtype:
                return False
            if not t.is_contiguous() or t.numel() != p.numel():
                return False
    return True


def sgd_step_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None], *,
              lr: float | Tensor, weight_decay: float, momentum: float, dampening: float,
              nesterov: bool, maximize: bool) -> None:  # fmt: skip
    """One ``torch.optim.SGD`` step over ``params`` in a single kernel launch.

    Per element, with ``g`` the gradient::

        g = -g if maximize
        g = g + weight_decay * p                      (if weight_decay != 0)
        if momentum != 0:
            buf = g                                   (first step: buffer is None)
            buf = momentum * buf + (1 - dampening) * g  (later steps)
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g

    All tensors share one device and floating dtype and are contiguous (:func:`supports`; else
    ``ValueError``). ``momentum_buffers`` (ignored without momentum): one entry per param, a
    ``None`` replaced in the list by a new buffer, as torch does. ``lr`` may be a 1-element
    tensor (read on the device, no host sync).
    """
    if len(grads) != len(params):
        raise ValueError(f"{len(params)} params but {len(grads)} grads")
    use_momentum = momentum != 0
    if use_momentum and len(momentum_buffers) != len(params):
        raise ValueError(f"{len(params)} params but {len(momentum_buffers)} momentum buffers")
    if not params:
        return
    if any(g.is_sparse for g in grads):
        raise RuntimeError("sgd_step_ does not support sparse gradients")
    if not supports(params, grads, momentum_buffers if use_momentum else []):
        raise ValueError(
            "sgd_step_ needs contiguous, dense params/grads/buffers of one floating dtype on one "
            "device (split the lists by device and dtype first)"
        )
    device, dtype = params[0].device, params[0].dtype

    bufs, init = [0] * len(params), [0] * len(params)
    if use_momentum:
        for i, g in enumerate(grads):
            if momentum_buffers[i] is None:
                momentum_buffers[i] = torch.empty_like(g, memory_format=torch.contiguous_format)
                init[i] = 1
            bufs[i] = momentum_buffers[i].data_ptr()  # type: ignore[union-attr]

    cfg = launch_config(cuda=gpu_code(device))
    block = cfg["BLOCK"]
    stream = _stream_key(device)
    rows, n_blocks = _block_map(params, grads, bufs, init, block, stream)
    if n_blocks == 0:
        return
    # Blocks start at multiples of BLOCK elements: 16-byte aligned whenever the bases are.
    addrs = [p.data_ptr() for p in params] + [g.data_ptr() for g in grads]
    aligned = (block * dtype.itemsize) % _ALIGN == 0 and all(
        a % _ALIGN == 0 for a in addrs + (bufs if use_momentum else [])
    )

    lr_tensor = isinstance(lr, Tensor)
    if lr_tensor and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    lr_dev = lr.detach().to(device, non_blocking=True).reshape(()) if lr_tensor else None
    lr_value = 0.0 if lr_tensor else float(lr)
    hp_vals = (lr_value, float(weight_decay), float(momentum), 1.0 - float(dampening))
    hp = _cached(_hp_cache, (device, stream, hp_vals),
                 lambda: _to_device(list(hp_vals), torch.float64, device))  # fmt: skip

    with on_device(device):
        launch(
            _sgd_kernel, (n_blocks,), params[0], rows, hp, lr_dev if lr_dev is not None else hp,
            HAS_WD=weight_decay != 0, HAS_MOMENTUM=use_momentum, NESTEROV=bool(nesterov),
            MAXIMIZE=bool(maximize), LR_TENSOR=lr_tensor, ALIGNED=aligned,
            COMPUTE=tl_acc_dtype(dtype), BLOCK=block, num_warps=cfg["num_warps"],
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Audit cases (triton_kernels/audit.py): calls of the launchers on small CPU tensors, recorded
# --------------------------------------------------------------------------------------------
AUDIT_BY_PRECISION = False  # recorded again for TF32 tl.dot
call = functools.partial


def audit_cases(dtype: torch.dtype, quick: bool) -> Iterator[tuple[str, Callable[[], object]]]:
    """The multi-tensor SGD step: its main constexpr combinations, aligned, and the heaviest at
    an odd offset (scalar accesses)."""

    def step(aligned: bool = True, lr: float | Tensor = 0.1, **hyper: Any) -> None:
        make = call(torch.zeros if aligned else unaligned, dtype=dtype)
        hyper = dict(weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False,
                     maximize=False) | hyper  # fmt: skip
        sgd_step_([make(2048), make(1000)], [make(2048), make(1000)], [None, None], lr=lr,
                      **hyper)  # fmt: skip

    lr = torch.tensor(0.1)
    heaviest = dict(lr=lr, weight_decay=0.01, momentum=0.9, nesterov=True, maximize=True)
    yield "nesterov wd maximize lr_tensor", call(step, **heaviest)
    if not quick:
        yield "plain", step
        yield "wd lr_tensor", call(step, lr=lr, weight_decay=0.01)
        yield "momentum", call(step, momentum=0.9)
        yield "nesterov wd maximize lr_tensor unaligned", call(step, False, **heaviest)
