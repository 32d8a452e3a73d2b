"""Host-overhead and reference-path cases of the CPU run: manualbp against native PyTorch.

On the CPU manualbp runs its reference path, so these measure what it adds around the same
arithmetic (argument checks, dispatch, the autograd Function). Native (``torch.nn.functional``)
and manualbp (``manualbp.functional``) are timed side by side on one thread and judged as the
time ratio manualbp / native against :data:`benchmarks.targets.REFERENCE_GOALS`. The
``zstd8`` case gives the pre-activations a standard deviation of ~8, which puts GELU's
derivative ``Phi(z) + z phi(z)`` in the fp32 subnormal range for |z| ~ 13-14 (a slow path on
many CPUs).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.cases import (
    MANUALBP,
    NATIVE,
    TOLERANCE,
    Bound,
    Case,
    UnavailableError,
    _autograd_bound,
    _gen,
    _input_set,
    _manualbp,
    _pick,
    _randn,
)
from benchmarks.targets import REFERENCE_GOALS

__all__ = ["host_cases"]

HOST_THREADS = 1  # torch threads while these cases run: host overhead, not parallel speedup


def host_cases(device: torch.device) -> list[Case]:
    """The five cases, for a CPU run (an empty list elsewhere)."""
    if device.type != "cpu":
        return []
    return [
        _linear_pair("host/linear/fp32/M8_K32_N32", "host_linear_tiny", 8, 32, 32, None, device),
        _mse_pair("host/mse/fp32/8x32", "host_mse_tiny", (8, 32), device),
        _linear_pair(
            "ref/linear_gelu/fp32/M256_K1024_N1024", "ref_linear_gelu", 256, 1024, 1024,
            "gelu", device,
        ),
        _linear_pair(
            "ref/linear_gelu_zstd8/fp32/M256_K1024_N1024", "ref_linear_gelu_zstd8", 256, 1024,
            1024, "gelu", device, z_std=8.0,
        ),
        _mse_pair("ref/mse/fp32/n2^22", "ref_mse_4m", (1 << 22,), device),
    ]  # fmt: skip


def _linear_weights(
    K: int, N: int, z_std: float | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``nn.Linear``'s default initialisation (Z of std ~0.6 for unit inputs), or weights of
    std ``z_std / sqrt(K)`` and a bias of std 0.1, so that Z has std ~``z_std``."""
    g = _gen(device, 7000)
    if z_std is None:
        bound = 1.0 / math.sqrt(K)
        w = torch.rand((N, K), generator=g, device=device) * (2 * bound) - bound
        b = torch.rand((N,), generator=g, device=device) * (2 * bound) - bound
        return w, b
    w = _randn((N, K), g, device, torch.float32) * (z_std / math.sqrt(K))
    return w, _randn((N,), g, device, torch.float32) * 0.1


def _linear_pair(
    name: str, goal: str, M: int, K: int, N: int, act: str | None, device, z_std=None
) -> Case:
    w0, b0 = _linear_weights(K, N, z_std, device)

    def make_set(i: int) -> dict[str, Any]:
        return _input_set(device, 6000 + i, torch.float32, grad=True, x=(M, K), gy=(M, N))

    def bind(provider: str) -> Bound:
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        if provider == NATIVE:
            if act is None:
                fn = lambda x: F.linear(x, w, b)
            else:
                fn = lambda x: F.gelu(F.linear(x, w, b))
            label = "F.linear" + ("" if act is None else " + F.gelu")
        elif provider == MANUALBP:
            linear = _manualbp().functional.linear
            fn = lambda x: linear(x, w, b, activation=act)
            label = f"manualbp.functional.linear(activation={act!r})"
        else:
            raise UnavailableError(f"provider {provider!r} does not apply to this case")
        return _autograd_bound(lambda s: fn(s["x"]), [w, b], label, loss=False)

    return _pair_case(
        name, goal, {"M": M, "K": K, "N": N, "activation": act, "z_std": z_std}, make_set, bind,
        work=6.0 * M * N * K, metric="tflops",
        work_note="3 GEMMs of 2*M*N*K FLOPs (forward, dX, dW)",
    )  # fmt: skip


def _mse_pair(name: str, goal: str, shape: tuple[int, ...], device: torch.device) -> Case:
    def make_set(i: int) -> dict[str, Any]:
        return _input_set(device, 6500 + i, torch.float32, grad=True, x=shape, t=shape)

    def bind(provider: str) -> Bound:
        fn, label = _pick(
            provider,
            {
                NATIVE: lambda: (F.mse_loss, "F.mse_loss"),
                MANUALBP: lambda: (_manualbp().functional.mse_loss, "manualbp.functional.mse_loss"),
            },
        )
        return _autograd_bound(lambda s: fn(s["x"], s["t"]), [], label, loss=True)

    n = math.prod(shape)
    return _pair_case(
        name, goal, {"numel": n, "shape": list(shape), "reduction": "mean"}, make_set, bind,
        work=12.0 * n, metric="gbps",
        work_note="bytes that must move: read input and target, write grad_input = 3*n*4",
    )  # fmt: skip


def _pair_case(name, goal, params, make_set, bind, *, work, metric, work_note) -> Case:
    group = name.split("/")[0]
    return Case(
        name=name,
        group="host_overhead" if group == "host" else "reference",
        params={**params, "dtype": "fp32", "goal": goal, "goal_ratio": REFERENCE_GOALS[goal]},
        modes=["fwd+bwd"],
        providers=[NATIVE, MANUALBP],
        metric=metric,
        work={"fwd+bwd": work},
        work_note=work_note,
        dtype=torch.float32,
        make_set=make_set,
        bind=bind,
        set_bytes=0,
        plot_key=f"{group}_{goal}",
        plot_x=0.0,
        plot_x_label=name.split("/")[1],
        memory_mode=None,
        tol=TOLERANCE[torch.float32],
        interleaved=True,
        threads=HOST_THREADS,
    )
