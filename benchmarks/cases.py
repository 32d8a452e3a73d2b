"""The benchmark cases: what is measured, on which providers, and how much work it is.

A :class:`Case` makes its input sets (``make_set(i)``, seeded by ``i``), binds each provider
(``bind(provider)`` returns a :class:`Bound`: per mode an untimed ``prepare(set)`` and the timed
``run(prepared)``) and states each mode's work: FLOPs for the GEMM cases (``2*M*N*K`` per GEMM;
a Linear forward is 1 GEMM, its backward 2), bytes that must move for the memory-bound ones
(``work_note``). The providers are described in benchmarks/README.md; the suites are in
:mod:`benchmarks.suites`, the CPU run's host-overhead cases in :mod:`benchmarks.host_cases`.
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

from benchmarks.bounds import (
    linear_min_bytes,
    mlp_flops,
    mlp_infer_min_bytes,
    mlp_step_min_bytes,
    second_order_flops,
    second_order_min_bytes,
)
from benchmarks.ceilings import DTYPE_NAMES

__all__ = ["Bound", "Case", "UnavailableError", "NATIVE", "COMPILE", "MANUALBP",
           "COMPILE_MAX_AUTOTUNE", "MANUALBP_CONVERT", "MANUALBP_TRITON", "MANUALBP_CUBLAS",
           "LINEAR_CANDIDATES", "COMPILE_PROVIDERS", "TRITON_PROVIDERS", "fused_mlp_infer_case",
           "fused_mlp_step_case", "second_order_case", "linear_case", "linear_mse_case",
           "mlp_step_case", "mse_case", "sgd_case"]  # fmt: skip

NATIVE = "native"
COMPILE = "compile"
MANUALBP = "manualbp"
NATIVE_FUSED = "native_fused"
MANUALBP_UNFUSED = "manualbp_unfused"
COMPILE_MAX_AUTOTUNE = "compile_max_autotune"
MANUALBP_CONVERT = "manualbp_convert"
MANUALBP_TRITON = "manualbp_triton"
MANUALBP_CUBLAS = "manualbp_cublas"
# The providers that force one candidate of the Linear choice: provider -> candidate
# (manualbp.kernels.linear.IMPLS).
LINEAR_CANDIDATES = {MANUALBP_TRITON: "triton", MANUALBP_CUBLAS: "cublas"}
# The providers that run torch.compile (skipped on CPU unless --cpu-compile).
COMPILE_PROVIDERS = (COMPILE, COMPILE_MAX_AUTOTUNE)
# The providers whose calls launch manualbp's Triton kernels.
TRITON_PROVIDERS = (MANUALBP, MANUALBP_UNFUSED, MANUALBP_CONVERT, *LINEAR_CANDIDATES)

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
    unavailable: dict[str, str] = field(default_factory=dict)  # mode -> why it is not offered
    # What the provider decided while it ran (e.g. the Linear candidates its per-shape choice
    # kept), read after timing and stored in its record.
    details: Callable[[], dict[str, Any]] | None = None


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
    # Providers measured in a later pass (at this priority) than the rest of the case: e.g.
    # torch.compile where no priority-0 target needs it (its warm-up is the costly part).
    provider_priority: dict[str, int] = field(default_factory=dict)
    # Per mode: the bytes any implementation of this dataflow must move (see
    # benchmarks.bounds); with the FLOPs in ``work`` it gives the case's best achievable time.
    min_bytes: dict[str, float] | None = None
    # Time the providers side by side (interleaved repetitions) instead of one after another.
    interleaved: bool = False
    # torch threads while this case runs (CPU); None: leave as set.
    threads: int | None = None
    # Samples (rows) one call processes: the results then also report samples/s.
    samples: int | None = None

    def priority_of(self, provider: str) -> int:
        """The priority of the pass that measures ``provider``."""
        return self.provider_priority.get(provider, self.priority)


TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
ACT_MODULES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "softplus": nn.Softplus,
    "sin": lambda: _manualbp("Sine")(),  # torch has no sine module: manualbp's (plain torch.sin)
}  # fmt: skip


def _gen(device: torch.device, seed: int) -> torch.Generator | None:
    """A generator seeded with ``seed``; none on the ``meta`` device (no values: the plan)."""
    return None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)


def _randn(
    shape: tuple[int, ...], g: torch.Generator | None, device: torch.device, dtype: torch.dtype
):
    return torch.randn(shape, generator=g, device=device, dtype=dtype)


def _input_set(
    device: torch.device, seed: int, dtype: torch.dtype, *, grad: bool, **shapes: tuple[int, ...]
) -> dict[str, Any]:
    """One random tensor per keyword (``x``, then ``gy`` or ``t``), drawn in that order; with
    ``grad``, ``x`` requires grad and is listed in ``leaves`` (its gradient is cleared)."""
    g = _gen(device, seed)
    s: dict[str, Any] = {k: _randn(shape, g, device, dtype) for k, shape in shapes.items()}
    if grad:
        s["leaves"] = [s["x"].requires_grad_()]
    return s


def _pick(provider: str, makers: dict[str, Callable[[], Any]]) -> Any:
    """``makers[provider]()``; UnavailableError for a provider the case does not have."""
    if provider not in makers:
        raise UnavailableError(f"provider {provider!r} does not apply to this case")
    return makers[provider]()


def _manualbp(name: str | None = None) -> Any:
    """``manualbp`` (or its attribute ``name``), UnavailableError where it does not exist."""
    try:
        import manualbp
    except Exception as e:
        raise UnavailableError(f"import manualbp failed: {type(e).__name__}: {e}") from e
    if name is None:
        return manualbp
    if getattr(manualbp, name, None) is None:
        raise UnavailableError(f"not available: manualbp.{name} does not exist yet")
    return getattr(manualbp, name)


def _compile(obj: Any, mode: str | None = None) -> Any:
    """``torch.compile`` (default mode, or ``mode``), specialised to each shape it sees: the
    runner does not reset dynamo between cases (it raises the recompile limits instead), so
    without ``dynamic=False`` the second shape of a function would get a dynamic-shape graph."""
    return torch.compile(obj, dynamic=False, mode=mode)


def _autograd_modes(
    forward: Callable[[Any], Tensor], leaves: list[Tensor], *, loss: bool
) -> dict[str, tuple[Prepare, Run]]:
    """fwd / bwd / fwd+bwd of ``forward(set)``; the backward seeds ``set["gy"]`` unless
    ``loss`` (a scalar). Gradients are set to ``None`` before each call (untimed)."""

    def clear(s: Any) -> Any:
        for t in (*leaves, *s["leaves"]):
            t.grad = None
        return s

    def prep_bwd(s: Any) -> Any:
        return forward(clear(s)), None if loss else s["gy"]

    return {
        "fwd+bwd": (clear, lambda s: forward(s).backward(None if loss else s["gy"])),
        "fwd": (lambda s: s, forward),
        "bwd": (prep_bwd, lambda out_gy: out_gy[0].backward(out_gy[1])),
    }


def _autograd_bound(
    forward: Callable[[Any], Tensor], leaves: list[Tensor], label: str, *, loss: bool
) -> Bound:
    """Mode fwd+bwd of ``forward(set)`` (:func:`_autograd_modes`), checked on its result."""
    modes = _autograd_modes(forward, leaves, loss=loss)
    return Bound({"fwd+bwd": modes["fwd+bwd"]}, label, lambda s: forward(s).detach())


def _copy_linear_(dst_weight: Tensor, dst_bias: Tensor | None, src: nn.Linear) -> None:
    with torch.no_grad():
        dst_weight.copy_(src.weight)
        if dst_bias is not None and src.bias is not None:
            dst_bias.copy_(src.bias)


def _sequential(
    dims: tuple[int, ...], act: str | None, device, dtype, *, act_last: bool = False
) -> nn.Sequential:
    """``Linear, act, Linear, act, ..., Linear`` (``act_last``: an activation after the last
    Linear too), seeded."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for j, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out, device=device, dtype=dtype))
        if act is not None and (act_last or j < len(dims) - 2):
            layers.append(ACT_MODULES[act]())
    return nn.Sequential(*layers)


class _ModelLoss(nn.Module):
    """``scale * loss(model(x), target)`` as one module: the unfused Linear + MSE head, or the
    part of a training step that autograd records (and ``torch.compile`` compiles as one
    forward/backward graph)."""

    def __init__(self, model: nn.Module, loss: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.model, self.loss, self.scale = model, loss, scale

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        loss = self.loss(self.model(x), target)
        return loss if self.scale == 1.0 else loss * self.scale


# ---- Linear (+ bias, activation)


def _gemms_native(weight: Tensor) -> tuple[Prepare, Run]:
    """Mode ``gemms``, native: the layer's three GEMMs alone (forward ``X W^T``, ``dX = dY W``,
    ``dW = dY^T X``, dY standing in for dZ) as ``torch.matmul`` on the same operand layouts."""

    def run(s: dict[str, Any]) -> None:
        with torch.no_grad():
            x, g = s["x"], s["gy"]
            torch.matmul(x, weight.t())
            torch.matmul(g, weight)
            torch.matmul(g.t(), x)

    return (lambda s: s, run)


def _gemms_manualbp(weight: Tensor) -> tuple[Prepare, Run]:
    """Mode ``gemms``, manualbp: the same three GEMMs on the kernels the Triton candidate of
    manualbp.Linear launches (forward kernel without bias or activation, the GEMM for dX, dW's
    deterministic split-K GEMM). Also on ``meta`` weights: what the plan records."""
    if weight.device.type not in ("cuda", "meta"):
        raise UnavailableError("manualbp's GEMM kernels run on CUDA only")
    try:
        from manualbp.kernels._host import on_device
        from manualbp.kernels._matmul import matmul
        from manualbp.kernels._splitk import splitk_matmul
        from manualbp.kernels.linear import FORWARDS
    except Exception as e:
        raise UnavailableError(f"manualbp's GEMM kernels: {type(e).__name__}: {e}") from e
    w = weight.detach()

    def run(s: dict[str, Any]) -> None:
        x, g = s["x"].detach(), s["gy"]
        with on_device(x.device):
            FORWARDS["triton"](x, w, None, None, 0.0, torch.empty_like(g), None)
            matmul(g, w)
            splitk_matmul(g.t(), x)

    return (lambda s: s, run)


def _gemms_measured_by_manualbp() -> tuple[Prepare, Run]:
    raise UnavailableError(
        "the GEMMs alone run the Triton kernels directly, with no choice to force: measured as "
        f"{MANUALBP!r}'s gemms mode"
    )


def _linear_choice() -> Any:
    """``manualbp.kernels.linear``, where the Linear choice lives (UnavailableError where it
    cannot be imported)."""
    try:
        from manualbp.kernels import linear
    except Exception as e:
        raise UnavailableError(f"manualbp's Linear choice: {type(e).__name__}: {e}") from e
    return linear


def _force_bound(bound: Bound, impl: str) -> Bound:
    """``bound`` with every call (each mode's prepare and run, the output check) under the
    Linear choice's ``force(impl)`` (process-wide, so also on autograd's device threads):
    untimed prepares too, so that no call of it reaches the choice."""
    force = _linear_choice().force

    def forced(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            with force(impl):
                return fn(*args)

        return call

    bound.modes = {m: (forced(prep), forced(run)) for m, (prep, run) in bound.modes.items()}
    if bound.output is not None:
        bound.output = forced(bound.output)
    return bound


def _choices_of(M: int, K: int, N: int, act: str | None, dtype: torch.dtype) -> dict[str, str]:
    """The Linear choice's kept candidate for each bucket of this layer shape (forward with
    this activation, dX, dW), from the kept decisions: ``{bucket key: impl}``."""
    from manualbp.kernels import _tuning

    tag = str(dtype).removeprefix("torch.")
    shape = f"|M={1 << max(M - 1, 0).bit_length()}|N={N}|K={K}"  # M bucketed: a power of two
    out = {}
    for (_, key), impl in _tuning.decisions().items():
        parts = key.split("|")
        if not key.endswith(shape) or not parts[1].startswith(tag):
            continue
        if parts[0] == "fwd" and parts[2] != (act or "none"):
            continue
        out[key] = impl
    return dict(sorted(out.items()))


def linear_case(
    M: int,
    K: int,
    N: int,
    act: str | None,
    dtype: torch.dtype,
    device: torch.device,
    priority: int,
    *,
    gemms: bool = False,
    candidates: bool = False,
    provider_priority: dict[str, int] | None = None,
) -> Case:
    """``act(x W^T + b)`` with ``x`` of shape ``(M, K)`` requiring grad (an MLP's hidden layer).

    ``gemms``: also mode ``gemms``, the layer's three GEMMs alone on manualbp's kernels against
    ``torch.matmul`` at the same shapes (GEMM efficiency without bias, activation or autograd).
    ``candidates``: also the providers that force each candidate of the Linear choice
    (:data:`LINEAR_CANDIDATES`), so that each is judged against native on its own.
    """
    dname = DTYPE_NAMES[dtype]
    aname = act or "none"

    def bind(provider: str) -> Bound:
        model, fn, label, gemm_mode = _bind_linear(provider, K, N, act, device, dtype)
        forward = lambda s: fn(s["x"])
        modes = _autograd_modes(forward, list(model.parameters()), loss=False)
        out = Bound(modes, label, lambda s: forward(s).detach())
        if gemms and gemm_mode is not None:
            try:
                out.modes["gemms"] = gemm_mode()
            except UnavailableError as e:
                out.unavailable["gemms"] = str(e)
        if provider in LINEAR_CANDIDATES:
            return _force_bound(out, LINEAR_CANDIDATES[provider])
        if provider == MANUALBP and device.type == "cuda":
            out.details = lambda: {"linear_choice": _choices_of(M, K, N, act, dtype)}
        return out

    gemm = 2.0 * M * N * K
    work = {"fwd": gemm, "bwd": 2 * gemm, "fwd+bwd": 3 * gemm}
    if gemms:
        work["gemms"] = 3 * gemm
    return Case(
        name=f"linear/{aname}/{dname}/M{M}_K{K}_N{N}",
        group="linear",
        params={"M": M, "K": K, "N": N, "activation": act, "dtype": dname, "bias": True},
        modes=["fwd+bwd", "fwd", "bwd"] + (["gemms"] if gemms else []),
        providers=[NATIVE, COMPILE, MANUALBP] + (list(LINEAR_CANDIDATES) if candidates else []),
        metric="tflops",
        work=work,
        work_note="2*M*N*K FLOPs per GEMM; fwd = 1 GEMM, bwd = 2 (dX, dW), fwd+bwd = 3; "
        "gemms = the 3 GEMMs alone",
        dtype=dtype,
        make_set=lambda i: _input_set(device, 1000 + i, dtype, grad=True, x=(M, K), gy=(M, N)),
        bind=bind,
        set_bytes=(M * K + M * N) * dtype.itemsize,
        plot_key=f"linear_{aname}_{dname}",
        plot_x=float(2 * M * N * K),
        plot_x_label=f"K{K}xN{N}",
        memory_mode="fwd+bwd",
        tol=TOLERANCE[dtype],
        priority=priority,
        provider_priority=dict(provider_priority or {}),
        min_bytes=linear_min_bytes(M, K, N, act, dtype.itemsize, gemms=gemms),
    )


def _bind_linear(
    provider: str, K: int, N: int, act: str | None, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, Callable[[Tensor], Tensor], str, Callable[[], Any] | None]:
    """``(model, fn, label, gemm_mode)`` of one provider of a Linear case; ``gemm_mode()``
    makes its ``gemms`` mode (``None``: not offered)."""
    native = _sequential((K, N), act, device, dtype, act_last=True)
    act_label = "" if act is None else f" + nn.{ACT_MODULES[act].__name__}"
    if provider == COMPILE:
        return native, _compile(native), f"nn.Linear{act_label}, torch.compile", None
    if provider == NATIVE:
        weight = native[0].weight
        return native, native, f"nn.Linear{act_label}, eager", lambda: _gemms_native(weight)
    if provider not in (MANUALBP, *LINEAR_CANDIDATES):
        raise UnavailableError(f"provider {provider!r} does not apply to this case")
    model = _manualbp().Linear(K, N, activation=act, device=device, dtype=dtype)
    _copy_linear_(model.weight, model.bias, native[0])
    label = f"manualbp.Linear(activation={act!r})"
    if provider == MANUALBP:
        if device.type == "cuda":
            label += f", Linear GEMMs: {_linear_choice_mode()}"
        return model, model, label, lambda: _gemms_manualbp(model.weight)
    impl = LINEAR_CANDIDATES[provider]
    from manualbp._mode import kernels_for

    if not kernels_for(model.weight):
        raise UnavailableError(
            f"not applicable: forcing the {impl!r} Linear candidate applies to the Triton "
            f"backend; manualbp runs its reference path here (measured as {MANUALBP!r})"
        )
    _linear_choice()  # raises UnavailableError if the choice does not exist
    label += f", linear_choice.force({impl!r})"
    return model, model, label, _gemms_measured_by_manualbp


def _linear_choice_mode() -> str:
    """How the ``manualbp`` provider's Linear GEMMs are picked (``MANUALBP_LINEAR_IMPL``)."""
    try:
        mode = _linear_choice().mode()
    except (UnavailableError, ValueError) as e:
        return f"unknown ({e})"
    return "per-shape choice (auto)" if mode == "auto" else f"forced {mode!r} (environment)"


# ---- MSE


def _mse_native(x: Tensor, t: Tensor) -> Tensor:
    return F.mse_loss(x, t)


def mse_case(
    log2n: int,
    dtype: torch.dtype,
    device: torch.device,
    priority: int,
    *,
    provider_priority: dict[str, int] | None = None,
) -> Case:
    """``mse_loss(x, t)`` (mean) forward + backward on ``2**log2n`` elements."""
    n = 1 << log2n
    dname = DTYPE_NAMES[dtype]

    def bind(provider: str) -> Bound:
        fn, label = _pick(
            provider,
            {
                NATIVE: lambda: (_mse_native, "F.mse_loss, eager"),
                COMPILE: lambda: (_compile(_mse_native), "F.mse_loss, torch.compile"),
                MANUALBP: lambda: (_manualbp().functional.mse_loss, "manualbp.functional.mse_loss"),
            },
        )
        return _autograd_bound(lambda s: fn(s["x"], s["t"]), [], label, loss=True)

    return Case(
        name=f"mse/{dname}/n2^{log2n}",
        group="mse",
        params={"numel": n, "log2_numel": log2n, "dtype": dname, "reduction": "mean"},
        modes=["fwd+bwd"],
        providers=[NATIVE, COMPILE, MANUALBP],
        metric="gbps",
        work={"fwd+bwd": 3.0 * n * dtype.itemsize},
        work_note="bytes that must move: read input and target, write grad_input = 3*n*elsize",
        dtype=dtype,
        make_set=lambda i: _input_set(device, 2000 + i, dtype, grad=True, x=(n,), t=(n,)),
        bind=bind,
        set_bytes=3 * n * dtype.itemsize,
        plot_key=f"mse_{dname}",
        plot_x=float(n),
        plot_x_label=f"2^{log2n}",
        memory_mode="fwd+bwd",
        tol=TOLERANCE[dtype],
        priority=priority,
        provider_priority=dict(provider_priority or {}),
    )


# ---- SGD step


def _sgd_maker(
    provider: str, lr: float, momentum: float, device: torch.device, dtype: torch.dtype
) -> tuple[Callable[[list[Tensor]], Any], str]:
    """``(make(params) -> optimizer, label)`` of one SGD provider."""
    if provider == NATIVE:
        make = lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum)
        return make, "torch.optim.SGD (default: foreach on CUDA, for-loop on CPU)"
    if provider == NATIVE_FUSED:
        make = lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum, fused=True)
        probe = nn.Parameter(torch.zeros(4, device=device, dtype=dtype))
        probe.grad = torch.zeros_like(probe)
        try:
            make([probe]).step()
        except Exception as e:
            raise UnavailableError(f"fused SGD not supported here: {type(e).__name__}: {e}") from e
        return make, "torch.optim.SGD(fused=True)"
    if provider == MANUALBP:
        sgd = _manualbp("optim").SGD
        return (lambda ps: sgd(ps, lr=lr, momentum=momentum)), "manualbp.optim.SGD"
    raise UnavailableError(f"provider {provider!r} does not apply to this case")


def _sgd_bound(make: Callable[[list[Tensor]], Any], label: str) -> Bound:
    """Mode ``step``: one ``opt.step()`` per set (one optimizer per set, made untimed)."""
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


def sgd_case(
    dims: tuple[int, ...],
    momentum: float,
    dtype: torch.dtype,
    device: torch.device,
    priority: int,
) -> Case:
    """One ``optimizer.step()`` over the parameters (with random gradients) of an MLP."""
    dname = DTYPE_NAMES[dtype]
    shapes = [s for k, n in itertools.pairwise(dims) for s in ((n, k), (n,))]  # W (n, k), b (n,)
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
        return _sgd_bound(*_sgd_maker(provider, lr, momentum, device, dtype))

    k = 5 if momentum else 3
    return Case(
        name=f"sgd/{dname}/momentum{momentum:g}",
        group="sgd",
        params={"dims": list(dims), "numel": numel, "momentum": momentum, "lr": lr, "dtype": dname},
        modes=["step"],
        providers=[NATIVE, NATIVE_FUSED, MANUALBP],
        metric="gbps",
        work={"step": float(k * numel * dtype.itemsize)},
        work_note=(
            "bytes that must move per step: read param and grad, write param"
            + (", read and write the momentum buffer" if momentum else "")
            + f" = {k}*numel*elsize"
        ),
        dtype=dtype,
        make_set=make_set,
        bind=bind,
        set_bytes=(3 if momentum else 2) * numel * dtype.itemsize,
        plot_key=f"sgd_{dname}",
        plot_x=float(momentum),
        plot_x_label=f"momentum={momentum:g}",
        memory_mode="step",
        tol=TOLERANCE[dtype],
        priority=priority,
    )


# ---- Fused Linear + MSE head


def _bind_linear_mse(
    provider: str, native_linear: Callable[[], nn.Linear], K: int, N: int, dtype, device
) -> tuple[nn.Module, Callable[..., Tensor], str]:
    """``(head, fn, label)`` of one provider of a LinearMSELoss case."""
    if provider in (NATIVE, COMPILE):
        head = _ModelLoss(native_linear(), nn.MSELoss())
        if provider == COMPILE:
            return head, _compile(head), "nn.Linear + nn.MSELoss, torch.compile"
        return head, head, "nn.Linear + nn.MSELoss, eager"
    if provider == MANUALBP:
        head = _manualbp("LinearMSELoss")(
            K, N, bias=True, reduction="mean", device=device, dtype=dtype
        )
        _copy_linear_(head.weight, head.bias, native_linear())
        return head, head, "manualbp.LinearMSELoss"
    if provider == MANUALBP_UNFUSED:
        mbp = _manualbp()
        lin = mbp.Linear(K, N, device=device, dtype=dtype)
        _copy_linear_(lin.weight, lin.bias, native_linear())
        head = _ModelLoss(lin, mbp.MSELoss())
        return head, head, "manualbp.Linear + manualbp.MSELoss"
    raise UnavailableError(f"provider {provider!r} does not apply to this case")


def linear_mse_case(
    M: int,
    K: int,
    N: int,
    dtype: torch.dtype,
    device: torch.device,
    priority: int,
    *,
    provider_priority: dict[str, int] | None = None,
) -> Case:
    """``loss = head(x, target)`` forward + backward: the fused head against the unfused pair."""
    dname = DTYPE_NAMES[dtype]

    def bind(provider: str) -> Bound:
        native_linear = lambda: _sequential((K, N), None, device, dtype)[0]
        head, fn, label = _bind_linear_mse(provider, native_linear, K, N, dtype, device)
        forward = lambda s: fn(s["x"], s["t"])
        return _autograd_bound(forward, list(head.parameters()), label, loss=True)

    return Case(
        name=f"linear_mse/{dname}/M{M}_K{K}_N{N}",
        group="linear_mse",
        params={"M": M, "K": K, "N": N, "dtype": dname, "reduction": "mean", "bias": True},
        modes=["fwd+bwd"],
        providers=[NATIVE, COMPILE, MANUALBP, MANUALBP_UNFUSED],
        metric="tflops",
        work={"fwd+bwd": 3 * 2.0 * M * N * K},
        work_note="3 GEMMs of 2*M*N*K FLOPs (forward, dX, dW); the loss itself is not counted",
        dtype=dtype,
        make_set=lambda i: _input_set(device, 4000 + i, dtype, grad=True, x=(M, K), t=(M, N)),
        bind=bind,
        set_bytes=(M * K + M * N) * dtype.itemsize,
        plot_key=f"linear_mse_{dname}",
        plot_x=float(2 * M * N * K),
        plot_x_label=f"K{K}xN{N}",
        memory_mode="fwd+bwd",
        tol=TOLERANCE[dtype],
        priority=priority,
        provider_priority=dict(provider_priority or {}),
    )


# ---- Whole training step

MLP_LR, MLP_MOMENTUM = 1e-3, 0.9


def _bind_mlp(provider: str, model: nn.Sequential) -> tuple[Any, nn.Module, Any, str]:
    """``(fn, loss_fn, optimizer, label)`` of one provider of the MLP step."""
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=MLP_LR, momentum=MLP_MOMENTUM)
    if provider == NATIVE:
        label = "nn.Sequential(nn.Linear, nn.GELU, ...) + nn.MSELoss + torch.optim.SGD, eager"
        return model, nn.MSELoss(), sgd(model), label
    if provider == COMPILE:
        label = "torch.compile(model) + nn.MSELoss + torch.optim.SGD"
        return _compile(model), nn.MSELoss(), sgd(model), label
    if provider != MANUALBP:
        raise UnavailableError(f"provider {provider!r} does not apply to this case")
    mbp = _manualbp()
    model = mbp.convert(copy.deepcopy(model))
    opt = mbp.optim.SGD(model.parameters(), lr=MLP_LR, momentum=MLP_MOMENTUM)
    label = "manualbp.convert(model) + manualbp.MSELoss + manualbp.optim.SGD"
    return model, mbp.MSELoss(), opt, label


def mlp_step_case(
    M: int,
    dims: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    priority: int,
    *,
    provider_priority: dict[str, int] | None = None,
) -> Case:
    """zero_grad, forward of a 4-layer GELU MLP, MSE loss, backward, SGD (momentum 0.9) step."""
    dname = DTYPE_NAMES[dtype]
    params = {"M": M, "dims": list(dims), "activation": "gelu", "dtype": dname}
    params["optimizer"] = f"SGD(lr={MLP_LR}, momentum={MLP_MOMENTUM})"

    def bind(provider: str) -> Bound:
        fn, loss_fn, opt, label = _bind_mlp(provider, _sequential(dims, "gelu", device, dtype))

        def step(s: dict[str, Any]) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(fn(s["x"]), s["t"]).backward()
            opt.step()

        output = lambda s: loss_fn(fn(s["x"]), s["t"]).detach()
        return Bound(modes={"step": (lambda s: s, step)}, label=label, output=output)

    return Case(
        name=f"mlp_step/{dname}/M{M}_{'-'.join(map(str, dims))}",
        group="mlp_step",
        params=params,
        modes=["step"],
        providers=[NATIVE, COMPILE, MANUALBP],
        metric="tflops",
        work={"step": mlp_flops(M, dims, train=True)},
        work_note="GEMM FLOPs: 3 GEMMs of 2*M*in*out per layer, minus the first layer's dX "
        "(the input needs no grad); activations, loss and optimizer not counted",
        dtype=dtype,
        make_set=lambda i: _input_set(
            device, 5000 + i, dtype, grad=False, x=(M, dims[0]), t=(M, dims[-1])
        ),
        bind=bind,
        set_bytes=M * (dims[0] + dims[-1]) * dtype.itemsize,
        plot_key=f"mlp_step_{dname}",
        plot_x=float(M),
        plot_x_label=f"M{M}",
        memory_mode="step",
        tol=TOLERANCE[dtype] * 2,
        priority=priority,
        provider_priority=dict(provider_priority or {}),
    )


# ---- Fused narrow MLP (issue 15): a coordinate network's training step and inference

# A coordinate network as instant-ngp builds one: the input is a 16-level x 2-feature
# multiresolution hash encoding (32 values a point; the encoding itself is not benchmarked),
# 4 hidden ReLU layers of width 64 or 128, 16 outputs (instant-ngp's density MLP: a density and
# a 15-value geometry feature), no output activation.
NARROW_IN, NARROW_OUT, NARROW_HIDDEN, NARROW_ACT = 32, 16, 4, "relu"
# Pure fp16 training scales the loss (tiny-cuda-nn's default static loss scale for fp16, 128):
# the MSE gradient 2 (y - t) / numel is ~5e-7 (y - t) at 2^18 rows x 16 outputs, deep in fp16's
# subnormals (spacing 6e-8: 3 bits left), and x 128 near its smallest normal (6.1e-5). The
# learning rate divided by it keeps the update of the unscaled loss. bf16 has fp32's range.
LOSS_SCALE = {torch.float16: 128.0}


def narrow_dims(width: int) -> tuple[int, ...]:
    """``(32, width, width, width, width, 16)``: the layer dims of the fused-MLP cases."""
    return (NARROW_IN, *[width] * NARROW_HIDDEN, NARROW_OUT)


def _compiled_optimizer_step(opt: torch.optim.Optimizer) -> Callable[[], None]:
    """``opt.step`` under ``torch.compile`` (default mode), as PyTorch's "compiling the
    optimizer" recipe does: one graph of the whole foreach update."""

    def opt_step() -> None:
        opt.step()

    return _compile(opt_step)


def _bind_narrow_step(
    provider: str, native: nn.Sequential, scale: float, lr: float
) -> tuple[Callable[[Tensor, Tensor], Tensor], torch.optim.Optimizer, Callable[[], Any], str]:
    """``(loss_fn(x, t), optimizer, opt_step(), label)`` of one provider of the step."""
    if provider in (NATIVE, COMPILE, COMPILE_MAX_AUTOTUNE):
        head = _ModelLoss(native, nn.MSELoss(), scale)
        opt = torch.optim.SGD(native.parameters(), lr=lr, momentum=MLP_MOMENTUM)
        base = "nn.Sequential(nn.Linear, nn.ReLU, ...) + nn.MSELoss + torch.optim.SGD"
        if provider == NATIVE:
            return head, opt, opt.step, base + " (default: foreach on CUDA), eager"
        mode = "max-autotune" if provider == COMPILE_MAX_AUTOTUNE else None
        label = f"torch.compile(model + loss{'' if mode is None else f', mode={mode!r}'})"
        label += " + torch.compile(optimizer.step) (default mode)"
        return _compile(head, mode), opt, _compiled_optimizer_step(opt), label
    if provider == MANUALBP:
        model, label = _fused_mlp(native)
        head = _ModelLoss(model, _manualbp().MSELoss(), scale)
        label += " + manualbp.MSELoss"
    elif provider == MANUALBP_CONVERT:
        head = _manualbp().convert(_ModelLoss(copy.deepcopy(native), nn.MSELoss(), scale))
        model, label = head.model, "manualbp.convert(model + nn.MSELoss)"
    else:
        raise UnavailableError(f"provider {provider!r} does not apply to this case")
    opt = _manualbp("optim").SGD(model.parameters(), lr=lr, momentum=MLP_MOMENTUM)
    return head, opt, opt.step, label + " + manualbp.optim.SGD"


def _fused_mlp(native: nn.Sequential) -> tuple[nn.Module, str]:
    return _manualbp("FusedMLP").from_sequential(native), "manualbp.FusedMLP.from_sequential(model)"


def _unit_max(t: Tensor) -> Tensor:
    t = t.detach().float().reshape(-1)
    return t / t.abs().max().clamp_min(torch.finfo(torch.float32).tiny)


def _step_bound(loss_of: Callable[[Any], Tensor], opt: Any, opt_step: Callable[[], Any],
                label: str, scale: float = 1.0, precision: str | None = None) -> Bound:  # fmt: skip
    """Mode ``step``: zero_grad, ``loss_of(set)``, backward, ``opt_step()``, under
    :class:`_Precision`. The check's output: the first step's loss (``/ scale``) and every
    parameter's gradient, each scaled to a maximum of 1 (so that the check holds each gradient
    to the dtype's tolerance, not just the loss)."""
    params = [p for group in opt.param_groups for p in group["params"]]

    def step(s: dict[str, Any]) -> None:
        with _Precision(precision):
            opt.zero_grad(set_to_none=True)
            loss_of(s).backward()
            opt_step()

    def output(s: dict[str, Any]) -> Tensor:
        with _Precision(precision):
            opt.zero_grad(set_to_none=True)
            loss = loss_of(s)
            value = loss.detach().float().reshape(1) / scale
            loss.backward()
            out = torch.cat([value, *(_unit_max(p.grad) for p in params)])
            opt_step()
        return out

    return Bound(modes={"step": (lambda s: s, step)}, label=label, output=output)


def _narrow_infer_bound(provider: str, native: nn.Sequential) -> Bound:
    """Mode ``infer``: the forward under ``torch.inference_mode`` (no graph, nothing saved)."""
    sequential = "nn.Sequential(nn.Linear, nn.ReLU, ...)"
    fn, label = _pick(
        provider,
        {
            NATIVE: lambda: (native, f"{sequential}, eager"),
            COMPILE: lambda: (_compile(native), f"torch.compile({sequential})"),
            MANUALBP: lambda: _fused_mlp(native),
        },
    )

    def forward(s: dict[str, Any]) -> Tensor:
        with torch.inference_mode():
            return fn(s["x"])

    return Bound(modes={"infer": (lambda s: s, forward)}, label=label, output=forward)


def _log2(M: int) -> int | None:
    """``log2(M)`` for a power of two, else ``None``."""
    return M.bit_length() - 1 if M > 0 and M & (M - 1) == 0 else None


def _narrow_case(
    kind: str, M: int, width: int, dtype: torch.dtype, device: torch.device, **fields: Any
) -> Case:
    """What the fused MLP's ``step`` and ``infer`` cases on ``M`` rows share; ``fields``: the
    rest of the :class:`Case`, its ``params`` added to the shared ones. Input sets: x and, for
    the step, t (seeds 6000 + i; inference: x alone, 7000 + i)."""
    dims = narrow_dims(width)
    dname = DTYPE_NAMES[dtype]
    size = f"M{M}" if _log2(M) is None else f"M2^{_log2(M)}"
    shapes = {"x": (M, dims[0]), "t": (M, dims[-1])} if kind == "step" else {"x": (M, dims[0])}
    seed = 6000 if kind == "step" else 7000
    params = {
        "M": M, "log2_M": _log2(M), "width": width,
        "num_hidden_layers": NARROW_HIDDEN, "dims": list(dims),
        "activation": NARROW_ACT, "dtype": dname,
    }  # fmt: skip
    return Case(
        name=f"fused_mlp_{kind}/{dname}/w{width}x{NARROW_HIDDEN}_{size}",
        group=f"fused_mlp_{kind}",
        params=params | fields.pop("params", {}),
        modes=[kind],
        metric="tflops",
        dtype=dtype,
        make_set=lambda i: _input_set(device, seed + i, dtype, grad=False, **shapes),
        set_bytes=M * (dims[0] + dims[-1]) * dtype.itemsize,
        plot_key=f"fused_mlp_{kind}_{dname}_w{width}",
        plot_x=float(M),
        plot_x_label=size,
        memory_mode=kind,
        samples=M,
        **fields,
    )


def fused_mlp_step_case(
    M: int,
    width: int,
    dtype: torch.dtype,
    device: torch.device,
    priority: int,
    *,
    providers: list[str] | None = None,
    provider_priority: dict[str, int] | None = None,
) -> Case:
    """One training step of the coordinate network ``32 -> width x4 (ReLU) -> 16`` on ``M``
    rows: zero_grad, forward, MSE loss (scaled for fp16, :data:`LOSS_SCALE`), backward, SGD
    (momentum 0.9). The input needs no gradient (an encoding's output)."""
    dims = narrow_dims(width)
    scale = LOSS_SCALE.get(dtype, 1.0)
    optimizer = f"SGD(lr={MLP_LR}/loss_scale, momentum={MLP_MOMENTUM})"

    def bind(provider: str) -> Bound:
        native = _sequential(dims, NARROW_ACT, device, dtype)
        head, opt, opt_step, label = _bind_narrow_step(provider, native, scale, MLP_LR / scale)
        return _step_bound(lambda s: head(s["x"], s["t"]), opt, opt_step, label, scale)

    return _narrow_case(
        "step",
        M,
        width,
        dtype,
        device,
        params={"optimizer": optimizer, "loss": "MSE (mean)", "loss_scale": scale},
        providers=providers or [NATIVE, MANUALBP, COMPILE, MANUALBP_CONVERT, COMPILE_MAX_AUTOTUNE],
        work={"step": mlp_flops(M, dims, train=True)},
        work_note="GEMM FLOPs: 6*M*sum(k*n) over the layers less the first layer's dX (the "
        "input needs no grad); samples/s = M / time; bound: benchmarks/bounds.py "
        "(mlp_step_min_bytes)",
        bind=bind,
        tol=TOLERANCE[dtype] * 2,
        priority=priority,
        provider_priority=dict(provider_priority or {}),
        min_bytes={
            "step": mlp_step_min_bytes(M, dims, dtype.itemsize, momentum=bool(MLP_MOMENTUM))
        },
    )


def fused_mlp_infer_case(
    M: int,
    width: int,
    dtype: torch.dtype,
    device: torch.device,
    priority: int,
    *,
    provider_priority: dict[str, int] | None = None,
) -> Case:
    """The coordinate network's forward on ``M`` rows under ``torch.inference_mode``."""
    dims = narrow_dims(width)
    return _narrow_case(
        "infer",
        M,
        width,
        dtype,
        device,
        providers=[NATIVE, MANUALBP, COMPILE],
        work={"infer": mlp_flops(M, dims, train=False)},
        work_note="GEMM FLOPs: 2*M*sum(k*n) over the layers; samples/s = M / time; bound: "
        "benchmarks/bounds.py (mlp_infer_min_bytes)",
        bind=lambda p: _narrow_infer_bound(p, _sequential(dims, NARROW_ACT, device, dtype)),
        tol=TOLERANCE[dtype],
        priority=priority,
        provider_priority=dict(provider_priority or {}),
        min_bytes={"infer": mlp_infer_min_bytes(M, dims, dtype.itemsize)},
    )


# ---- The fused MLP's second order (issue 24): an input gradient inside the loss

#: A neural signed-distance field / interatomic potential: 3 coordinates -> 64 x4 -> 1 scalar.
SECOND_ORDER_DIMS = (3, 64, 64, 64, 64, 1)


def _second_order_loss(
    kind: str, net: nn.Module, x: Tensor, e_ref: Tensor, f_ref: Tensor
) -> Tensor:
    """``eikonal``: ``mean((|grad_x u| - 1)^2) + mean(u^2)`` (an SDF fit, IGR's loss on
    surface points); ``force``: ``mse(E, E_ref) + mse(-grad_x E, F_ref)`` (force matching).
    Plain autograd, as their users write it."""
    x = x.detach().requires_grad_()
    u = net(x)
    (g,) = torch.autograd.grad(u, x, torch.ones_like(u), create_graph=True)
    if kind == "eikonal":
        return ((g.norm(dim=-1) - 1) ** 2).mean() + u.square().mean()
    return F.mse_loss(u, e_ref) + F.mse_loss(-g, f_ref)


class _Precision:
    """``torch.set_float32_matmul_precision(value)`` for the ``with`` block (``None``: as is)."""

    def __init__(self, value: str | None) -> None:
        self.value, self.saved = value, None

    def __enter__(self) -> None:
        if self.value is not None:
            self.saved = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(self.value)

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            torch.set_float32_matmul_precision(self.saved)


def _second_order_bound(provider: str, native: nn.Sequential, kind: str,
                        precision: str | None) -> Bound:  # fmt: skip
    """Mode ``step``: zero_grad, the loss (its input gradient recorded), backward, SGD step.
    torch.compile cannot differentiate its own backward: its row says so (skipped with the
    reason) rather than disappearing."""
    seq = "nn.Sequential(nn.Linear, act, ...)"
    model, label = _pick(provider, {
        NATIVE: lambda: (native, seq),
        COMPILE: lambda: (_compile(native), f"torch.compile({seq})"),
        MANUALBP: lambda: _fused_mlp(native),
        MANUALBP_CONVERT: lambda: (_manualbp().convert(copy.deepcopy(native)),
                                   "manualbp.convert(model)"),
    })  # fmt: skip
    sgd = torch.optim.SGD if provider in (NATIVE, COMPILE) else _manualbp("optim").SGD
    opt = sgd(model.parameters(), lr=MLP_LR, momentum=MLP_MOMENTUM)

    def loss_of(s: dict[str, Any]) -> Tensor:
        try:
            return _second_order_loss(kind, model, s["x"], s["e"], s["f"])
        except RuntimeError as e:
            if provider == COMPILE and "double backward" in str(e):
                raise UnavailableError(f"unsupported: {e}") from e
            raise

    label += " + SGD" + ("" if precision is None else f", float32 matmul precision {precision!r}")
    return _step_bound(loss_of, opt, opt.step, label, precision=precision)


def second_order_case(
    kind: str, activation: str, M: int, dtype: torch.dtype, device: torch.device, priority: int
) -> Case:
    """One training step of ``3 -> 64 x4 (activation) -> 1`` on ``M`` points with the
    network's input gradient in the loss (:func:`_second_order_loss`): zero_grad, loss,
    backward (the backward of the recorded backward), SGD (momentum 0.9). fp32 runs with TF32
    matmuls (``torch.set_float32_matmul_precision("high")``) for every provider."""
    dims = SECOND_ORDER_DIMS
    dname = DTYPE_NAMES[dtype] + ("_tf32" if dtype == torch.float32 else "")
    precision = "high" if dtype == torch.float32 else None
    size = f"M{M}" if _log2(M) is None else f"M2^{_log2(M)}"
    shapes = {"x": (M, dims[0]), "e": (M, 1), "f": (M, dims[0])}
    return Case(
        name=f"second_order_{kind}/{dname}/{activation}_{size}",
        group="second_order_step",
        params={
            "loss": kind,
            "activation": activation,
            "M": M,
            "log2_M": _log2(M),
            "dims": list(dims),
            "dtype": dname,
            "optimizer": f"SGD(lr={MLP_LR}, momentum={MLP_MOMENTUM})",
        },
        modes=["step"],
        providers=[NATIVE, MANUALBP, COMPILE, MANUALBP_CONVERT],
        metric="tflops",
        work={"step": second_order_flops(M, dims)},
        work_note="GEMM FLOPs of the step: 16*M*sum(k*n) (benchmarks/bounds.py "
        "second_order_flops); samples/s = M / time; bound: second_order_min_bytes",
        dtype=dtype,
        make_set=lambda i: _input_set(device, 8000 + i, dtype, grad=False, **shapes),
        bind=lambda p: _second_order_bound(
            p, _sequential(dims, activation, device, dtype), kind, precision
        ),
        set_bytes=M * (2 * dims[0] + 1) * dtype.itemsize,
        plot_key=f"second_order_{kind}_{dname}",
        plot_x=float(M),
        plot_x_label=size,
        memory_mode="step",
        tol=TOLERANCE[dtype] * 2,
        priority=priority,
        min_bytes={"step": second_order_min_bytes(M, dims, dtype.itemsize)},
        samples=M,
    )
