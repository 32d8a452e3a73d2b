"""manualbp.enable(): F.linear / F.mse_loss of any model routed to manualbp, against native."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.testing import assert_close

import manualbp
from manualbp import functional
from manualbp.overrides import is_enabled

DT = torch.float64


class _Net(nn.Module):
    """Modules, a direct F.linear with its own weights and a loss made inside forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 8)
        self.w = nn.Parameter(torch.randn(3, 8))
        self.b = nn.Parameter(torch.randn(3))

    def forward(self, x, t):
        h = torch.tanh(self.fc(x))
        y = F.linear(h, self.w, self.b)
        return nn.MSELoss()(y, t)


def _nets(dtype=DT):
    torch.manual_seed(0)
    net = _Net().to(dtype)
    return net, copy.deepcopy(net)


def _data(dtype=DT):
    return torch.randn(6, 5, dtype=dtype), torch.randn(6, 3, dtype=dtype)


def _grad_fn_names(loss):
    names, stack, seen = set(), [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


@pytest.fixture(autouse=True)
def _always_off_afterwards():
    yield
    while is_enabled():  # a failed test must not leave the mode on for the next ones
        manualbp.enable(False)


def test_routes_modules_direct_calls_and_losses_made_in_forward():
    net, ref = _nets()
    x, t = _data()
    with manualbp.enable():
        loss = net(x, t)
    want = ref(x, t)
    assert type(loss.grad_fn).__name__ == "MSELossFunctionBackward"
    names = _grad_fn_names(loss)
    assert "LinearFunctionBackward" in names
    assert not names & {"AddmmBackward0", "MseLossBackward0", "MmBackward0"}
    assert_close(loss, want)
    loss.backward()  # outside the block: the graph recorded inside it
    want.backward()
    for p, r in zip(net.parameters(), ref.parameters(), strict=True):
        assert_close(p.grad, r.grad)


def test_context_manager_and_global_switch():
    assert not is_enabled()
    with manualbp.enable() as state:
        assert is_enabled() and repr(state) == "manualbp.enable(True)"
        with manualbp.enable(False):
            assert not is_enabled()
            assert F.linear(torch.randn(2, 3), torch.randn(4, 3)).grad_fn is None
        assert is_enabled()
        with manualbp.enable():  # re-entering does not stack a second mode
            assert len(torch.overrides._get_current_function_mode_stack()) == 1
        assert is_enabled()
    assert not is_enabled()
    manualbp.enable()
    try:
        assert is_enabled()
        w = torch.randn(4, 3, requires_grad=True)
        assert type(F.linear(torch.randn(2, 3), w).grad_fn).__name__ == "LinearFunctionBackward"
    finally:
        manualbp.enable(False)
    assert not is_enabled()
    with pytest.raises(TypeError, match="mode must be a bool"):
        manualbp.enable("yes")
    assert not is_enabled()


def test_per_thread_like_grad_mode():
    seen = []
    with manualbp.enable():
        thread = threading.Thread(target=lambda: seen.append(is_enabled()))
        thread.start()
        thread.join()
    assert seen == [False]


class _Other(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_disabling_under_another_mode_keeps_the_other():
    w = torch.randn(4, 3, requires_grad=True)
    with manualbp.enable(), _Other() as other:
        # The other mode sees the calls first; manualbp still takes F.linear.
        assert type(F.linear(torch.randn(2, 3), w).grad_fn).__name__ == "LinearFunctionBackward"
        manualbp.enable(False)  # manualbp's mode leaves the stack, the other stays on top
        assert not is_enabled()
        assert torch.overrides._get_current_function_mode_stack() == [other]
        assert type(F.linear(torch.randn(2, 3), w).grad_fn).__name__ == "MmBackward0"
    assert not is_enabled() and torch.overrides._get_current_function_mode_stack() == []


def test_leaving_the_block_disables_whatever_the_block_entered():
    # issue 23, finding 8: a mode entered inside the block and never left made the block's exit
    # raise and left manualbp on for the rest of the thread.
    stack = torch.overrides._get_current_function_mode_stack
    with manualbp.enable():
        left_on = TorchFunctionMode()
        left_on.__enter__()
    try:
        assert not is_enabled()
        assert stack() == [left_on]  # the user's mode is theirs to leave
    finally:
        left_on.__exit__(None, None, None)
    assert stack() == []
    # The same when the block raises.
    with pytest.raises(KeyError), manualbp.enable():
        _Other().__enter__()
        raise KeyError("boom")
    try:
        assert not is_enabled() and len(stack()) == 1
    finally:
        torch.overrides._pop_mode()


def test_errors_raise_as_native_and_change_nothing():
    net, _ = _nets()
    before = copy.deepcopy(net.state_dict())
    _, t = _data()
    bad = torch.randn(6, 4, dtype=DT)
    with pytest.raises(RuntimeError) as native:
        net(bad, t)
    with pytest.raises(RuntimeError) as ours, manualbp.enable():
        net(bad, t)
    # A call manualbp does not take (here a width mismatch) is PyTorch's: its very error.
    assert type(ours.value) is type(native.value) and str(ours.value) == str(native.value)
    # A bias that does not fit goes to manualbp, whose ShapeError is a RuntimeError too.
    with pytest.raises(RuntimeError, match="bias must have shape"), manualbp.enable():
        F.linear(bad, torch.randn(3, 4, dtype=DT), torch.randn(2, dtype=DT))
    assert not is_enabled()  # the with-block left it off, as it was
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize(
    "call",
    [
        lambda: F.linear(torch.ones(2, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long)),
        lambda: F.linear(torch.randn(2, 3), torch.randn(3)),  # 1-D weight: a matrix-vector
        lambda: F.linear(torch.randn(2, 3), torch.randn(4, 3, dtype=DT)),  # mixed dtypes
        lambda: F.linear(torch.randn(2, 3), torch.randn(4, 5)),
        lambda: F.mse_loss(torch.randn(3), torch.randn(3), size_average=False),
        lambda: F.mse_loss(torch.randn(3, 2), torch.randn(3, 2), weight=torch.rand(3, 2)),
        lambda: F.mse_loss(torch.randn(3), torch.randn(3), reduction="avg"),
        lambda: F.mse_loss(torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long)),
    ],
    ids=["int", "1d-weight", "mixed-dtype", "width", "legacy", "weighted", "reduction", "int-mse"],
)
def test_calls_manualbp_does_not_take_behave_as_native(call):
    torch.manual_seed(1)
    try:
        want, native_error = call(), None
    except Exception as e:
        want, native_error = None, e
    torch.manual_seed(1)
    if native_error is not None:
        with pytest.raises(type(native_error)), manualbp.enable():
            call()
        return
    with manualbp.enable():
        got = call()
    assert torch.equal(got, want)


def test_tensor_subclasses_are_left_to_pytorch():
    class Tagged(torch.Tensor):
        pass

    x = torch.randn(2, 3).as_subclass(Tagged)
    w = torch.randn(4, 3, requires_grad=True)
    with manualbp.enable():
        y = F.linear(x, w)
    assert "LinearFunction" not in type(y.grad_fn).__name__


def test_no_second_routing_inside_manualbp(monkeypatch):
    # manualbp's reference backend calls F.linear / F.mse_loss itself; with the mode paused
    # inside manualbp's calls, each op enters manualbp once, whether routed or called
    # directly (a second routing would enter functional.linear again from within).
    from manualbp import overrides

    calls = []
    real = functional.linear
    monkeypatch.setattr(overrides, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    net, _ = _nets()
    x, t = _data()
    with manualbp.enable():
        net(x, t).backward()
        assert len(calls) == 2  # fc and the direct F.linear
        real(x, net.fc.weight, net.fc.bias, "gelu")  # called directly: F.linear inside stays
        assert len(calls) == 2
        functional.linear_mse_loss(torch.tanh(net.fc(x)), net.w, net.b, t)
    assert len(calls) == 3  # fc's call; the head's own Linear is not routed


def test_composes_with_convert_and_container_fusion():
    torch.manual_seed(0)
    native = nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 3)).to(DT)
    converted = manualbp.convert(copy.deepcopy(native))
    assert converted.fused_pairs() == [("0", "1")]
    x, t = _data()
    want = F.mse_loss(converted(x), t)
    with manualbp.enable():
        got = nn.MSELoss()(converted(x), t)
    assert torch.equal(got, want)  # the very same ops: fused, routed once
    got.backward()
    grads = [p.grad.clone() for p in converted.parameters()]
    converted.zero_grad()
    want.backward()
    for g, p in zip(grads, converted.parameters(), strict=True):
        assert torch.equal(g, p.grad)


def test_composes_with_autocast():
    net, ref = _nets(torch.float32)
    x, t = _data(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with manualbp.enable():
            y = net.fc(x)
            loss = net(x, t)
        y_native, want = ref.fc(x), ref(x, t)
    assert y.dtype == y_native.dtype == torch.bfloat16
    assert loss.dtype == want.dtype == torch.float32
    assert_close(y, y_native)
    assert_close(loss, want, rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_fullgraph_compile_runs_the_hand_written_backward(monkeypatch):
    from manualbp.ops import mse

    net, ref = _nets()
    x, t = _data()
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True)
    with manualbp.enable():
        loss = compiled(x, t)
    want = ref(x, t)
    assert_close(loss, want)
    loss.backward()
    want.backward()
    for p, r in zip(net.parameters(), ref.parameters(), strict=True):
        assert_close(p.grad, r.grad)
    # A change to manualbp's MSE backward shows in the compiled graph: it is the one used.
    real = mse.reference_backward
    monkeypatch.setattr(mse, "reference_backward", lambda *a: 3 * real(*a))
    torch._dynamo.reset()
    net.zero_grad()
    with manualbp.enable():
        torch.compile(net, fullgraph=True)(x, t).backward()
    assert_close(net.b.grad, 3 * ref.b.grad)
    torch._dynamo.reset()


@pytest.mark.slow
def test_fullgraph_compile_of_a_converted_model_under_enable():
    torch.manual_seed(0)
    native = nn.Sequential(nn.Linear(5, 8), nn.SiLU(), nn.Linear(8, 3)).to(DT)
    converted = manualbp.convert(copy.deepcopy(native))
    x, t = _data()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, t: nn.MSELoss()(converted(x), t), fullgraph=True)
    with manualbp.enable():
        loss = compiled(x, t)
    want = F.mse_loss(native(x), t)
    assert_close(loss, want)
    loss.backward()
    want.backward()
    for p, r in zip(converted.parameters(), native.parameters(), strict=True):
        assert_close(p.grad, r.grad)
    torch._dynamo.reset()
