"""Tensor parallelism (``torch.distributed.tensor.parallel``) over manualbp models: the same
outputs, gradients, parameters, momentum buffers and collectives as over native ones, on both
backends.

Two processes on the CPU with gloo, one spawn per backend. Each process runs every scenario
(column/row-parallel pairs; container fusion next to parallel styles; fused activations in
column- and row-parallel Linears; ``SequenceParallel`` around a LayerNorm with the MSE on
sequence-sharded predictions; the MSE on sharded tensors against the whole tensors' math;
FSDP2 x TP on a 2-D mesh; the fused head on DTensors), training with torch's SGD and
manualbp's side by side, and writes down what disagreed; each scenario is then reported as a
test of its own. A scenario records mismatches rather than raising them, so both ranks run
the same collectives to the end. The Triton path runs the kernels under Triton's CPU
interpreter.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

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
STEPS = 5
DEADLINE_S = 300  # for one spawn (both processes, every scenario) on 2 busy cores
# Float32 trajectories of two correct implementations differ only by rounding (GELU's
# derivative and the row-parallel sums are evaluated in another order than aten's).
TOL = {"rtol": 1e-4, "atol": 1e-5}


class Check:
    """Collects mismatches instead of raising, so every rank reaches every collective."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def close(self, what: str, actual, expected, **tol) -> None:
        try:
            assert_close(_plain(actual), _plain(expected), **(tol or TOL))
        except AssertionError as e:
            self.failures.append(f"{what}: {e}")

    def equal(self, what: str, actual, expected) -> None:
        if actual != expected:
            self.failures.append(f"{what}: {actual!r} != {expected!r}")


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def _full(t):
    """The global value of ``t`` (a collective for a DTensor: every rank calls it)."""
    return t.full_tensor() if isinstance(t, _dtensor()) else t


def _plain(t):
    return t.detach().clone() if isinstance(t, torch.Tensor) else t


def _comm_counts(fn) -> dict[str, int]:
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        fn()
    return {str(op): n for op, n in comm.get_comm_counts().items()}


def _train(check: Check, tag: str, models, loss_fns, make_batch, lr=0.05, steps=STEPS) -> None:
    """``steps`` SGD steps of native ``models[0]`` and manualbp ``models[1]`` (torch's SGD and
    manualbp's, with momentum and weight decay); compares loss, output and every gradient each
    step (and the collectives of the first), then params and momentum buffers."""
    import manualbp

    opts = [
        torch.optim.SGD(models[0].parameters(), lr=lr, momentum=0.9, weight_decay=1e-3),
        manualbp.optim.SGD(models[1].parameters(), lr=lr, momentum=0.9, weight_decay=1e-3),
    ]
    for step in range(steps):
        x, y = make_batch(step)
        outs, losses, comms = [], [], []
        for model, loss_fn, opt in zip(models, loss_fns, opts):
            opt.zero_grad()
            result = {}

            def run(model=model, loss_fn=loss_fn, result=result, x=x, y=y):
                result["out"] = model(x)
                result["loss"] = loss_fn(result["out"], y)
                result["loss"].backward()

            if step == 0:
                comms.append(_comm_counts(run))
            else:
                run()
            outs.append(_full(result["out"]))
            losses.append(_full(result["loss"]))
        if comms:
            check.equal(f"{tag}: collectives of forward + backward", comms[1], comms[0])
        check.close(f"{tag} step {step}: loss", losses[1], losses[0])
        check.close(f"{tag} step {step}: output", outs[1], outs[0])
        for (name, p_n), p_o in zip(models[0].named_parameters(), models[1].parameters()):
            check.close(f"{tag} step {step}: grad of {name}", _full(p_o.grad), _full(p_n.grad))
        for opt in opts:
            opt.step()
    for (name, p_n), p_o in zip(models[0].named_parameters(), models[1].parameters()):
        check.close(f"{tag}: {name} after {steps} steps", _full(p_o), _full(p_n))
        buf_n = opts[0].state[p_n]["momentum_buffer"]
        buf_o = opts[1].state[p_o]["momentum_buffer"]
        check.equal(f"{tag}: type of {name}'s momentum buffer", type(buf_o), type(buf_n))
        if isinstance(buf_n, _dtensor()):
            check.equal(f"{tag}: placements of {name}'s buffer", buf_o.placements, p_o.placements)
        check.close(f"{tag}: {name}'s momentum buffer", _full(buf_o), _full(buf_n))


def _replicated_batches(in_features: int, out_features: int, rows: int = 8):
    gen = torch.Generator().manual_seed(7)  # the same batch on every rank, as TP needs
    shapes = ((rows, in_features), (rows, out_features))
    batches = [[torch.randn(shape, generator=gen) for shape in shapes] for _ in range(STEPS)]
    return lambda step: batches[step]


def _mesh_1d():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD,))


# ---------------------------------------------------------------------------------------------
# Scenarios: each takes a Check and records what differs from native.
# ---------------------------------------------------------------------------------------------
def colwise_rowwise(check: Check) -> None:
    """The issue's model: Linear(16, 32) column-parallel, GELU, Linear(32, 8) row-parallel."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    import manualbp

    torch.manual_seed(0)
    native = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    ours = manualbp.convert(copy.deepcopy(native), fuse_activations=False)
    mesh = _mesh_1d()
    for model in (native, ours):
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    _train(check, "colwise/rowwise", (native, ours), (nn.MSELoss(), manualbp.MSELoss()),
           _replicated_batches(16, 8))  # fmt: skip


def container_fusion(check: Check) -> None:
    """manualbp.Sequential next to parallel styles: a pair whose Linear has the styles' hooks
    runs module by module (hooks included); an unparallelized pair stays fused."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    import manualbp

    torch.manual_seed(1)
    native = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 16),
        nn.Sigmoid(), nn.Linear(16, 4),
    )  # fmt: skip
    ours = manualbp.convert(copy.deepcopy(native))
    check.equal("fused pairs before parallelize_module", ours.fused_pairs(),
                [("0", "1"), ("2", "3"), ("4", "5")])  # fmt: skip
    mesh = _mesh_1d()
    for model in (native, ours):
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    check.equal("fused pairs after parallelize_module", ours.fused_pairs(), [("4", "5")])
    runs = ours.mlp_runs() if hasattr(ours, "mlp_runs") else []  # Linear-act-Linear runs
    check.equal("MLP runs with a parallelized Linear", [r for r in runs if {"0", "2"} & {*r}], [])
    _train(check, "container fusion", (native, ours), (nn.MSELoss(), manualbp.MSELoss()),
           _replicated_batches(16, 4), steps=2)  # fmt: skip


def fused_activation_linears(check: Check) -> None:
    """manualbp.Linear(activation=...) as the parallel layer itself: column-parallel, the
    activation is elementwise on the sharded output; row-parallel, it follows the all-reduce
    (native: Linear, the style's all-reduce, then the activation)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    import manualbp

    torch.manual_seed(2)
    native = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 8), nn.GELU())
    ours = nn.Sequential(
        manualbp.Linear(16, 32, activation="silu"), manualbp.Linear(32, 8, activation="gelu")
    )
    ours.load_state_dict({k.replace("2.", "1."): v for k, v in native.state_dict().items()})
    mesh = _mesh_1d()
    parallelize_module(native, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    parallelize_module(ours, mesh, {"0": ColwiseParallel(), "1": RowwiseParallel()})
    _train(check, "fused activations", (native, ours), (nn.MSELoss(), manualbp.MSELoss()),
           _replicated_batches(16, 8), steps=2)  # fmt: skip


def sequence_parallel(check: Check) -> None:
    """A block with SequenceParallel around its LayerNorm: (batch, seq, hidden) split along
    the sequence; the row-parallel output stays a sequence-sharded DTensor, and the MSE loss
    runs on those sharded predictions."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    import manualbp

    torch.manual_seed(3)
    native = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    ours = manualbp.convert(copy.deepcopy(native))
    mesh = _mesh_1d()
    plan = {
        "0": SequenceParallel(),
        "1": ColwiseParallel(input_layouts=Shard(1)),
        "3": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
    }
    for model in (native, ours):
        parallelize_module(model, mesh, plan)
    gen = torch.Generator().manual_seed(8)
    rank = dist.get_rank()
    data = [(torch.randn(2, 6, 8, generator=gen), torch.randn(2, 6, 8, generator=gen))
            for _ in range(STEPS)]  # fmt: skip

    def batch(step):  # each rank its part of the sequence
        x, y = (t.chunk(WORLD, dim=1)[rank] for t in data[step])
        return x, DTensor.from_local(y, mesh, [Shard(1)])

    # "sum": native's "mean" over sharded predictions takes each shard's mean as a partial
    # average, which is off for uneven shards and doubles the gradient (mse_on_shards checks
    # manualbp's against the math instead).
    losses = (nn.MSELoss(reduction="sum"), manualbp.MSELoss(reduction="sum"))
    _train(check, "sequence parallel", (native, ours), losses, batch, lr=2e-3)


def mse_on_shards(check: Check) -> None:
    """The MSE on sharded predictions, every reduction, even and uneven shards: the loss and
    gradients of the whole tensors, with native's collectives. (Native's own "mean" of
    shards differs: it averages the shards' means, off for uneven shards, and its gradient
    is the world size times too large.)"""
    import torch.nn.functional as F
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import manualbp

    mesh = _mesh_1d()
    gen = torch.Generator().manual_seed(9)
    for shape in ((4, 6), (5, 3)):  # (5, 3): uneven shards along either dimension
        x, t = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        for placement in (Shard(0), Shard(1), Replicate()):
            for reduction in ("mean", "sum", "none"):
                tag = f"mse {shape} {placement} {reduction}"
                comms, results = [], []
                for mse_loss in (F.mse_loss, manualbp.functional.mse_loss):
                    xd = distribute_tensor(x, mesh, [placement]).requires_grad_()
                    td = distribute_tensor(t, mesh, [placement])

                    def run(mse_loss=mse_loss, xd=xd, td=td, results=results, reduction=reduction):
                        loss = mse_loss(xd, td, reduction=reduction)
                        (loss.sum() if reduction == "none" else loss).backward()
                        results.append((loss, xd.grad))

                    comms.append(_comm_counts(run))
                check.equal(f"{tag}: collectives", comms[1], comms[0])
                loss, grad = results[1]
                x_ref = x.clone().requires_grad_()
                loss_ref = F.mse_loss(x_ref, t, reduction=reduction)
                (loss_ref.sum() if reduction == "none" else loss_ref).backward()
                check.close(f"{tag}: loss", _full(loss), loss_ref)
                check.close(f"{tag}: grad", _full(grad), x_ref.grad)
                check.equal(f"{tag}: grad placements", grad.placements, (placement,))


def fsdp2_x_tp(check: Check) -> None:
    """FSDP2 over a tensor-parallel model on a 2-D mesh (dp 1 x tp 2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    import manualbp

    torch.manual_seed(4)
    native = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    ours = manualbp.convert(copy.deepcopy(native))
    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "tp"))
    for model in (native, ours):
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        fully_shard(model, mesh=mesh["dp"])
    _train(check, "fsdp2 x tp", (native, ours), (nn.MSELoss(), manualbp.MSELoss()),
           _replicated_batches(16, 8))  # fmt: skip


def linear_mse_head(check: Check) -> None:
    """The fused head on DTensor operands (rows split, replicated weights): the unfused path."""
    import torch.nn.functional as F
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import manualbp

    mesh = _mesh_1d()
    gen = torch.Generator().manual_seed(10)
    x, t = torch.randn(6, 8, generator=gen), torch.randn(6, 4, generator=gen)
    w, b = torch.randn(4, 8, generator=gen), torch.randn(4, generator=gen)
    for reduction in ("mean", "sum"):
        placed = ((x, Shard(0)), (w, Replicate()), (b, Replicate()), (t, Shard(0)))
        ops = [distribute_tensor(v, mesh, [p]).requires_grad_(v is not t) for v, p in placed]
        loss = manualbp.functional.linear_mse_loss(*ops[:3], ops[3], reduction)
        loss.backward()
        refs = [v.clone().requires_grad_() for v in (x, w, b)]
        loss_ref = F.mse_loss(F.linear(*refs), t, reduction=reduction)
        loss_ref.backward()
        check.close(f"linear_mse {reduction}: loss", _full(loss), loss_ref)
        for name, op, ref in zip("xwb", ops, refs):
            check.close(f"linear_mse {reduction}: grad of {name}", _full(op.grad), ref.grad)


SCENARIOS = {
    fn.__name__: fn
    for fn in (
        colwise_rowwise,
        container_fusion,
        fused_activation_linears,
        sequence_parallel,
        mse_on_shards,
        fsdp2_x_tp,
        linear_mse_head,
    )
}


def _worker(rank: int, port: int, backend: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    results = {}
    try:
        import manualbp

        manualbp.set_backend(backend)
        for name, scenario in SCENARIOS.items():
            check, start = Check(), time.perf_counter()
            try:
                scenario(check)
            except Exception:
                check.failures.append(traceback.format_exc())
            results[name] = {"failures": check.failures, "seconds": time.perf_counter() - start}
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()
    # Done: leave without the interpreter's teardown, where a library's static destructors
    # now and then abort a spawned process on this CPU-only setup ("terminate called
    # without an active exception") after everything passed. A failure raised above still
    # reaches mp.spawn as the exception it is.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(backend: str, out_dir: Path) -> list[dict]:
    context = mp.start_processes(
        _worker, args=(_free_port(), backend, str(out_dir)), nprocs=WORLD, join=False,
        start_method="spawn",
    )  # fmt: skip
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the {backend} tensor-parallel workers ran past {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module", params=["reference", "triton"])
def results(request, tmp_path_factory):
    """Each scenario's mismatches on each rank, from one spawn per backend."""
    backend = request.param
    saved = os.environ.get("TRITON_INTERPRET")
    if backend == "triton":
        from manualbp._mode import TRITON_INSTALLED

        if not TRITON_INSTALLED:
            pytest.skip("triton is not installed")
        os.environ["TRITON_INTERPRET"] = "1"  # the workers' tensors are on the CPU
    try:
        return _spawn(backend, tmp_path_factory.mktemp(f"tp-{backend}"))
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_tensor_parallel_matches_native(results, scenario):
    failures = [
        f"rank {r}: {f}" for r, ran in enumerate(results) for f in ran[scenario]["failures"]
    ]
    assert not failures, "\n".join(failures)
