"""manualbp.convert: an existing model, after the swap, trains exactly as before."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import manualbp


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(13, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3),
    )  # fmt: skip


def test_swaps_in_place_keeping_parameters_and_keys():
    model = _mlp()
    params_before = [id(p) for p in model.parameters()]
    keys_before = list(model.state_dict())
    out = manualbp.convert(model)
    assert out is model
    assert [id(p) for p in model.parameters()] == params_before
    assert list(model.state_dict()) == keys_before
    assert type(model) is manualbp.Sequential
    assert [type(m).__name__ for m in model] == [
        "Linear", "GELU", "Linear", "ReLU", "Linear", "Tanh", "Linear",
    ]  # fmt: skip
    assert all(type(m) is manualbp.Linear for m in model[::2])
    # Fused in the container; the modules themselves keep no activation.
    assert [m.activation for m in model[::2]] == [None] * 4
    assert model.fused_pairs() == [("0", "1"), ("2", "3"), ("4", "5")]
    assert "fused=[0+1, 2+3, 4+5]" in repr(model)


def test_without_fusion_activations_stay():
    model = manualbp.convert(_mlp(), fuse_activations=False)
    assert type(model) is nn.Sequential
    assert type(model[1]) is nn.GELU and model[0].activation is None


def test_same_outputs_grads_and_50_sgd_steps_as_native():
    torch.manual_seed(0)
    native = _mlp()
    ours = manualbp.convert(copy.deepcopy(native))
    loss_native, loss_ours = nn.MSELoss(), manualbp.convert(nn.MSELoss())
    assert type(loss_ours) is manualbp.MSELoss
    opt_n = torch.optim.SGD(native.parameters(), lr=0.05, momentum=0.9)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(64, 13), torch.randn(64, 3)
    for step in range(50):
        losses = []
        for model, loss_fn, opt in ((native, loss_native, opt_n), (ours, loss_ours, opt_o)):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            losses.append(loss.detach())
            opt.step()
        # The trajectories agree to float32 rounding; a wrong gradient shows at step 0.
        assert_close(losses[0], losses[1], rtol=1e-4 if step else 1.3e-6, atol=1e-6)
    for p_o, p_n in zip(ours.parameters(), native.parameters()):
        assert_close(p_o, p_n, rtol=1e-4, atol=1e-5)


def test_optimizer_built_before_the_swap_keeps_working():
    model = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w_before = model[0].weight.detach().clone()
    manualbp.convert(model)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, w_before)


def test_multihead_attention_reading_weights_directly_keeps_working():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    ref = copy.deepcopy(mha)
    model = nn.Sequential(mha)
    manualbp.convert(model)
    q = torch.randn(2, 5, 16)
    assert_close(mha(q, q, q)[0], ref(q, q, q)[0])


def test_hooks_block_fusion_and_survive_the_swap():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o))
    manualbp.convert(model)
    assert type(model[1]) is nn.ReLU and model.fused_pairs() == []
    x = torch.randn(2, 4)
    model(x)
    assert len(seen) == 1
    assert_close(seen[0], torch.nn.functional.linear(x, model[0].weight, model[0].bias))


def test_leaky_relu_slope_and_gelu_tanh_are_carried():
    model = manualbp.convert(
        nn.Sequential(nn.Linear(3, 3), nn.LeakyReLU(0.2), nn.Linear(3, 3), nn.GELU("tanh"))
    )
    x = torch.randn(7, 3)
    want = F.gelu(F.linear(F.leaky_relu(F.linear(x, model[0].weight, model[0].bias), 0.2),
                           model[2].weight, model[2].bias), approximate="tanh")  # fmt: skip
    calls = []
    real = manualbp.functional.linear

    def spy(*args, **kwargs):
        calls.append((args[3], kwargs.get("negative_slope")))
        return real(*args, **kwargs)

    with mock.patch.object(manualbp.modules.sequential, "linear", spy):
        assert_close(model(x), want)
    assert calls == [("leaky_relu", 0.2), ("gelu_tanh", 0.01)]


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="expected an nn.Module"):
        manualbp.convert("model")


def test_a_shared_linear_is_not_fused():
    # The same Linear used twice: fusing the ReLU into it would apply it at both uses.
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(5, 4)
    want = model(x)
    manualbp.convert(model)
    assert type(model[1]) is nn.ReLU and model[0].activation is None
    assert_close(model(x), want)


def _native_and_converted():
    torch.manual_seed(3)
    native = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 2))
    return native, manualbp.convert(copy.deepcopy(native))


def test_each_module_returns_what_it_returns_natively():
    native, ours = _native_and_converted()
    x = torch.randn(5, 4)
    assert_close(ours[0](x), native[0](x))  # the pre-activation, negatives included
    assert bool((ours[0](x) < 0).any())
    assert_close(ours[:-1](x), native[:-1](x))  # a backbone slice
    assert_close(ours[:1](x), native[:1](x))
    assert_close(ours(x), native(x))


def test_hooks_added_after_convert_see_native_values():
    native, ours = _native_and_converted()
    x = torch.randn(5, 4)
    seen = {"native": [], "ours": []}
    grads = {"native": [], "ours": []}
    for key, model in (("native", native), ("ours", ours)):
        model[0].register_forward_hook(lambda m, i, o, key=key: seen[key].append(o))
        model[0].register_full_backward_hook(lambda m, gi, go, key=key: grads[key].append(go[0]))
        model(x).sum().backward()
    assert_close(seen["ours"][0], seen["native"][0])
    assert_close(grads["ours"][0], grads["native"][0])
    assert ours.fused_pairs() == [("2", "3")]  # the hooked pair runs apart; the other fuses


def test_global_module_hooks_see_the_activation_modules():
    native, ours = _native_and_converted()
    x = torch.randn(5, 4)
    seen = {}
    for key, model in (("native", native), ("ours", ours)):
        names = []
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, i, o, names=names: names.append(type(m).__name__)
        )
        try:
            model(x)
        finally:
            handle.remove()
        seen[key] = names
    assert seen["ours"] == seen["native"]
    assert "ReLU" in seen["ours"]
    assert ours.fused_pairs() == [("0", "1"), ("2", "3")]  # hooks gone: fused again


def test_a_parent_calling_children_itself_gets_native_values():
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU())

        def forward(self, x):
            return self.seq[0](x)  # the pre-activation, on purpose

    native = Parent()
    ours = manualbp.convert(copy.deepcopy(native))
    x = torch.randn(3, 4)
    assert_close(ours(x), native(x))
