"""Shape errors as native PyTorch raises them, and every bias shape F.linear takes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import manualbp
from manualbp import functional
from manualbp.errors import ShapeError
from manualbp.testing import native_activation
from tests.helpers import clone_leaf, leaf

DT = torch.float64


def test_shape_error_is_a_value_error_and_a_runtime_error():
    assert issubclass(ShapeError, ValueError) and issubclass(ShapeError, RuntimeError)
    assert functional.ShapeError is ShapeError


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the size-mismatch warning, on purpose
        return fn()


_BAD_SHAPES = {
    "width": (lambda w, b: functional.linear(torch.randn(2, 5), w, b),
              lambda w, b: F.linear(torch.randn(2, 5), w, b)),
    "weight-3d": (lambda w, b: functional.linear(torch.randn(2, 3), w[None], b),
                  lambda w, b: F.linear(torch.randn(2, 3), w[None], b)),
    "bias": (lambda w, b: functional.linear(torch.randn(2, 3), w, b[:2]),
             lambda w, b: F.linear(torch.randn(2, 3), w, b[:2])),
    "input-0d": (lambda w, b: functional.linear(torch.tensor(1.0), w, b),
                 lambda w, b: F.linear(torch.tensor(1.0), w, b)),
    "mse": (lambda w, b: functional.mse_loss(torch.randn(3, 4), torch.randn(3, 5)),
            lambda w, b: F.mse_loss(torch.randn(3, 4), torch.randn(3, 5))),
    "head-width": (lambda w, b: functional.linear_mse_loss(torch.randn(2, 5), w, b,
                                                           torch.randn(2, 4)),
                   lambda w, b: F.mse_loss(F.linear(torch.randn(2, 5), w, b), torch.randn(2, 4))),
    "head-target": (lambda w, b: functional.linear_mse_loss(torch.randn(2, 3), w, b,
                                                            torch.randn(2, 7)),
                    lambda w, b: F.mse_loss(F.linear(torch.randn(2, 3), w, b), torch.randn(2, 7))),
    "module": (lambda w, b: manualbp.Linear(3, 4)(torch.randn(2, 7)),
               lambda w, b: nn.Linear(3, 4)(torch.randn(2, 7))),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_BAD_SHAPES))
def test_shape_errors_are_caught_by_except_runtime_error_as_natively(case):
    ours, native = _BAD_SHAPES[case]
    w = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    w0, b0 = w.detach().clone(), b.detach().clone()
    with pytest.raises(RuntimeError):
        _quiet(lambda: native(w, b))
    try:
        _quiet(lambda: ours(w, b))
    except RuntimeError as e:  # native code's handler catches ours
        assert isinstance(e, ShapeError) and isinstance(e, ValueError)
    else:
        pytest.fail("no error")
    # Nothing changed.
    assert torch.equal(w, w0) and torch.equal(b, b0)
    assert w.grad is None and b.grad is None


_BIAS_SHAPES = [(), (1,), (4,), (1, 4), (1, 1), (2, 4), (2, 1), (5, 2, 4), (1, 2, 4), (5, 1, 4),
                (1, 1, 4), (3, 4), (4, 1), (3,)]  # fmt: skip


def _native_or_error(fn):
    try:
        return fn(), None
    except RuntimeError as e:
        return None, e


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("input_shape", [(3,), (2, 3), (5, 2, 3)], ids=str)
@pytest.mark.parametrize("bias_shape", _BIAS_SHAPES, ids=str)
def test_every_bias_shape_as_native(bias_shape, input_shape, activation):
    x = leaf(torch.randn(input_shape, dtype=DT))
    w = leaf(torch.randn(4, 3, dtype=DT))
    b = leaf(torch.randn(bias_shape, dtype=DT))
    act = native_activation(activation, 0.01)
    xn, wn, bn = clone_leaf(x), clone_leaf(w), clone_leaf(b)
    want, error = _native_or_error(lambda: act(F.linear(xn, wn, bn)))
    if error is not None:
        with pytest.raises(RuntimeError):
            functional.linear(x, w, b, activation)
        assert b.grad is None
        return
    got = functional.linear(x, w, b, activation)
    assert_close(got, want)
    g = torch.randn_like(want)
    got.backward(g)
    want.backward(g)
    for ours, native in ((x, xn), (w, wn), (b, bn)):
        assert ours.grad.shape == ours.shape  # summed to the bias's own shape
        assert_close(ours.grad, native.grad)


@pytest.mark.parametrize("bias_shape", [(), (1,), (1, 4)], ids=str)
def test_vector_like_biases_keep_the_hand_written_backward(bias_shape):
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    b = torch.randn(bias_shape, requires_grad=True)
    y = functional.linear(x, w, b, "relu")
    names, fn = [], y.grad_fn
    while fn is not None:
        names.append(type(fn).__name__)
        fn = fn.next_functions[0][0] if fn.next_functions else None
    assert names[0] == "LinearFunctionBackward"
