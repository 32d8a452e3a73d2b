"""Bad input gets a clear error naming what is wrong, and changes nothing."""

from __future__ import annotations

import contextlib

import pytest
import torch

import manualbp
from manualbp import functional


@pytest.fixture
def params():
    w = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    return w, b


def _unchanged(w, b, w0, b0):
    assert torch.equal(w, w0) and torch.equal(b, b0)
    assert w.grad is None and b.grad is None


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda w, b: (torch.randn(2, 5), w, b), ValueError,
         r"mat1 and mat2 shapes cannot be multiplied \(2x5 and 3x4\): input.shape\[-1\] \(5\) "
         "must equal"),
        (lambda w, b: (torch.randn(2, 3), w[None], b), ValueError, "weight must be 2-D"),
        (lambda w, b: (torch.randn(2, 3), w, b[:2]), ValueError, r"bias must have shape \(4,\)"),
        (lambda w, b: (torch.tensor(1.0), w, b), ValueError, "at least 1D"),
        # Native's own op and error (a RuntimeError, as natively: not a TypeError).
        (lambda w, b: (torch.randn(2, 3).double(), w, b), RuntimeError, "same dtype"),
        (lambda w, b: (torch.ones(2, 3, dtype=torch.long), w, b), RuntimeError, "same dtype"),
        (lambda w, b: (torch.randn(2, 3, device="meta"), w, b), RuntimeError, "device"),
        (lambda w, b: ([[1.0, 2.0, 3.0]], w, b), TypeError, "input must be a Tensor"),
    ],
)  # fmt: skip
def test_linear_bad_arguments(params, make_args, error, match):
    w, b = params
    w0, b0 = w.detach().clone(), b.detach().clone()
    with pytest.raises(error, match=match):
        functional.linear(*make_args(w, b))
    _unchanged(w, b, w0, b0)


def test_linear_unknown_activation_and_bad_slope(params):
    w, b = params
    expected = r"unknown activation 'swish'; expected one of None, 'relu'"
    with pytest.raises(ValueError, match=expected):
        functional.linear(torch.randn(2, 3), w, b, "swish")
    with pytest.raises(TypeError, match="negative_slope must be a real number"):
        functional.linear(torch.randn(2, 3), w, b, "leaky_relu", negative_slope="0.1")


def test_module_rejects_wrong_input_width():
    m = manualbp.Linear(3, 4)
    with pytest.raises(ValueError, match=r"input.shape\[-1\] \(7\) must equal in_features"):
        m(torch.randn(2, 7))


@pytest.mark.parametrize(
    "x,t,error,match",
    [
        (torch.randn(3, 4), torch.randn(3, 5), ValueError,
         r"the size of tensor a \(4\) must match the size of tensor b \(5\) at non-singleton "
         "dimension 1: input of shape"),
        # Native's own op and error (NotImplementedError is a RuntimeError).
        (torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long), NotImplementedError,
         "not implemented for 'Long'"),
        (torch.randn(3), torch.randn(3, device="meta"), RuntimeError, "device"),
        (torch.randn(3), [1.0, 2.0, 3.0], TypeError, "target must be a Tensor"),
    ],
)  # fmt: skip
def test_mse_bad_arguments(x, t, error, match):
    size_differs = isinstance(t, torch.Tensor) and t.shape != x.shape
    warns = pytest.warns(UserWarning) if size_differs else contextlib.nullcontext()
    with pytest.raises(error, match=match), warns:
        functional.mse_loss(x, t)


def test_mse_unknown_reduction():
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        functional.mse_loss(torch.randn(3), torch.randn(3), reduction="avg")


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu"])
def test_in_place_change_of_a_saved_tensor_is_caught(activation):
    # Natively and here alike: backward refuses a saved tensor changed in place.
    x0 = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)
    x = x0 * 1  # a non-leaf that Linear saves for dW
    y = functional.linear(x, w, None, activation)
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    if activation in ("tanh", "relu"):  # these save their output
        y = functional.linear(x0, w, None, activation)
        y.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.parametrize("shape", [(5, 3), (2, 5, 3), (3,)])
def test_output_can_be_modified_in_place_like_native(shape):
    # e.g. nn.ReLU(inplace=True) after the layer, or a residual ``y += x``.
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)
    y = functional.linear(x, w, None, None)
    y.add_(1)
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(y).reshape(-1, 4).mT @ x.detach().reshape(-1, 3))
