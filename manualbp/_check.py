"""``manualbp check``: gradcheck and parity against native autograd for every op, dtype, backend.

For each op (``functional.linear`` with every activation and with/without bias,
``functional.mse_loss`` with every reduction, same-shape and broadcast target), each dtype the
device supports and each available backend, it runs:

* ``forward``: the output against native PyTorch (``F.linear`` + the native activation,
  ``F.mse_loss``) on the same inputs;
* ``backward``: every gradient against native autograd's, for the same upstream gradient;
* ``gradcheck`` and ``gradgradcheck`` (float64 only): ``torch.autograd.gradcheck`` /
  ``gradgradcheck``, i.e. the hand-written backward against finite differences, and the
  backward's own derivative (double backward) likewise.

Tolerance of the parity checks, per element (``want`` = native's result in the checked dtype,
``exact`` = the same native op in float64 on the same inputs)::

    |got - want| <= atol + rtol * |want|                  (torch.testing.assert_close defaults)
                  + 4 * eps * sum|terms|                  (where the value is a sum: see below)
                  + |want - exact|                        (native's own rounding error)

* The second term is ``tests/helpers.py::assert_close_through_sum``'s: an elementwise
  derivative evaluated in another order than aten's differs from it by an ulp or two, and a
  GEMM (or a bias gradient, or a loss reduction) summing such terms in its own order then
  differs by up to ``ulps * eps * sum |term|``; ``sum|terms|`` is the same sum over absolute
  values (e.g. ``|dZ| @ |W|`` for ``dX = dZ W``). For the forward GEMM it is ``|X| |W|^T + |b|``,
  carried through the activation by ``|act'(Z)|``.
* The third term: native itself is not exact. In float16/bfloat16 native rounds ``Z`` (or
  ``x - y``) to the dtype before the activation (before squaring), while a fused kernel keeps
  it in its fp32 accumulator and rounds once; both are correct, and the more accurate one may
  differ from native by native's error, which we measure instead of guessing.

Anything beyond that is reported as a failure (exit code 1 from the CLI).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import manualbp
from manualbp import functional
from manualbp._dispatch import interpreter_enabled, triton_available

__all__ = [
    "CheckResult",
    "available_backends",
    "supported_dtypes",
    "run_checks",
    "format_row",
    "header",
]

ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}
ULPS = 4  # as tests/helpers.py::assert_close_through_sum

# torch.testing.assert_close's default (rtol, atol) per dtype.
DEFAULT_TOLERANCES = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}


@dataclass
class CheckResult:
    """One row of the table. ``passed`` is ``None`` for a check skipped (``detail`` says why)."""

    op: str
    variant: str
    dtype: str
    backend: str
    check: str
    passed: bool | None
    max_error: float | None = None
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.passed is False


# --------------------------------------------------------------------------------------------
# What to check
# --------------------------------------------------------------------------------------------
def available_backends(device: torch.device) -> list[str]:
    """``reference`` always; ``triton`` on CUDA, or on CPU under ``TRITON_INTERPRET=1``."""
    out = ["reference"]
    if triton_available() and (device.type == "cuda" or interpreter_enabled()):
        out.append("triton")
    return out


def supported_dtypes(device: torch.device) -> list[torch.dtype]:
    """The floating dtypes in which native linear, activations and MSE (with their backward)
    run on ``device``: probed, so that what this torch build lacks is left out."""
    out = []
    for dtype in ALL_DTYPES:
        if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            continue
        try:
            x = torch.randn(3, 4, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(2, 4, device=device, dtype=dtype, requires_grad=True)
            y = F.gelu(F.linear(x, w, w[:, 0].detach()))
            F.mse_loss(y, torch.zeros_like(y)).backward()
        except (RuntimeError, NotImplementedError):
            continue
        out.append(dtype)
    return out


@dataclass(frozen=True)
class LinearCase:
    activation: str | None
    negative_slope: float
    bias: bool

    @property
    def variant(self) -> str:
        act = str(self.activation)
        if self.activation == "leaky_relu" and self.negative_slope != 0.01:
            act += f"({self.negative_slope:g})"
        return f"{act}, {'bias' if self.bias else 'no bias'}"


@dataclass(frozen=True)
class MSECase:
    reduction: str
    broadcast: bool

    @property
    def variant(self) -> str:
        return f"{self.reduction}{', broadcast target' if self.broadcast else ''}"


def linear_cases(quick: bool) -> list[LinearCase]:
    """Every activation (and ``None``), with and without bias; leaky ReLU also with a negative
    slope (its backward then keeps Z instead of Y). ``quick``: a representative few."""
    acts: list[tuple[str | None, float]] = [(None, 0.01)]
    acts += [(name, 0.01) for name in manualbp.ACTIVATIONS]
    acts.append(("leaky_relu", -0.5))
    if quick:
        keep = {(None, 0.01), ("relu", 0.01), ("gelu", 0.01), ("leaky_relu", -0.5)}
        cases = [LinearCase(a, s, True) for a, s in acts if (a, s) in keep]
        return [*cases, LinearCase(None, 0.01, False)]
    return [LinearCase(a, s, bias) for a, s in acts for bias in (True, False)]


def mse_cases(quick: bool) -> list[MSECase]:
    """Every reduction, with a same-shape target and with one broadcast over the rows."""
    broadcasts = (False,) if quick else (False, True)
    return [MSECase(r, b) for r in ("mean", "sum", "none") for b in broadcasts]


def _skip_reason(op: str, dtype: torch.dtype, backend: str, device: torch.device) -> str | None:
    """Why ``op`` in ``dtype`` cannot be checked on ``backend`` here, if it cannot."""
    if op == "linear" and backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        # numpy has no bfloat16: Triton's interpreter returns garbage (~1e10) from a bf16
        # tl.dot, whatever the kernel. The bf16 GEMMs are checked on CUDA.
        return "Triton's CPU interpreter cannot run bf16 tl.dot; checked on CUDA only"
    return None


def _double_checks(case: LinearCase | MSECase, quick: bool) -> tuple[str, ...]:
    """Which of gradcheck/gradgradcheck run for ``case`` (in float64)."""
    if not quick:
        return ("gradcheck", "gradgradcheck")
    if isinstance(case, LinearCase):
        if case.activation in (None, "gelu") and case.bias:
            return ("gradcheck", "gradgradcheck")
        return ("gradcheck",)
    return ("gradcheck", "gradgradcheck") if case.reduction == "mean" else ("gradcheck",)


# --------------------------------------------------------------------------------------------
# Native oracle
# --------------------------------------------------------------------------------------------
def native_activation(name: str | None, negative_slope: float) -> Callable[[Tensor], Tensor]:
    """The native PyTorch op each fused activation stands for."""
    return {
        None: lambda z: z,
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
        "silu": F.silu,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "leaky_relu": lambda z: F.leaky_relu(z, negative_slope),
    }[name]


def _leaves(*tensors: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _grads(out: Tensor, inputs: Sequence[Tensor | None], grad_out: Tensor) -> list[Tensor | None]:
    present = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(out, present, grad_out))
    return [None if t is None else next(got) for t in inputs]


def _allowed(want: Tensor, exact: Tensor, abs_sum: Tensor | None) -> Tensor:
    """Per-element tolerance (module docstring), in float64."""
    rtol, atol = DEFAULT_TOLERANCES[want.dtype]
    want64 = want.double()
    allowed = atol + rtol * want64.abs() + (want64 - exact).abs()
    if abs_sum is not None:
        allowed = allowed + ULPS * torch.finfo(want.dtype).eps * abs_sum
    return allowed


def _compare(
    got: Tensor, want: Tensor, exact: Tensor, abs_sum: Tensor | None = None
) -> tuple[bool, float, str]:
    """``(ok, max |got - want|, why not)``; NaNs must match NaNs and infinities be equal."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return (
            False,
            math.inf,
            f"got {got.dtype} {tuple(got.shape)}, want {want.dtype} {tuple(want.shape)}",
        )
    if got.numel() == 0:
        return True, 0.0, ""
    g, w = got.double(), want.double()
    err = (g - w).abs()
    same = (g == w) | (g.isnan() & w.isnan())
    bad = ~same & ~(err <= _allowed(want, exact, abs_sum))
    max_err = float(torch.where(same, torch.zeros_like(err), err).max())
    if bool(bad.any()):
        return False, max_err, f"{int(bad.sum())} of {got.numel()} elements beyond tolerance"
    return True, max_err, ""


def _merge(
    parts: Sequence[tuple[str, tuple[bool, float, str]]],
) -> tuple[bool, float, str]:
    ok = all(p[1][0] for p in parts)
    err = max((p[1][1] for p in parts), default=0.0)
    why = "; ".join(f"{name}: {p[2]}" for name, p in parts if not p[0])
    return ok, err, why


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------
def _linear_inputs(
    case: LinearCase, dtype: torch.dtype, device: torch.device, gen: torch.Generator, small: bool
) -> list[Tensor | None]:
    # A 3-D input: the leading dims are flattened into one batch (so dW, db sum over both).
    lead, k, n = ((2, 3), 4, 5) if small else ((3, 9), 13, 11)
    x = torch.randn(*lead, k, generator=gen, dtype=torch.float64).to(device, dtype)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64).to(device, dtype)
    b = torch.randn(n, generator=gen, dtype=torch.float64).to(device, dtype) if case.bias else None
    return [x, w, b]


def _linear_parity(
    case: LinearCase, dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> dict[str, tuple[bool, float, str]]:
    x, w, b = _linear_inputs(case, dtype, device, gen, small=False)
    act = native_activation(case.activation, case.negative_slope)
    n_out = w.shape[0]
    grad_out = torch.randn(*x.shape[:-1], n_out, generator=gen, dtype=torch.float64)
    grad_out = grad_out.to(device, dtype)

    ours_in = _leaves(x, w, b)
    got = functional.linear(*ours_in, case.activation, negative_slope=case.negative_slope)
    got_grads = _grads(got, ours_in, grad_out)

    nat_in = _leaves(x, w, b)
    want = act(F.linear(*nat_in))
    want_grads = _grads(want, nat_in, grad_out)

    # float64 "exact" results, |act'(Z)| and dZ for the sum bounds.
    ex_in = _leaves(*(None if t is None else t.double() for t in (x, w, b)))
    z64 = F.linear(*ex_in)
    z_leaf = z64.detach().requires_grad_(True)
    y64 = act(z_leaf)
    (dz64,) = torch.autograd.grad(y64, z_leaf, grad_out.double(), retain_graph=True)
    (slope,) = torch.autograd.grad(y64, z_leaf, torch.ones_like(y64))
    exact_grads = torch.autograd.grad(z64, [t for t in ex_in if t is not None], dz64)

    x64, w64 = x.double().abs(), w.double().abs()
    fwd_sum = F.linear(x64, w64, None if b is None else b.double().abs()) * slope.abs()
    dz_abs = dz64.abs().reshape(-1, n_out)
    bounds = [dz64.abs() @ w64, dz_abs.mT @ x64.reshape(-1, x.shape[-1]), dz_abs.sum(0)]

    forward = _compare(got.detach(), want.detach(), y64.detach(), fwd_sum)
    parts = []
    exact_iter = iter(exact_grads)
    for name, g, wg, bound in zip(("dX", "dW", "db"), got_grads, want_grads, bounds, strict=True):
        if wg is None:
            continue
        parts.append((name, _compare(g, wg, next(exact_iter), bound)))
    return {"forward": forward, "backward": _merge(parts)}


def _mse_inputs(
    case: MSECase, dtype: torch.dtype, device: torch.device, gen: torch.Generator, small: bool
) -> tuple[Tensor, Tensor]:
    rows, cols = (3, 4) if small else (17, 23)
    x = torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(device, dtype)
    t_shape = (cols,) if case.broadcast else (rows, cols)
    t = torch.randn(*t_shape, generator=gen, dtype=torch.float64).to(device, dtype)
    return x, t


@contextlib.contextmanager
def _quiet_broadcast() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using a target size", category=UserWarning)
        yield


def _mse_parity(
    case: MSECase, dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> dict[str, tuple[bool, float, str]]:
    x, t = _mse_inputs(case, dtype, device, gen, small=False)
    red = case.reduction
    grad_out = torch.randn(x.shape if red == "none" else (), generator=gen, dtype=torch.float64)
    grad_out = grad_out.to(device, dtype)
    with _quiet_broadcast():
        ours_in = _leaves(x, t)
        got = functional.mse_loss(*ours_in, reduction=red)
        got_grads = _grads(got, ours_in, grad_out)
        nat_in = _leaves(x, t)
        want = F.mse_loss(*nat_in, reduction=red)
        want_grads = _grads(want, nat_in, grad_out)
        ex_in = _leaves(x.double(), t.double())
        exact = F.mse_loss(*ex_in, reduction=red)
        exact_grads = _grads(exact, ex_in, grad_out.double())

    x64, t64 = torch.broadcast_tensors(x.double(), t.double())
    sq = (x64 - t64) ** 2
    n = max(sq.numel(), 1)
    loss_sum = {"mean": sq.sum() / n, "sum": sq.sum(), "none": None}[red]
    # Per-element d input; the target's gradient sums it over the broadcast rows.
    g_abs = (2 * (x64 - t64) * grad_out.double()).abs() / (n if red == "mean" else 1)
    target_sum = g_abs.sum_to_size(t.shape) if case.broadcast else None
    forward = _compare(got.detach(), want.detach(), exact.detach(), loss_sum)
    backward = _merge(
        [
            ("d input", _compare(got_grads[0], want_grads[0], exact_grads[0])),
            ("d target", _compare(got_grads[1], want_grads[1], exact_grads[1], target_sum)),
        ]
    )
    return {"forward": forward, "backward": backward}


def _gradchecks(
    case: LinearCase | MSECase,
    device: torch.device,
    gen: torch.Generator,
    which: tuple[str, ...],
    fast: bool,
) -> dict[str, tuple[bool, float | None, str]]:
    """gradcheck / gradgradcheck (float64). ``fast``: torch's ``fast_mode`` (checks a random
    projection of the Jacobian instead of every entry: far fewer evaluations)."""
    dt = torch.float64
    if isinstance(case, LinearCase):
        inputs = [t for t in _linear_inputs(case, dt, device, gen, small=True) if t is not None]

        def fn(*a: Tensor) -> Tensor:
            x, w, *b = a
            b0 = b[0] if b else None
            return functional.linear(x, w, b0, case.activation, negative_slope=case.negative_slope)
    else:
        inputs = list(_mse_inputs(case, dt, device, gen, small=True))

        def fn(*a: Tensor) -> Tensor:
            with _quiet_broadcast():
                return functional.mse_loss(a[0], a[1], reduction=case.reduction)

    leaves = [t.requires_grad_(True) for t in inputs]
    out: dict[str, tuple[bool, float | None, str]] = {}
    for name in which:
        check = torch.autograd.gradcheck if name == "gradcheck" else torch.autograd.gradgradcheck
        try:
            ok = bool(check(fn, leaves, fast_mode=fast))
            out[name] = (ok, None, "" if ok else "returned False")
        except Exception as e:  # GradcheckError or a crash of the op: a failure either way
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            out[name] = (False, None, f"{type(e).__name__}: {first}")
    return out


def run_checks(
    device: torch.device,
    *,
    quick: bool = False,
    backends: Sequence[str] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    seed: int = 0,
    on_result: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Run every check; ``on_result`` sees each row as it completes. Returns all rows."""
    backends = list(backends or available_backends(device))
    dtypes = list(dtypes or supported_dtypes(device))
    results: list[CheckResult] = []

    def emit(
        op: str,
        variant: str,
        dtype: torch.dtype,
        backend: str,
        check: str,
        res: tuple[bool | None, float | None, str],
    ) -> None:
        row = CheckResult(op, variant, DTYPE_NAMES[dtype], backend, check, *res)
        results.append(row)
        if on_result is not None:
            on_result(row)

    cases: list[tuple[str, LinearCase | MSECase]] = [
        *(("linear", c) for c in linear_cases(quick)),
        *(("mse_loss", c) for c in mse_cases(quick)),
    ]
    for backend in backends:
        with manualbp.use_backend(backend):
            for op, case in cases:
                for dtype in dtypes:
                    gen = torch.Generator().manual_seed(seed)
                    skip = _skip_reason(op, dtype, backend, device)
                    if skip is not None:
                        emit(op, case.variant, dtype, backend, "all", (None, None, skip))
                        continue
                    parity = _linear_parity if op == "linear" else _mse_parity
                    try:
                        checks: dict[str, tuple[bool, float | None, str]] = dict(
                            parity(case, dtype, device, gen)  # type: ignore[arg-type]
                        )
                    except Exception as e:  # the op crashed: report it, keep checking
                        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
                        checks = {"forward": (False, None, msg), "backward": (False, None, msg)}
                    if dtype == torch.float64:
                        checks.update(
                            _gradchecks(case, device, gen, _double_checks(case, quick), quick)
                        )
                    for check, res in checks.items():
                        emit(op, case.variant, dtype, backend, check, res)
    return results


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
COLUMNS = (
    ("op", 8),
    ("activation / reduction", 26),
    ("dtype", 8),
    ("backend", 9),
    ("check", 13),
    ("result", 6),
    ("max error", 9),
)


def header() -> str:
    """The table's header and rule."""
    head = "  ".join(name.ljust(width) for name, width in COLUMNS).rstrip()
    return head + "\n" + "  ".join("-" * width for _, width in COLUMNS)


def format_row(r: CheckResult) -> str:
    """One table row (plus the reason on a second line when it failed)."""
    err = "-" if r.max_error is None else f"{r.max_error:.2e}"
    result = {True: "pass", False: "FAIL", None: "skip"}[r.passed]
    cells = (r.op, r.variant, r.dtype, r.backend, r.check, result, err)
    line = "  ".join(str(c).ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True)).rstrip()
    if r.passed is not True and r.detail:
        line += f"\n    -> {r.detail}"
    return line
