"""DDP and FSDP2 over manualbp models: the same gradients and parameters as over native ones.

Two processes on the CPU with the gloo backend. ReLU/Tanh/Sigmoid models, whose
derivatives manualbp evaluates exactly as aten does, so the comparison holds at the
float32 defaults of ``assert_close``.
"""

from __future__ import annotations

import copy
import os
import socket
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.testing import assert_close

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]

WORLD = 2
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _native_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4), nn.Sigmoid()
    )


def _wrap(model: nn.Module, kind: str) -> nn.Module:
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker(rank: int, port: int, kind: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        import manualbp

        native = _native_model()
        ours = manualbp.convert(copy.deepcopy(native))
        models = [_wrap(native, kind), _wrap(ours, kind)]
        loss_fns = [nn.MSELoss(), manualbp.MSELoss()]
        opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of data
        for _ in range(STEPS):
            x, y = torch.randn(16, 12, generator=gen), torch.rand(16, 4, generator=gen)
            for model, loss_fn, opt in zip(models, loss_fns, opts):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
            for p_n, p_o in zip(models[0].parameters(), models[1].parameters()):
                assert_close(_full(p_o.grad), _full(p_n.grad))
            for opt in opts:
                opt.step()
        for p_n, p_o in zip(models[0].parameters(), models[1].parameters()):
            assert_close(_full(p_o), _full(p_n))
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # Done: leave without the interpreter's teardown, where a library's static destructors
    # now and then abort a spawned process on this CPU-only setup ("terminate called
    # without an active exception") after everything passed. A failure raised above still
    # reaches mp.spawn as the exception it is.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_distributed_training_matches_native(kind):
    mp.spawn(_worker, args=(_free_port(), kind), nprocs=WORLD, join=True)
