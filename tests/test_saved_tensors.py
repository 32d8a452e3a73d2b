"""What a converted model keeps for its backward, held to native: every tensor a backward reads
goes through ``saved_tensors_hooks`` (so activation checkpointing and offloading see it), and
no more is kept alive than native autograd keeps."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

import manualbp


class _Made(TorchDispatchMode):
    """Weak references to the storage of every tensor an op makes while active."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: list[tuple[StorageWeakRef, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                self.storages.append((StorageWeakRef(storage), storage.nbytes()))
        return out


def _kept(run, *keep: list[torch.Tensor]) -> tuple[int, set]:
    """Bytes the forward ``run()`` leaves alive besides the tensors of ``keep`` (lists, read
    after the forward) and its output: what the graph holds for backward; and the storages
    (their weak references' cdata) alive."""
    with _Made() as made:
        out = run()
    gc.collect()
    skip = {StorageWeakRef(t.untyped_storage()).cdata for ts in [*keep, [out]] for t in ts}
    alive = {}
    for ref, nbytes in made.storages:
        if not ref.expired() and ref.cdata not in skip:
            alive[ref.cdata] = nbytes
    out.sum().backward()
    return sum(alive.values()), set(alive)


def _block(activation: type[nn.Module]) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 64), activation(), nn.Linear(64, 64), activation(),
                         nn.Linear(64, 32))  # fmt: skip


@pytest.mark.parametrize("activation", [nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_checkpointing_keeps_no_more_than_native(activation, backend):
    native = _block(activation)
    ours = manualbp.convert(copy.deepcopy(native))
    x = torch.randn(96, 48, requires_grad=True)
    with manualbp.use_backend(backend):
        got, _ = _kept(lambda: checkpoint(ours, x, use_reentrant=False), [x], [*ours.parameters()])
    want, _ = _kept(lambda: checkpoint(native, x, use_reentrant=False), [x], [*native.parameters()])
    assert got <= want, (got, want)


@pytest.mark.parametrize("activation", [nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_keeps_no_more_than_native_for_backward(activation, backend):
    native = _block(activation)
    ours = manualbp.convert(copy.deepcopy(native))
    x = torch.randn(96, 48, requires_grad=True)
    with manualbp.use_backend(backend):
        got, _ = _kept(lambda: ours(x), [x], list(ours.parameters()))
    want, _ = _kept(lambda: native(x), [x], list(native.parameters()))
    assert got <= want, (got, want)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _block(nn.GELU),
        lambda: manualbp.FusedMLP(48, 64, 32, 2, "gelu"),
        lambda: manualbp.FusedMLP(48, 64, 32, 2, "relu", "tanh"),
        lambda: nn.Sequential(nn.Linear(48, 256), nn.GELU(), nn.Linear(256, 32)),  # a chain
    ],
    ids=["pairs", "fused_mlp_gelu", "fused_mlp_relu", "chain"],
)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_every_tensor_kept_for_backward_goes_through_the_hooks(make, backend):
    model = manualbp.convert(make())
    x = torch.randn(96, 48, requires_grad=True)
    packed: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> int:
        packed.append(t)
        return len(packed) - 1

    def run() -> torch.Tensor:
        with torch.autograd.graph.saved_tensors_hooks(pack, packed.__getitem__):
            return model(x)

    with manualbp.use_backend(backend):
        _, alive = _kept(run, [x], list(model.parameters()), packed)
    # What the hooks hold is excluded above: anything else still alive escaped them.
    assert alive == set(), f"{len(alive)} storages kept for backward outside the hooks"


def test_save_on_cpu_moves_what_native_moves():
    # As many elements go through the hooks as natively (W is saved as W, native saves W^T).
    sizes = {}
    for name, model in (("ours", manualbp.convert(_block(nn.GELU))), ("native", _block(nn.GELU))):
        x = torch.randn(96, 48, requires_grad=True)
        seen = []

        def pack(t, seen=seen):
            seen.append(t.numel())
            return t.clone()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = model(x)
        y.sum().backward()  # from the copies alone
        sizes[name] = sorted(seen)
    assert sizes["ours"] == sizes["native"]


def test_save_on_cpu_trains_like_native():
    ours, native = manualbp.convert(_block(nn.SiLU)), _block(nn.SiLU)
    x = torch.randn(96, 48)
    for model in (ours, native):
        with torch.autograd.graph.save_on_cpu():
            model(x).square().mean().backward()
    for p, q in zip(ours.parameters(), native.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
