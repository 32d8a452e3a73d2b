"""Route each op to the reference path or the Triton kernels.

Both backends expose the same four functions on 2-D / same-shape operands;
:mod:`manualbp._dispatch` chooses one per call. The Triton launchers are
imported only when first used, so ``import manualbp`` never needs a GPU.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor

from manualbp import _ops, reference
from manualbp._dispatch import Backend, resolve
from manualbp.activations import Activation


class _Triton:
    """The Triton kernels (as ``manualbp::`` custom ops) behind the reference signatures."""

    @staticmethod
    def linear_forward(x, weight, bias, act, negative_slope, *, store_preact):
        name = _ops.NO_ACTIVATION if act is None else act.name
        y, z = _ops.linear_forward(x, weight, bias, name, float(negative_slope), store_preact)
        return y, (z if store_preact else None)

    @staticmethod
    def linear_backward(grad_y, x, weight, saved, act, negative_slope, needs_grad):
        name = _ops.NO_ACTIVATION if act is None else act.name
        saved_is_output = act is not None and act.saved_for(negative_slope) == "output"
        grads = _ops.linear_backward(
            grad_y, x, weight, saved, name, float(negative_slope), saved_is_output,
            list(needs_grad),
        )  # fmt: skip
        return tuple(g if need else None for g, need in zip(grads, needs_grad, strict=True))


def as_rows(t: Tensor) -> Tensor:
    """``t`` (*, F) as a matrix (rows, F), a view where possible. ``reshape(-1, F)`` cannot
    infer the row count when F == 0, so the rows are counted explicitly."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def pick(*tensors: Tensor | None, differentiable: bool = False) -> Backend:
    """The backend for one call. ``differentiable``: the result must carry a graph
    (a backward being recorded for double backward), which only plain torch ops give.
    Inside ``torch.func`` transforms (vmap, grad) the reference path runs too: the
    kernels have no batching rules."""
    if differentiable or torch._C._are_functorch_transforms_active():
        return "reference"
    return resolve(*tensors)


def impl(backend: Backend) -> ModuleType | type[_Triton]:
    return reference if backend == "reference" else _Triton


__all__ = ["pick", "impl", "Activation"]
