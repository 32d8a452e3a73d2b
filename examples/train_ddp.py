"""Train an existing model with manualbp under DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/train_ddp.py

Uses NCCL and one GPU per process when CUDA is available, gloo on the CPU otherwise.
Each rank trains on its own shard of synthetic data; DDP averages the gradients that
manualbp's hand-written backward produces. With ``--check`` it trains the native model
alongside and fails if the two ever disagree beyond float32 rounding.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import manualbp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--check", action="store_true", help="also train native and compare")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error("run me with torchrun, e.g. torchrun --nproc_per_node=2 examples/train_ddp.py")

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    native = nn.Sequential(
        nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8)
    ).to(device)
    ours = manualbp.convert(copy.deepcopy(native))  # Linear+GELU, Linear+ReLU fused
    pairs = [(DDP(ours), manualbp.MSELoss())]
    if args.check:
        pairs.append((DDP(native), nn.MSELoss()))
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m, _ in pairs]

    gen = torch.Generator().manual_seed(1000 + rank)
    for step in range(args.steps):
        x = torch.randn(128, 64, generator=gen).to(device)
        y = torch.randn(128, 8, generator=gen).to(device)
        losses = []
        for (model, loss_fn), opt in zip(pairs, opts):
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
    if rank == 0:
        print(f"done: {world} ranks, backend {dist.get_backend()}, "
              f"manualbp path {manualbp.dispatch.resolve(x)}")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
