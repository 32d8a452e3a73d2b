"""manualbp.Linear and manualbp.MSELoss as stand-ins for nn.Linear and nn.MSELoss."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import manualbp
from tests.helpers import ACTIVATION_NAMES, assert_close_through_sum, native_activation


def test_linear_is_an_nn_linear_with_the_same_parameters_and_init():
    torch.manual_seed(3)
    ref = nn.Linear(31, 123)
    torch.manual_seed(3)
    ours = manualbp.Linear(31, 123)
    assert isinstance(ours, nn.Linear)
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]
    assert_close(ours.weight, ref.weight, rtol=0, atol=0)
    assert_close(ours.bias, ref.bias, rtol=0, atol=0)
    assert manualbp.Linear(4, 2, bias=False).bias is None


def test_device_and_dtype_factory_arguments():
    m = manualbp.Linear(3, 2, device="cpu", dtype=torch.float64)
    assert m.weight.dtype == torch.float64 and m.bias.device.type == "cpu"


def test_state_dict_loads_both_ways():
    ours, ref = manualbp.Linear(6, 4, activation="gelu"), nn.Linear(6, 4)
    ref.load_state_dict(ours.state_dict())
    assert_close(ref.weight, ours.weight, rtol=0, atol=0)
    ours2 = manualbp.Linear(6, 4)
    ours2.load_state_dict(nn.Linear(6, 4).state_dict())
    assert set(ours.state_dict()) == set(ref.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_forward_backward_match_native_module(activation):
    ours = manualbp.Linear(31, 17, activation=activation)
    ref = nn.Linear(31, 17)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 47, 31)
    y_ours, y_ref = ours(x), native_activation(activation)(ref(x))
    assert_close(y_ours, y_ref)
    y_ours.sum().backward()
    y_ref.sum().backward()
    z = ref(x).detach().requires_grad_()
    (dz,) = torch.autograd.grad(native_activation(activation)(z).sum(), z)
    dz = dz.reshape(-1, 17).abs()
    assert_close_through_sum(ours.weight.grad, ref.weight.grad, dz.mT @ x.reshape(-1, 31).abs())
    assert_close_through_sum(ours.bias.grad, ref.bias.grad, dz.sum(0))


def test_extra_repr_names_the_activation():
    assert repr(manualbp.Linear(3, 2)) == repr(nn.Linear(3, 2))
    assert "activation='gelu'" in repr(manualbp.Linear(3, 2, activation="gelu"))
    text = repr(manualbp.Linear(3, 2, activation="leaky_relu", negative_slope=0.2))
    assert "negative_slope=0.2" in text


def test_unknown_activation_fails_before_drawing_weights():
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        manualbp.Linear(3, 2, activation="swish")
    assert torch.equal(state, torch.get_rng_state())


def test_mse_loss_module_is_an_nn_mse_loss():
    loss = manualbp.MSELoss(reduction="sum")
    assert isinstance(loss, nn.MSELoss) and loss.reduction == "sum"
    x, t = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3)
    assert_close(loss(x, t), nn.MSELoss(reduction="sum")(x, t))


@pytest.mark.parametrize(
    "size_average,reduce", [(None, None), (True, None), (False, None), (None, False), (False, True)]
)
def test_mse_loss_legacy_arguments_and_warnings(size_average, reduce):
    with warnings.catch_warnings(record=True) as ours_w:
        warnings.simplefilter("always")
        ours = manualbp.MSELoss(size_average=size_average, reduce=reduce)
    with warnings.catch_warnings(record=True) as ref_w:
        warnings.simplefilter("always")
        ref = nn.MSELoss(size_average=size_average, reduce=reduce)
    assert ours.reduction == ref.reduction
    assert [str(w.message) for w in ours_w] == [str(w.message) for w in ref_w]


def test_mse_loss_unknown_reduction():
    x = torch.randn(3)
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        manualbp.MSELoss(reduction="avg")(x, x)


def test_legacy_backward_hook_sees_what_it_sees_natively():
    seen = {}
    for key, mod in (("native", nn.Linear(4, 3)), ("ours", manualbp.Linear(4, 3))):
        shapes = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation warning of the legacy hook
            mod.register_backward_hook(
                lambda m, gi, go, shapes=shapes: shapes.append([tuple(g.shape) for g in gi])
            )
            mod(torch.randn(2, 4, requires_grad=True)).sum().backward()
        seen[key] = shapes
    assert seen["ours"] == seen["native"]
