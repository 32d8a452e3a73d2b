"""Train an existing model with manualbp under tensor parallelism (and FSDP2 on a 2-D mesh).

    torchrun --nproc_per_node=2 examples/train_tp.py [--check] [--dp 2]

Uses NCCL and one GPU per process when CUDA is available, gloo on the CPU otherwise (there the
reference path runs unless ``MANUALBP_BACKEND=triton TRITON_INTERPRET=1`` is set). The ranks
form a ``(dp, tp)`` mesh: each MLP block's first Linear is column-parallel and its second
row-parallel over ``tp`` (``torch.distributed.tensor.parallel``), and with ``--dp`` above 1
FSDP2 shards the parameters over ``dp``. manualbp's hand-written backward, its DTensor sharding
strategies and ``manualbp.optim.SGD`` do the work; with ``--check`` the native model trains
alongside and the run fails if the two ever disagree beyond float32 rounding.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import manualbp


def build(model: nn.Module, mesh) -> nn.Module:
    """Each block's Linears column- then row-parallel over ``tp``; FSDP2 over ``dp``."""
    plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
    plan |= {"3": ColwiseParallel(), "5": RowwiseParallel()}
    parallelize_module(model, mesh["tp"], plan)
    if mesh["dp"].size() > 1:
        fully_shard(model, mesh=mesh["dp"])
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size (FSDP2 when > 1)")
    parser.add_argument("--check", action="store_true", help="also train native and compare")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error("run me with torchrun, e.g. torchrun --nproc_per_node=2 examples/train_tp.py")

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % args.dp:
        parser.error(f"--dp {args.dp} does not divide the {world} ranks")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (args.dp, world // args.dp), mesh_dim_names=("dp", "tp"))

    torch.manual_seed(0)  # the same initial weights on every rank
    native = nn.Sequential(
        nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32),  # block 1: colwise, GELU, rowwise
        nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 8),  # block 2: colwise, ReLU, rowwise
    ).to(device)  # fmt: skip
    ours = manualbp.convert(copy.deepcopy(native))
    pairs = [(build(ours, mesh), manualbp.MSELoss(), manualbp.optim.SGD)]
    if args.check:
        pairs.append((build(native, mesh), nn.MSELoss(), torch.optim.SGD))
    opts = [opt(m.parameters(), lr=0.05, momentum=0.9) for m, _, opt in pairs]

    # One batch per data-parallel group: the ranks of a tensor-parallel group share it.
    gen = torch.Generator().manual_seed(1000 + mesh["dp"].get_local_rank())
    for step in range(args.steps):
        x = torch.randn(64, 32, generator=gen).to(device)
        y = torch.randn(64, 8, generator=gen).to(device)
        losses = []
        for (model, loss_fn, _), opt in zip(pairs, opts):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        if args.check:
            # fp32 trajectories of two correct implementations drift only by rounding.
            torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-6)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            text = f"step {step:3d}  loss {losses[0].item():.5f}"
            if args.check:
                text += f"  native {losses[1].item():.5f}"
            print(text, flush=True)
    if args.check:
        for (name, p_o), p_n in zip(pairs[0][0].named_parameters(), pairs[1][0].parameters()):
            o, n = full(p_o), full(p_n)  # collectives: on every rank
            torch.testing.assert_close(o, n, rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    if rank == 0:
        print(f"done: {world} ranks as (dp, tp) = {tuple(mesh.shape)}, backend "
              f"{dist.get_backend()}, manualbp path {manualbp.dispatch.resolve(x)}"
              + (", parameters match native" if args.check else ""))  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
