"""torch.export, torch.jit.trace and torch.jit.script on manualbp models, against native ones.

export and jit.trace record manualbp's math as native aten ops (they keep no Python
autograd.Function), so the captured program must train exactly as the captured native model:
same loss, same gradients. jit.script refuses with an error that names manualbp.
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import manualbp

DT = torch.float64


class _MLP(nn.Module):
    """A native MLP ending in nn.MSELoss: ``model(x, t)`` is the loss."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 8), nn.ReLU(),
                                 nn.Linear(8, 3))  # fmt: skip
        self.loss = nn.MSELoss()

    def forward(self, x, t):
        return self.loss(self.net(x), t)


class _Head(nn.Module):
    """``manualbp.LinearMSELoss`` and its native equal, with the same parameter names."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.head = manualbp.LinearMSELoss(5, 3) if fused else nn.Linear(5, 3)

    def forward(self, x, t):
        if self.fused:
            return self.head(x, t)
        return nn.functional.mse_loss(self.head(x), t)


def _pair(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        native = _MLP().to(DT)
        return native, manualbp.convert(copy.deepcopy(native))
    if kind == "gelu_linear":
        ours = manualbp.Linear(5, 3, activation="gelu", dtype=DT)
        native = nn.Sequential(nn.Linear(5, 3, dtype=DT), nn.GELU())
        native[0].load_state_dict(ours.state_dict())
        return native, ours
    native, ours = _Head(False).to(DT), _Head(True).to(DT)
    ours.load_state_dict(native.state_dict())
    return native, ours


def _inputs(kind):
    x = torch.randn(6, 5, dtype=DT)
    return (x,) if kind == "gelu_linear" else (x, torch.randn(6, 3, dtype=DT))


def _loss(module, args):
    out = module(*args)
    return out if out.dim() == 0 else (out * out).mean()


def _grads(module):
    return [p.grad for p in module.parameters()]


def _train_step(module, args):
    loss = _loss(module, args)
    loss.backward()
    return loss


@pytest.mark.slow
@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("kind", ["mlp", "gelu_linear", "head"])
def test_exported_module_trains_as_the_exported_native_one(kind, strict):
    native, ours = _pair(kind)
    args = _inputs(kind)
    got = torch.export.export(ours, args, strict=strict).module()
    want = torch.export.export(native, args, strict=strict).module()
    assert_close(_train_step(got, args), _train_step(want, args))
    got_grads, want_grads = _grads(got), _grads(want)
    assert len(got_grads) == len(want_grads) > 0
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g is not None  # never silently dropped
        assert_close(g, w)
    # And the same as the eager model's own gradients (the hand-written backward).
    _train_step(ours, args)
    for g, w in zip(_grads(ours), got_grads, strict=True):
        assert_close(g, w)


@pytest.mark.slow
def test_export_records_no_grad_disabled_region():
    _, ours = _pair("mlp")
    graph = str(torch.export.export(ours, _inputs("mlp"), strict=True).graph_module.code)
    assert "wrap_with_set_grad_enabled" not in graph
    assert "aten.linear" in graph and "aten.mse_loss" in graph


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the Triton path needs a GPU or TRITON_INTERPRET=1",
)
def test_export_does_not_record_the_triton_kernels():
    native, ours = _pair("mlp")
    args = _inputs("mlp")
    with manualbp.use_backend("triton"):
        got = torch.export.export(ours, args, strict=False).module()
    want = torch.export.export(native, args, strict=False).module()
    assert_close(_train_step(got, args), _train_step(want, args))
    for g, w in zip(_grads(got), _grads(want), strict=True):
        assert_close(g, w)


@pytest.mark.parametrize("kind", ["mlp", "gelu_linear", "head"])
def test_jit_trace_with_default_checks_matches_native(kind):
    native, ours = _pair(kind)
    args = _inputs(kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(ours, args)  # check_trace=True: traced twice and compared
        traced_native = torch.jit.trace(native, args)
    # manualbp's argument checks add no TracerWarning (they are no data flow).
    checks = ("functional.py", "linear.py", "loss.py", "linear_mse.py")
    ours_warned = [w for w in caught if "manualbp" in w.filename and w.filename.endswith(checks)]
    assert not ours_warned, [str(w) for w in ours_warned]
    assert "PythonOp" not in str(traced.inlined_graph)  # native ops only: it can be saved
    for other in (args, tuple(torch.randn_like(a) for a in args)):
        assert_close(_loss(traced, other), _loss(traced_native, other))
    _train_step(traced, args)
    _train_step(traced_native, args)
    for g, w in zip(_grads(ours), _grads(native), strict=True):
        assert_close(g, w)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    assert_close(torch.jit.load(buffer)(*args), traced_native(*args))


@pytest.mark.parametrize(
    "make",
    [
        lambda: manualbp.Linear(3, 4),
        lambda: manualbp.Linear(3, 4, activation="gelu"),
        lambda: manualbp.MSELoss(),
        lambda: manualbp.LinearMSELoss(3, 4),
        lambda: manualbp.convert(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))),
        lambda: manualbp.convert(nn.ModuleDict({"loss": nn.MSELoss()})),
    ],
    ids=["Linear", "Linear-gelu", "MSELoss", "LinearMSELoss", "converted", "converted-loss"],
)
def test_jit_script_refuses_with_a_clear_error_and_changes_nothing(make):
    module = make()
    before = {name: type(m) for name, m in module.named_modules()}
    state = copy.deepcopy(module.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(RuntimeError, match=r"manualbp\.\w+") as info:
            torch.jit.script(module)
    message = str(info.value)
    assert "torch.compile" in message and "torch.jit.trace" in message
    assert {name: type(m) for name, m in module.named_modules()} == before
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key])


def test_jit_script_of_native_modules_is_untouched():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(nn.Sequential(nn.Linear(3, 4), nn.ReLU()))
    assert scripted(torch.randn(2, 3)).shape == (2, 4)
