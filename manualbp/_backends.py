"""Route each op to the reference path or the Triton kernels.

Both backends expose the same four functions on 2-D / same-shape operands;
:mod:`manualbp._dispatch` chooses one per call. The Triton launchers are
imported only when first used, so ``import manualbp`` never needs a GPU.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from manualbp import reference
from manualbp._dispatch import Backend, resolve
from manualbp.activations import Activation, saves


class _Triton:
    """The Triton launchers behind the reference path's signatures."""

    @staticmethod
    def linear_forward(x, weight, bias, act, negative_slope, *, store_preact):
        from triton_kernels.linear_forward import linear_forward

        name = None if act is None else act.name
        return linear_forward(x, weight, bias, name, negative_slope, store_preact=store_preact)

    @staticmethod
    def linear_backward(grad_y, x, weight, saved, act, negative_slope, needs_grad):
        from triton_kernels.linear_backward import linear_backward

        name = None if act is None else act.name
        return linear_backward(
            grad_y, x, weight, saved, name, negative_slope,
            saved_is_output=saves(act, negative_slope) == "output", needs_grad=needs_grad,
        )  # fmt: skip


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
