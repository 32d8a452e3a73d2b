"""Outputs are freed as soon as the caller drops them, as native autograd frees them.

A Function that keeps its own output on ``ctx`` (other than through ``save_for_backward``)
makes a reference cycle ``output -> grad_fn (ctx) -> output``: the output, and the graph
behind it, then live until the garbage collector runs — on a GPU, activation memory held
past its last use. The native oracle (``F.linear`` + activation, ``F.mse_loss``) shows that a
plain reference drop frees it.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import manualbp
from manualbp import functional
from tests.helpers import ACTIVATION_NAMES, native_activation


@contextmanager
def gc_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def freed_on_drop(make: Callable[[], torch.Tensor]) -> bool:
    """Whether the tensor ``make()`` returns is freed by dropping the last reference alone."""
    with gc_off():
        out = make()
        ref = weakref.ref(out)
        del out
        return ref() is None


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_linear_output_freed_like_native(activation):
    x = torch.randn(5, 7, requires_grad=True)
    w = torch.randn(3, 7, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    assert freed_on_drop(lambda: native_activation(activation)(F.linear(x, w, b)))
    assert freed_on_drop(lambda: functional.linear(x, w, b, activation))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss_freed_like_native(reduction):
    x = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6)
    assert freed_on_drop(lambda: F.mse_loss(x, t, reduction=reduction))
    assert freed_on_drop(lambda: functional.mse_loss(x, t, reduction))


def test_modules_and_head_freed():
    torch.manual_seed(0)
    model = manualbp.convert(
        torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    )
    head = manualbp.LinearMSELoss(6, 3)
    x = torch.randn(4, 6, requires_grad=True)
    assert freed_on_drop(lambda: model(x))
    assert freed_on_drop(lambda: head(x, torch.randn(4, 3)))
