"""The benchmark cases: what is measured, on which providers, and how much work it is.

A :class:`Case` knows how to make its input sets (``make_set(i)``, seeded by ``i``), how to
bind each provider (``bind(provider)`` returns a :class:`Bound` holding, per mode, an untimed
``prepare(set)`` and the timed ``run(prepared)``), and the work each mode must do: FLOPs for
the GEMM cases (``2*M*N*K`` per GEMM; a Linear forward is 1 GEMM, its backward 2: dX and dW),
bytes that must move for the memory-bound ones (stated in ``work_note``).

Providers:

* ``native``: eager PyTorch autograd (``nn.Linear`` + ``nn.ReLU``/``nn.GELU``, ``F.mse_loss``,
  ``nn.MSELoss``, ``torch.optim.SGD`` with its default implementation, foreach on CUDA);
* ``compile``: ``torch.compile`` (default mode) of the native model;
* ``manualbp``: ``manualbp.Linear`` / ``manualbp.functional.mse_loss`` /
  ``manualbp.LinearMSELoss`` / ``manualbp.optim.SGD``, on the same weights;
* ``native_fused`` (SGD only): ``torch.optim.SGD(fused=True)``;
* ``manualbp_unfused`` (LinearMSELoss only): ``manualbp.Linear`` + ``manualbp.MSELoss``.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.ceilings import DTYPE_NAMES

__all__ = [
    "Bound",
    "Case",
    "UnavailableError",
    "NATIVE",
    "COMPILE",
    "MANUALBP",
    "NATIVE_FUSED",
    "MANUALBP_UNFUSED",
    "build_cases",
]

NATIVE = "native"
COMPILE = "compile"
MANUALBP = "manualbp"
NATIVE_FUSED = "native_fused"
MANUALBP_UNFUSED = "manualbp_unfused"

Prepare = Callable[[Any], Any]
Run = Callable[[Any], Any]


class UnavailableError(Exception):
    """A provider that cannot run here; the message says why (recorded as a skip reason)."""


@dataclass
class Bound:
    """A provider ready to run one case."""

    modes: dict[str, tuple[Prepare, Run]]
    label: str
    output: Callable[[Any], Tensor] | None = None  # forward result on a set, for the check


@dataclass
class Case:
    """One benchmark case (one shape / dtype / option), measured on several providers."""

    name: str
    group: str
    params: dict[str, Any]
    modes: list[str]
    providers: list[str]
    metric: str  # "tflops" or "gbps"
    work: dict[str, float]  # per mode: FLOPs (metric tflops) or bytes (metric gbps)
    work_note: str
    dtype: torch.dtype
    make_set: Callable[[int], Any]
    bind: Callable[[str], Bound]
    set_bytes: int
    plot_key: str
    plot_x: float
    plot_x_label: str
    memory_mode: str | None
    tol: float
    priority: int = 0
    provider_labels: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------

GPU_TOKENS = 8192
GPU_LINEAR_SHAPES = [(1024, 4096), (4096, 1024), (4096, 4096), (8192, 8192)]
GPU_MSE_LOG2 = [20, 22, 24, 26, 28]
GPU_MLP = (1024, 4096, 4096, 4096, 1024)

CPU_TOKENS = 512
CPU_LINEAR_SHAPES = [(128, 512), (512, 128), (512, 512), (1024, 1024)]
CPU_MSE_LOG2 = [16, 18, 20, 22]
CPU_MLP = (128, 512, 512, 512, 128)

CPU_QUICK_TOKENS = 256
CPU_QUICK_LINEAR_SHAPES = [(256, 512)]
CPU_QUICK_MSE_LOG2 = [16, 20]
CPU_QUICK_MLP = (128, 256, 256, 256, 128)

ACTIVATIONS = (None, "relu", "gelu")
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape: tuple[int, ...], g: torch.Generator, device: torch.device, dtype: torch.dtype):
    return torch.randn(shape, generator=g, device=device, dtype=dtype)


def _act_module(act: str | None) -> nn.Module | None:
    return {None: None, "relu": nn.ReLU(), "gelu": nn.GELU()}[act]


def _manualbp() -> Any:
    try:
        import manualbp
    except Exception as e:
        raise UnavailableError(f"import manualbp failed: {type(e).__name__}: {e}") from e
    return manualbp


def _compile(obj: Any) -> Any:
    return torch.compile(obj)


def _clear_grads(*tensors: Tensor) -> None:
    for t in tensors:
        t.grad = None


def _autograd_modes(
    forward: Callable[[Any], Tensor], leaves: list[Tensor], *, loss: bool
) -> dict[str, tuple[Prepare, Run]]:
    """fwd / bwd / fwd+bwd of ``forward(set)``; the backward seeds ``set["gy"]`` unless
    ``loss`` (a scalar). Gradients are set to ``None`` before each call (untimed)."""

    def grad_of(s: Any) -> Tensor | None:
        return None if loss else s["gy"]

    def prep_fwd(s: Any) -> Any:
        return s

    def run_fwd(s: Any) -> None:
        forward(s)

    def prep_bwd(s: Any) -> Any:
        _clear_grads(*leaves, *s["leaves"])
        return forward(s), grad_of(s)

    def run_bwd(args: Any) -> None:
        out, gy = args
        out.backward(gy)

    def prep_fwdbwd(s: Any) -> Any:
        _clear_grads(*leaves, *s["leaves"])
        return s

    def run_fwdbwd(s: Any) -> None:
        forward(s).backward(grad_of(s))

    return {
        "fwd+bwd": (prep_fwdbwd, run_fwdbwd),
        "fwd": (prep_fwd, run_fwd),
        "bwd": (prep_bwd, run_bwd),
    }


def _copy_linear_(dst_weight: Tensor, dst_bias: Tensor | None, src: nn.Linear) -> None:
    with torch.no_grad():
        dst_weight.copy_(src.weight)
        if dst_bias is not None and src.bias is not None:
            dst_bias.copy_(src.bias)


# ---------------------------------------------------------------------------------------------
# Linear (+ bias, activation)
# ---------------------------------------------------------------------------------------------


def linear_case(
    M: int,
    K: int,
    N: int,
    act: str | None,
    dtype: torch.dtype,
    device: torch.device,
    priority: int,
) -> Case:
    """``act(x W^T + b)`` with ``x`` of shape ``(M, K)`` requiring grad (an MLP's hidden layer)."""
    dname = DTYPE_NAMES[dtype]
    aname = act or "none"

    def make_set(i: int) -> dict[str, Any]:
        g = _gen(device, 1000 + i)
        x = _randn((M, K), g, device, dtype).requires_grad_()
        return {"x": x, "gy": _randn((M, N), g, device, dtype), "leaves": [x]}

    def native_model() -> nn.Module:
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Linear(K, N, device=device, dtype=dtype)]
        act_mod = _act_module(act)
        if act_mod is not None:
            layers.append(act_mod)
        return nn.Sequential(*layers)

    act_label = {None: "", "relu": " + nn.ReLU", "gelu": " + nn.GELU"}[act]

    def bind(provider: str) -> Bound:
        if provider in (NATIVE, COMPILE):
            model = native_model()
            fn = _compile(model) if provider == COMPILE else model
            label = f"nn.Linear{act_label}" + (
                ", torch.compile" if provider == COMPILE else ", eager"
            )
        elif provider == MANUALBP:
            mbp = _manualbp()
            ref = native_model()[0]
            model = mbp.Linear(K, N, activation=act, device=device, dtype=dtype)
            _copy_linear_(model.weight, model.bias, ref)
            fn = model
            label = f"manualbp.Linear(activation={act!r})"
        else:
            raise UnavailableError(f"provider {provider!r} does not apply to this case")
        params = list(model.parameters())
        forward = lambda s: fn(s["x"])
        return Bound(
            modes=_autograd_modes(forward, params, loss=False),
            label=label,
            output=lambda s: forward(s).detach(),
        )

    el = torch.empty((), dtype=dtype).element_size()
    gemm = 2.0 * M * N * K
    return Case(
        name=f"linear/{aname}/{dname}/M{M}_K{K}_N{N}",
        group="linear",
        params={"M": M, "K": K, "N": N, "activation": act, "dtype": dname, "bias": True},
        modes=["fwd+bwd", "fwd", "bwd"],
        providers=[NATIVE, COMPILE, MANUALBP],
        metric="tflops",
        work={"fwd": gemm, "bwd": 2 * gemm, "fwd+bwd": 3 * gemm},
        work_note="2*M*N*K FLOPs per GEMM; fwd = 1 GEMM, bwd = 2 (dX, dW), fwd+bwd = 3",
        dtype=dtype,
        make_set=make_set,
        bind=bind,
        set_bytes=(M * K + M * N) * el,
        plot_key=f"linear_{aname}_{dname}",
        plot_x=float(2 * M * N * K),
        plot_x_label=f"K{K}xN{N}",
        memory_mode="fwd+bwd",
        tol=TOLERANCE[dtype],
        priority=priority,
    )


# ---------------------------------------------------------------------------------------------
# MSE
# ---------------------------------------------------------------------------------------------


def _mse_native(x: Tensor, t: Tensor) -> Tensor:
    return F.mse_loss(x, t)


def mse_case(log2n: int, dtype: torch.dtype, device: torch.device, priority: int) -> Case:
    """``mse_loss(x, t)`` (mean) forward + backward on ``2**log2n`` elements."""
    n = 1 << log2n
    dname = DTYPE_NAMES[dtype]
    el = torch.empty((), dtype=dtype).element_size()

    def make_set(i: int) -> dict[str, Any]:
        g = _gen(device, 2000 + i)
        x = _randn((n,), g, device, dtype).requires_grad_()
        return {"x": x, "t": _randn((n,), g, device, dtype), "leaves": [x]}

    def bind(provider: str) -> Bound:
        if provider == NATIVE:
            fn, label = _mse_native, "F.mse_loss, eager"
        elif provider == COMPILE:
            fn, label = _compile(_mse_native), "F.mse_loss, torch.compile"
        elif provider == MANUALBP:
            fn, label = _manualbp().functional.mse_loss, "manualbp.functional.mse_loss"
        else:
            raise UnavailableError(f"provider {provider!r} does not apply to this case")
        forward = lambda s: fn(s["x"], s["t"])
        modes = _autograd_modes(forward, [], loss=True)
        return Bound(
            modes={"fwd+bwd": modes["fwd+bwd"]},
            label=label,
            output=lambda s: forward(s).detach(),
        )

    return Case(
        name=f"mse/{dname}/n2^{log2n}",
        group="mse",
        params={"numel": n, "log2_numel": log2n, "dtype": dname, "reduction": "mean"},
        modes=["fwd+bwd"],
        providers=[NATIVE, COMPILE, MANUALBP],
        metric="gbps",
        work={"fwd+bwd": 3.0 * n * el},
        work_note="bytes that must move: read input and target, write grad_input = 3*n*elsize",
        dtype=dtype,
        make_set=make_set,
        bind=bind,
        set_bytes=3 * n * el,
        plot_key=f"mse_{dname}",
        plot_x=float(n),
        plot_x_label=f"2^{log2n}",
        memory_mode="fwd+bwd",
        tol=TOLERANCE[dtype],
        priority=priority,
    )


# ---------------------------------------------------------------------------------------------
# SGD step
# ---------------------------------------------------------------------------------------------


def _mlp_param_shapes(dims: tuple[int, ...]) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    for d_in, d_out in itertools.pairwise(dims):
        shapes += [(d_out, d_in), (d_out,)]
    return shapes


def sgd_case(
    dims: tuple[int, ...],
    momentum: float,
    dtype: torch.dtype,
    device: torch.device,
    priority: int,
) -> Case:
    """One ``optimizer.step()`` over the parameters (with random gradients) of an MLP."""
    dname = DTYPE_NAMES[dtype]
    el = torch.empty((), dtype=dtype).element_size()
    shapes = _mlp_param_shapes(dims)
    numel = sum(math.prod(s) for s in shapes)
    lr = 1e-3

    def make_set(i: int) -> dict[str, Any]:
        g = _gen(device, 3000 + i)
        params = []
        for s in shapes:
            p = nn.Parameter(_randn(s, g, device, dtype))
            p.grad = _randn(s, g, device, dtype) * 1e-2
            params.append(p)
        return {"params": params}

    def bind(provider: str) -> Bound:
        if provider == NATIVE:
            make = lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum)
            label = "torch.optim.SGD (default: foreach on CUDA, for-loop on CPU)"
        elif provider == NATIVE_FUSED:
            make = lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum, fused=True)
            label = "torch.optim.SGD(fused=True)"
            probe = nn.Parameter(torch.zeros(4, device=device, dtype=dtype))
            probe.grad = torch.zeros_like(probe)
            try:
                make([probe]).step()
            except Exception as e:
                raise UnavailableError(
                    f"fused SGD not supported here: {type(e).__name__}: {e}"
                ) from e
        elif provider == MANUALBP:
            mbp = _manualbp()
            try:
                from manualbp.optim import SGD
            except Exception as e:
                raise UnavailableError(
                    f"manualbp.optim.SGD not available: {type(e).__name__}: {e}"
                ) from e
            del mbp
            make = lambda ps: SGD(ps, lr=lr, momentum=momentum)
            label = "manualbp.optim.SGD"
        else:
            raise UnavailableError(f"provider {provider!r} does not apply to this case")
        optimizers: dict[int, Any] = {}

        def prepare(s: dict[str, Any]) -> Any:
            key = id(s)
            if key not in optimizers:
                optimizers[key] = make(s["params"])
            return optimizers[key]

        def output(s: dict[str, Any]) -> Tensor:
            # Two steps (the second uses the momentum buffer) on copies of the set's params.
            ps = [nn.Parameter(p.detach().clone()) for p in s["params"]]
            for p, q in zip(ps, s["params"], strict=True):
                p.grad = q.grad.clone()
            opt = make(ps)
            opt.step()
            opt.step()
            return torch.cat([p.detach().reshape(-1) for p in ps])

        return Bound(modes={"step": (prepare, lambda opt: opt.step())}, label=label, output=output)

    moved = (5 if momentum else 3) * numel * el
    return Case(
        name=f"sgd/{dname}/momentum{momentum:g}",
        group="sgd",
        params={
            "dims": list(dims),
            "numel": numel,
            "momentum": momentum,
            "lr": lr,
            "dtype": dname,
        },
        modes=["step"],
        providers=[NATIVE, NATIVE_FUSED, MANUALBP],
        metric="gbps",
        work={"step": float(moved)},
        work_note=(
            "bytes that must move per step: read param and grad, write param"
            + (", read and write the momentum buffer" if momentum else "")
            + f" = {5 if momentum else 3}*numel*elsize"
        ),
        dtype=dtype,
        make_set=make_set,
        bind=bind,
        set_bytes=(3 if momentum else 2) * numel * el,
        plot_key=f"sgd_{dname}",
        plot_x=float(momentum),
        plot_x_label=f"momentum={momentum:g}",
        memory_mode="step",
        tol=TOLERANCE[dtype],
        priority=priority,
    )


# ---------------------------------------------------------------------------------------------
# Fused Linear + MSE head
# ---------------------------------------------------------------------------------------------


class _LinearMSE(nn.Module):
    """The unfused pair ``nn.MSELoss()(nn.Linear(x), target)``."""

    def __init__(self, linear: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.linear = linear
        self.loss = loss

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return self.loss(self.linear(x), target)


def linear_mse_case(
    M: int, K: int, N: int, dtype: torch.dtype, device: torch.device, priority: int
) -> Case:
    """``loss = head(x, target)`` forward + backward: the fused head against the unfused pair."""
    dname = DTYPE_NAMES[dtype]
    el = torch.empty((), dtype=dtype).element_size()

    def make_set(i: int) -> dict[str, Any]:
        g = _gen(device, 4000 + i)
        x = _randn((M, K), g, device, dtype).requires_grad_()
        return {"x": x, "t": _randn((M, N), g, device, dtype), "leaves": [x]}

    def native_linear() -> nn.Linear:
        torch.manual_seed(0)
        return nn.Linear(K, N, device=device, dtype=dtype)

    def bind(provider: str) -> Bound:
        if provider in (NATIVE, COMPILE):
            head = _LinearMSE(native_linear(), nn.MSELoss())
            fn = _compile(head) if provider == COMPILE else head
            label = "nn.Linear + nn.MSELoss, " + (
                "torch.compile" if provider == COMPILE else "eager"
            )
        elif provider == MANUALBP:
            cls = getattr(_manualbp(), "LinearMSELoss", None)
            if cls is None:
                raise UnavailableError("not available: manualbp.LinearMSELoss does not exist yet")
            head = cls(K, N, bias=True, reduction="mean", device=device, dtype=dtype)
            weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
            if isinstance(weight, Tensor) and tuple(weight.shape) == (N, K):
                _copy_linear_(weight, bias if isinstance(bias, Tensor) else None, native_linear())
            fn = head
            label = "manualbp.LinearMSELoss"
        elif provider == MANUALBP_UNFUSED:
            mbp = _manualbp()
            lin = mbp.Linear(K, N, device=device, dtype=dtype)
            _copy_linear_(lin.weight, lin.bias, native_linear())
            head = _LinearMSE(lin, mbp.MSELoss())
            fn = head
            label = "manualbp.Linear + manualbp.MSELoss"
        else:
            raise UnavailableError(f"provider {provider!r} does not apply to this case")
        params = list(head.parameters())
        forward = lambda s: fn(s["x"], s["t"])
        modes = _autograd_modes(forward, params, loss=True)
        return Bound(
            modes={"fwd+bwd": modes["fwd+bwd"]},
            label=label,
            output=lambda s: forward(s).detach(),
        )

    gemm = 2.0 * M * N * K
    return Case(
        name=f"linear_mse/{dname}/M{M}_K{K}_N{N}",
        group="linear_mse",
        params={"M": M, "K": K, "N": N, "dtype": dname, "reduction": "mean", "bias": True},
        modes=["fwd+bwd"],
        providers=[NATIVE, COMPILE, MANUALBP, MANUALBP_UNFUSED],
        metric="tflops",
        work={"fwd+bwd": 3 * gemm},
        work_note="3 GEMMs of 2*M*N*K FLOPs (forward, dX, dW); the loss itself is not counted",
        dtype=dtype,
        make_set=make_set,
        bind=bind,
        set_bytes=(M * K + M * N) * el,
        plot_key=f"linear_mse_{dname}",
        plot_x=float(2 * M * N * K),
        plot_x_label=f"K{K}xN{N}",
        memory_mode="fwd+bwd",
        tol=TOLERANCE[dtype],
        priority=priority,
    )


# ---------------------------------------------------------------------------------------------
# Whole training step
# ---------------------------------------------------------------------------------------------


def mlp_step_case(
    M: int, dims: tuple[int, ...], dtype: torch.dtype, device: torch.device, priority: int
) -> Case:
    """zero_grad, forward of a 4-layer GELU MLP, MSE loss, backward, SGD (momentum 0.9) step."""
    dname = DTYPE_NAMES[dtype]
    el = torch.empty((), dtype=dtype).element_size()
    lr, momentum = 1e-3, 0.9

    def make_set(i: int) -> dict[str, Any]:
        g = _gen(device, 5000 + i)
        return {
            "x": _randn((M, dims[0]), g, device, dtype),
            "t": _randn((M, dims[-1]), g, device, dtype),
        }

    def native_model() -> nn.Sequential:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for j, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(d_in, d_out, device=device, dtype=dtype))
            if j < len(dims) - 2:
                layers.append(nn.GELU())
        return nn.Sequential(*layers)

    def bind(provider: str) -> Bound:
        model = native_model()
        if provider == NATIVE:
            fn, loss_fn = model, nn.MSELoss()
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
            label = "nn.Sequential(nn.Linear, nn.GELU, ...) + nn.MSELoss + torch.optim.SGD, eager"
        elif provider == COMPILE:
            fn, loss_fn = _compile(model), nn.MSELoss()
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
            label = "torch.compile(model) + nn.MSELoss + torch.optim.SGD"
        elif provider == MANUALBP:
            mbp = _manualbp()
            model = mbp.convert(copy.deepcopy(model))
            fn, loss_fn = model, mbp.MSELoss()
            try:
                from manualbp.optim import SGD

                opt = SGD(model.parameters(), lr=lr, momentum=momentum)
                label = "manualbp.convert(model) + manualbp.MSELoss + manualbp.optim.SGD"
            except Exception as e:
                opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
                label = (
                    "manualbp.convert(model) + manualbp.MSELoss + torch.optim.SGD "
                    f"(manualbp.optim.SGD unavailable: {type(e).__name__})"
                )
        else:
            raise UnavailableError(f"provider {provider!r} does not apply to this case")

        def step(s: dict[str, Any]) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(fn(s["x"]), s["t"]).backward()
            opt.step()

        return Bound(
            modes={"step": (lambda s: s, step)},
            label=label,
            output=lambda s: loss_fn(fn(s["x"]), s["t"]).detach(),
        )

    pairs = list(itertools.pairwise(dims))
    flops = sum(6.0 * M * a * b for a, b in pairs) - 2.0 * M * pairs[0][0] * pairs[0][1]
    return Case(
        name=f"mlp_step/{dname}/M{M}_{'-'.join(map(str, dims))}",
        group="mlp_step",
        params={
            "M": M,
            "dims": list(dims),
            "activation": "gelu",
            "dtype": dname,
            "optimizer": f"SGD(lr={lr}, momentum={momentum})",
        },
        modes=["step"],
        providers=[NATIVE, COMPILE, MANUALBP],
        metric="tflops",
        work={"step": flops},
        work_note="GEMM FLOPs: 3 GEMMs of 2*M*in*out per layer, minus the first layer's dX "
        "(the input needs no grad); activations, loss and optimizer not counted",
        dtype=dtype,
        make_set=make_set,
        bind=bind,
        set_bytes=M * (dims[0] + dims[-1]) * el,
        plot_key=f"mlp_step_{dname}",
        plot_x=float(M),
        plot_x_label=f"M{M}",
        memory_mode="step",
        tol=TOLERANCE[dtype] * 2,
        priority=priority,
    )


# ---------------------------------------------------------------------------------------------
# The suites
# ---------------------------------------------------------------------------------------------


def build_cases(device: torch.device, quick: bool) -> list[Case]:
    """Every case of the suite for ``device``, most important first (``priority`` ascending).

    On CUDA: MLP training sizes (tokens M = 8192). On CPU: small sizes (the reference path),
    and no fp16 (torch's CPU fp16 GEMM is no fast path).
    ``quick`` keeps a small subset (bf16 on CUDA, fp32 on CPU).
    """
    cuda = device.type == "cuda"
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    cases: list[Case] = []
    if quick:
        dt = bf16 if cuda else fp32
        M = GPU_TOKENS if cuda else CPU_QUICK_TOKENS
        shapes = [(4096, 4096)] if cuda else CPU_QUICK_LINEAR_SHAPES
        for act in (None, "gelu"):
            for K, N in shapes:
                cases.append(linear_case(M, K, N, act, dt, device, 0))
        for log2n in [24, 26] if cuda else CPU_QUICK_MSE_LOG2:
            cases.append(mse_case(log2n, fp32, device, 0))
        dims = GPU_MLP if cuda else CPU_QUICK_MLP
        for momentum in (0.0, 0.9):
            cases.append(sgd_case(dims, momentum, fp32, device, 0))
        K, N = shapes[0]
        cases.append(linear_mse_case(M, K, N, dt, device, 0))
        cases.append(mlp_step_case(M, dims, dt, device, 0))
        return cases

    M = GPU_TOKENS if cuda else CPU_TOKENS
    shapes = GPU_LINEAR_SHAPES if cuda else CPU_LINEAR_SHAPES
    mse_sizes = GPU_MSE_LOG2 if cuda else CPU_MSE_LOG2
    dims = GPU_MLP if cuda else CPU_MLP
    largest = shapes[-1]
    # Priority 0: what the targets are stated on.
    for act in ("gelu", None):
        for K, N in shapes:
            cases.append(linear_case(M, K, N, act, bf16, device, 0))
    for log2n in mse_sizes:
        cases.append(mse_case(log2n, fp32, device, 0))
    for momentum in (0.0, 0.9):
        cases.append(sgd_case(dims, momentum, fp32, device, 0))
    for K, N in [(4096, 1024), (4096, 4096), (4096, 8192)] if cuda else shapes[1:]:
        cases.append(linear_mse_case(M, K, N, bf16, device, 0))
    cases.append(mlp_step_case(M, dims, bf16, device, 0))
    # Priority 1: the rest of the bf16 / fp16 matrix.
    for K, N in shapes:
        cases.append(linear_case(M, K, N, "relu", bf16, device, 1))
    if cuda:  # torch's CPU fp16 GEMM is no fast path (seconds per call): GPU only
        for act in ACTIVATIONS:
            for K, N in shapes:
                cases.append(linear_case(M, K, N, act, fp16, device, 1))
    for log2n in mse_sizes:
        cases.append(mse_case(log2n, bf16, device, 1))
    # Priority 2: fp32 (IEEE unless the float32 matmul precision says otherwise).
    for act in ACTIVATIONS:
        for K, N in shapes:
            if largest != (K, N):
                cases.append(linear_case(M, K, N, act, fp32, device, 2))
    cases.append(mlp_step_case(M, dims, fp32, device, 2))
    for momentum in (0.0, 0.9):
        cases.append(sgd_case(dims, momentum, bf16, device, 2))
    # Priority 3: the largest fp32 GEMMs, dropped first when time runs out.
    for act in ACTIVATIONS:
        cases.append(linear_case(M, *largest, act, fp32, device, 3))
    cases.sort(key=lambda c: c.priority)  # stable: definition order within a priority
    return cases
