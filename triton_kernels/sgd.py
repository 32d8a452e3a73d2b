"""Multi-tensor SGD step: one kernel launch updates a whole list of same-dtype, same-device params.

How one launch covers many tensors. The launcher builds a small int64 *metadata* tensor on the
params' device holding, per tensor ``i`` of ``T``: the addresses (``data_ptr()``) of the param,
the gradient and the momentum buffer, the element count, the index of the tensor's first block,
and a flag "initialise the momentum buffer" (its buffer was ``None``); then, per block of
``BLOCK`` elements over all tensors, the index of the tensor the block belongs to. The launch
grid is the flattened list of (tensor, block) pairs: program ``pid`` reads its tensor index,
casts the stored addresses to typed pointers (``int64 -> tl.pointer_type``; this works in the
Triton interpreter too) and updates its block. No program is idle whatever the size mix.

The metadata depends only on addresses, sizes and flags, so it is cached (keyed by exactly those
values: a hit is always correct) and after the first step no host-to-device copy is needed for
it. Hyper-parameters travel in a small fp64 device tensor (Triton passes Python floats as fp32,
which would round an fp64 model's learning rate); a tensor ``lr`` is read on the device, so no
``.item()`` host sync happens. Arithmetic is fp32 for fp16/bf16/fp32 params and fp64 for fp64.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["sgd_step_", "supports"]

_CUDA_CFG = (1024, 4)  # (BLOCK, num_warps)
_INTERP_CFG = (64, 1)
_CACHE_SIZE = 32

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cfg() -> tuple[int, int]:
    return _INTERP_CFG if _interpreting() else _CUDA_CFG


@triton.jit(do_not_specialize=["T"])
def _sgd_kernel(
    p_witness, meta_ptr, hp_ptr, lr_ptr, T,
    HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, LR_TENSOR: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One block of one tensor. ``p_witness`` is any param of the group: only its pointer type
    is used, to type the addresses read from ``meta_ptr``. ``hp_ptr`` holds (fp64)
    ``lr, weight_decay, momentum, 1 - dampening``; ``lr_ptr`` a device lr when ``LR_TENSOR``."""
    pid = tl.program_id(0).to(tl.int64)
    T64 = T.to(tl.int64)
    t = tl.load(meta_ptr + 6 * T64 + pid)  # the block map follows the 6 per-tensor rows
    numel = tl.load(meta_ptr + 3 * T64 + t)
    block = pid - tl.load(meta_ptr + 4 * T64 + t)
    p_ptr = tl.load(meta_ptr + t).to(p_witness.dtype)
    g_ptr = tl.load(meta_ptr + T64 + t).to(p_witness.dtype)

    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        wd = tl.load(hp_ptr + 1).to(COMPUTE)
        g = g + wd * p
    if HAS_MOMENTUM:
        momentum = tl.load(hp_ptr + 2).to(COMPUTE)
        one_minus_damp = tl.load(hp_ptr + 3).to(COMPUTE)
        b_ptr = tl.load(meta_ptr + 2 * T64 + t).to(p_witness.dtype)
        init = tl.load(meta_ptr + 5 * T64 + t)
        # On the first step the buffer is freshly allocated (valid memory, arbitrary bits):
        # its value is loaded but replaced by the selects below.
        old = tl.load(b_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        old = tl.where(init != 0, 0.0, old)
        buf = tl.where(init != 0, g, old * momentum + one_minus_damp * g)
        tl.store(b_ptr + offs, buf.to(p_witness.dtype.element_ty), mask=mask)
        g = g + momentum * buf if NESTEROV else buf
    lr = tl.load(lr_ptr).to(COMPUTE) if LR_TENSOR else tl.load(hp_ptr).to(COMPUTE)
    p = p - lr * g
    tl.store(p_ptr + offs, p.to(p_witness.dtype.element_ty), mask=mask)


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


def _meta(
    params: list[Tensor], grads: list[Tensor], bufs: list[int], init: list[int], block: int
) -> tuple[Tensor, int]:
    """The metadata table (see module docstring) on the params' device, and the block count."""
    device = params[0].device
    p_addr = [p.data_ptr() for p in params]
    g_addr = [g.data_ptr() for g in grads]
    numels = [p.numel() for p in params]
    key = (device, block, tuple(p_addr), tuple(g_addr), tuple(bufs), tuple(numels), tuple(init))
    counts = [triton.cdiv(n, block) for n in numels]
    n_blocks = sum(counts)

    def make() -> Tensor:
        first, acc = [], 0
        for c in counts:
            first.append(acc)
            acc += c
        # Only O(tensors) values cross from the host; the O(blocks) block -> tensor map is
        # expanded on the device (output_size given: no host sync), so a miss stays cheap
        # for a model of billions of parameters.
        head = _to_device(p_addr + g_addr + bufs + numels + first + init, torch.int64, device)
        counts_dev = _to_device(counts, torch.int64, device)
        tensor_ids = torch.arange(len(counts), dtype=torch.int64, device=device)
        block_map = torch.repeat_interleave(tensor_ids, counts_dev, output_size=n_blocks)
        return torch.cat([head, block_map])

    return _cached(_meta_cache, key, make), n_blocks


def supports(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None]
) -> bool:
    """Whether :func:`sgd_step_` can take these tensors: one device and one floating dtype for
    all, dense, contiguous, same sizes, and (if given) buffers alike."""
    if not params:
        return True
    dev, dtype = params[0].device, params[0].dtype
    if dtype not in _FLOAT_DTYPES:
        return False
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        others = [g]
        if i < len(momentum_buffers) and momentum_buffers[i] is not None:
            others.append(momentum_buffers[i])
        for t in (p, *others):
            if t.layout != torch.strided or t.device != dev or t.dtype != dtype:
                return False
            if not t.is_contiguous() or t.numel() != p.numel():
                return False
    return True


def sgd_step_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """One ``torch.optim.SGD`` step over ``params`` in a single kernel launch.

    Per element, with ``g`` the gradient::

        g = -g if maximize
        g = g + weight_decay * p                      (if weight_decay != 0)
        if momentum != 0:
            buf = g                                   (first step: buffer is None)
            buf = momentum * buf + (1 - dampening) * g  (later steps)
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g

    All tensors must share one device and one floating dtype and be contiguous (see
    :func:`supports`); otherwise ``ValueError``. With ``momentum != 0``,
    ``momentum_buffers`` has one entry per param; each ``None`` entry is replaced, in the list,
    by a new buffer (the initialised momentum, as torch does). With ``momentum == 0`` it is
    ignored. ``lr`` may be a 1-element tensor (read on the device, no host sync).
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

    bufs: list[int] = []
    init: list[int] = []
    if use_momentum:
        for i, g in enumerate(grads):
            if momentum_buffers[i] is None:
                momentum_buffers[i] = torch.empty_like(g, memory_format=torch.contiguous_format)
                init.append(1)
            else:
                init.append(0)
            bufs.append(momentum_buffers[i].data_ptr())  # type: ignore[union-attr]
    else:
        bufs = [0] * len(params)
        init = [0] * len(params)

    block, warps = _cfg()
    meta, n_blocks = _meta(params, grads, bufs, init, block)
    if n_blocks == 0:
        return

    lr_tensor = isinstance(lr, Tensor)
    if lr_tensor:
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr_dev = lr.detach().to(device, non_blocking=True).reshape(())
        lr_value = 0.0
    else:
        lr_dev, lr_value = None, float(lr)
    hp_vals = (lr_value, float(weight_decay), float(momentum), 1.0 - float(dampening))
    hp = _cached(_hp_cache, (device, hp_vals), lambda: _to_device(list(hp_vals), torch.float64,
                                                                   device))  # fmt: skip

    compute = tl.float64 if dtype == torch.float64 else tl.float32
    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        _sgd_kernel[(n_blocks,)](
            params[0], meta, hp, lr_dev if lr_dev is not None else hp, len(params),
            HAS_WD=weight_decay != 0, HAS_MOMENTUM=use_momentum, NESTEROV=bool(nesterov),
            MAXIMIZE=bool(maximize), LR_TENSOR=lr_tensor, COMPUTE=compute, BLOCK=block,
            num_warps=warps,
        )  # fmt: skip
