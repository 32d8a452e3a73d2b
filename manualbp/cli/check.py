"""``manualbp check``: gradcheck and parity against native autograd for every op, dtype, backend.

For each op (``functional.linear`` with every activation and with/without bias,
``functional.mse_loss`` with every reduction, same-shape and broadcast target), each dtype the
device supports and each available backend, it runs:

* ``forward``: the output against native PyTorch (``F.linear`` + the native activation module,
  ``F.mse_loss``: :mod:`manualbp.testing`'s oracle) on the same inputs;
* ``backward``: every gradient against native autograd's, for the same upstream gradient;
* ``gradcheck`` and ``gradgradcheck`` (float64 only): ``torch.autograd.gradcheck`` /
  ``gradgradcheck``, i.e. the hand-written backward against finite differences, and the
  backward's own derivative (double backward) likewise.

The parity checks allow, per element, :func:`manualbp.testing.allowed_error`: the
``torch.testing.assert_close`` defaults of the dtype, plus ``4 * eps * sum|terms|`` where the
value is a sum computed in another order than aten's, plus native's own rounding error
(``|want - exact|``, ``exact`` being the same native op in float64). The module docstring of
:mod:`manualbp.testing` says why each term is there. Anything beyond that is reported as a
failure (exit code 1 from the CLI).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import manualbp
from manualbp import functional
from manualbp.cli._args import DEVICE_HELP, Formatter, device, paragraphs
from manualbp.dispatch import BACKENDS, interpreter_enabled, triton_available
from manualbp.testing import (
    ACTIVATION_CASES,
    DEFAULT_SLOPE,
    Comparison,
    compare,
    linear_abs_sums,
    native_activation,
    native_linear,
    native_mse_loss,
)

__all__ = [
    "CheckResult",
    "add_parser",
    "available_backends",
    "command",
    "format_row",
    "header",
    "run_checks",
    "supported_dtypes",
]

ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DTYPE_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in ALL_DTYPES}
BACKEND_NAMES = tuple(name for name in BACKENDS if name != "auto")

# (passed, max error, why not): passed is None for a check skipped.
Outcome = tuple[bool | None, float | None, str]


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
        if self.negative_slope != DEFAULT_SLOPE:
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
    """Every activation of the registry (and ``None``), with and without bias; those taking a
    slope also with a negative one (leaky ReLU's backward then keeps Z instead of Y).
    ``quick``: a representative few."""
    if quick:
        keep = [(None, DEFAULT_SLOPE), ("relu", DEFAULT_SLOPE), ("gelu", DEFAULT_SLOPE)]
        keep += [(a, s) for a, s in ACTIVATION_CASES if s != DEFAULT_SLOPE]
        cases = [LinearCase(a, s, True) for a, s in ACTIVATION_CASES if (a, s) in keep]
        return [*cases, LinearCase(None, DEFAULT_SLOPE, False)]
    return [LinearCase(a, s, bias) for a, s in ACTIVATION_CASES for bias in (True, False)]


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
# Plumbing
# --------------------------------------------------------------------------------------------
def _leaves(*tensors: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _grads(out: Tensor, inputs: Sequence[Tensor | None], grad_out: Tensor) -> list[Tensor | None]:
    present = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(out, present, grad_out))
    return [None if t is None else next(got) for t in inputs]


def _outcome(c: Comparison) -> Outcome:
    return c.ok, c.max_error, c.detail


def _merge(parts: Sequence[tuple[str, Comparison]]) -> Outcome:
    ok = all(c.ok for _, c in parts)
    err = max((c.max_error for _, c in parts), default=0.0)
    why = "; ".join(f"{name}: {c.detail}" for name, c in parts if not c.ok)
    return ok, err, why


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


@contextlib.contextmanager
def _quiet_broadcast() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using a target size", category=UserWarning)
        yield


def _randn(
    gen: torch.Generator, device: torch.device, dtype: torch.dtype, shape: Sequence[int]
) -> Tensor:
    """Standard normal draws made in float64 on the CPU (the same on every device and dtype)."""
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(device, dtype)


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------
def _linear_inputs(
    case: LinearCase, dtype: torch.dtype, device: torch.device, gen: torch.Generator, small: bool
) -> list[Tensor | None]:
    # A 3-D input: the leading dims are flattened into one batch (so dW, db sum over both).
    lead, k, n = ((2, 3), 4, 5) if small else ((3, 9), 13, 11)
    x = _randn(gen, device, dtype, (*lead, k))
    w = _randn(gen, device, dtype, (n, k))
    b = _randn(gen, device, dtype, (n,)) if case.bias else None
    return [x, w, b]


def _linear_exact(
    case: LinearCase, x: Tensor, w: Tensor, b: Tensor | None, grad_out: Tensor
) -> tuple[Tensor, list[Tensor | None], Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Native in float64: ``(y, [dX, dW, db], bound of y, bounds of dX, dW, db)``; the
    forward's bound is the GEMM's carried through the activation by ``|act'(Z)|``."""
    ex_in = _leaves(*(None if t is None else t.double() for t in (x, w, b)))
    z64 = F.linear(*ex_in)
    z_leaf = z64.detach().requires_grad_(True)
    y64 = native_activation(case.activation, case.negative_slope)(z_leaf)
    (dz64,) = torch.autograd.grad(y64, z_leaf, grad_out.double(), retain_graph=True)
    (slope,) = torch.autograd.grad(y64, z_leaf, torch.ones_like(y64))
    exact_grads = _grads(z64, ex_in, dz64)
    fwd_sum, *grad_sums = linear_abs_sums(x, w, b, dz64)
    return y64.detach(), exact_grads, fwd_sum * slope.abs(), tuple(grad_sums)


def _linear_parity(
    case: LinearCase, dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> dict[str, Outcome]:
    x, w, b = _linear_inputs(case, dtype, device, gen, small=False)
    assert x is not None and w is not None
    grad_out = _randn(gen, device, dtype, (*x.shape[:-1], w.shape[0]))

    ours_in = _leaves(x, w, b)
    got = functional.linear(*ours_in, case.activation, negative_slope=case.negative_slope)
    got_grads = _grads(got, ours_in, grad_out)
    nat_in = _leaves(x, w, b)
    want = native_linear(*nat_in, case.activation, case.negative_slope)
    want_grads = _grads(want, nat_in, grad_out)
    y64, exact_grads, fwd_sum, grad_sums = _linear_exact(case, x, w, b, grad_out)

    forward = compare(got, want, exact=y64, abs_sum=fwd_sum)
    parts = [
        (name, compare(g, wg, exact=e, abs_sum=bound))
        for name, g, wg, e, bound in zip(
            ("dX", "dW", "db"), got_grads, want_grads, exact_grads, grad_sums, strict=True
        )
        if g is not None and wg is not None and e is not None
    ]
    return {"forward": _outcome(forward), "backward": _merge(parts)}


def _mse_inputs(
    case: MSECase, dtype: torch.dtype, device: torch.device, gen: torch.Generator, small: bool
) -> tuple[Tensor, Tensor]:
    rows, cols = (3, 4) if small else (17, 23)
    x = _randn(gen, device, dtype, (rows, cols))
    t = _randn(gen, device, dtype, (cols,) if case.broadcast else (rows, cols))
    return x, t


def _mse_sums(case: MSECase, x: Tensor, t: Tensor, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    """Sums over absolute values bounding the loss's and the target gradient's rounding."""
    x64, t64 = torch.broadcast_tensors(x.double(), t.double())
    sq = (x64 - t64) ** 2
    n = max(sq.numel(), 1)
    loss_sum = {"mean": sq.sum() / n, "sum": sq.sum(), "none": None}[case.reduction]
    # Per-element d input; the target's gradient sums it over the broadcast rows.
    scale = n if case.reduction == "mean" else 1
    g_abs = (2 * (x64 - t64) * grad_out.double()).abs() / scale
    return loss_sum, g_abs.sum_to_size(t.shape) if case.broadcast else None


def _mse_parity(
    case: MSECase, dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> dict[str, Outcome]:
    x, t = _mse_inputs(case, dtype, device, gen, small=False)
    red = case.reduction
    grad_out = _randn(gen, device, dtype, x.shape if red == "none" else ())
    with _quiet_broadcast():
        ours_in = _leaves(x, t)
        got = functional.mse_loss(*ours_in, reduction=red)
        got_grads = _grads(got, ours_in, grad_out)
        nat_in = _leaves(x, t)
        want = native_mse_loss(*nat_in, reduction=red)
        want_grads = _grads(want, nat_in, grad_out)
        ex_in = _leaves(x.double(), t.double())
        exact = native_mse_loss(*ex_in, reduction=red)
        exact_grads = _grads(exact, ex_in, grad_out.double())
    loss_sum, target_sum = _mse_sums(case, x, t, grad_out)
    forward = compare(got, want, exact=exact, abs_sum=loss_sum)
    backward = _merge(
        [
            ("d input", compare(got_grads[0], want_grads[0], exact=exact_grads[0])),
            (
                "d target",
                compare(got_grads[1], want_grads[1], exact=exact_grads[1], abs_sum=target_sum),
            ),
        ]
    )
    return {"forward": _outcome(forward), "backward": backward}


def _checked_fn(case: LinearCase | MSECase) -> Callable[..., Tensor]:
    """The op of ``case`` as a function of its tensor inputs (for gradcheck)."""
    if isinstance(case, LinearCase):

        def linear(x: Tensor, w: Tensor, *b: Tensor) -> Tensor:
            bias = b[0] if b else None
            return functional.linear(
                x, w, bias, case.activation, negative_slope=case.negative_slope
            )

        return linear

    def mse(x: Tensor, t: Tensor) -> Tensor:
        with _quiet_broadcast():
            return functional.mse_loss(x, t, reduction=case.reduction)

    return mse


def _gradchecks(
    case: LinearCase | MSECase,
    device: torch.device,
    gen: torch.Generator,
    which: tuple[str, ...],
    fast: bool,
) -> dict[str, Outcome]:
    """gradcheck / gradgradcheck (float64). ``fast``: torch's ``fast_mode`` (checks a random
    projection of the Jacobian instead of every entry: far fewer evaluations)."""
    dt = torch.float64
    if isinstance(case, LinearCase):
        inputs = [t for t in _linear_inputs(case, dt, device, gen, small=True) if t is not None]
    else:
        inputs = list(_mse_inputs(case, dt, device, gen, small=True))
    leaves = [t.requires_grad_(True) for t in inputs]
    fn = _checked_fn(case)
    out: dict[str, Outcome] = {}
    for name in which:
        check = torch.autograd.gradcheck if name == "gradcheck" else torch.autograd.gradgradcheck
        try:
            ok = bool(check(fn, leaves, fast_mode=fast))
            out[name] = (ok, None, "" if ok else "returned False")
        except Exception as e:  # GradcheckError or a crash of the op: a failure either way
            out[name] = (False, None, _first_line(e))
    return out


def _check_case(
    case: LinearCase | MSECase, dtype: torch.dtype, device: torch.device, seed: int, quick: bool
) -> dict[str, Outcome]:
    """Every check of one case in one dtype, on the current backend."""
    gen = torch.Generator().manual_seed(seed)
    parity = _linear_parity if isinstance(case, LinearCase) else _mse_parity
    try:
        checks = parity(case, dtype, device, gen)  # type: ignore[arg-type]
    except Exception as e:  # the op crashed: report it, keep checking
        msg = _first_line(e)
        checks = {"forward": (False, None, msg), "backward": (False, None, msg)}
    if dtype == torch.float64:
        checks.update(_gradchecks(case, device, gen, _double_checks(case, quick), quick))
    return checks


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
    cases: list[tuple[str, LinearCase | MSECase]] = [
        *(("linear", c) for c in linear_cases(quick)),
        *(("mse_loss", c) for c in mse_cases(quick)),
    ]
    backends = list(backends or available_backends(device))
    dtypes = list(dtypes or supported_dtypes(device))
    results: list[CheckResult] = []
    for backend in backends:
        with manualbp.use_backend(backend):
            for op, case in cases:
                for dtype in dtypes:
                    skip = _skip_reason(op, dtype, backend, device)
                    checks = (
                        {"all": (None, None, skip)}
                        if skip is not None
                        else _check_case(case, dtype, device, seed, quick)
                    )
                    for check, res in checks.items():
                        row = CheckResult(
                            op, case.variant, DTYPE_NAMES[dtype], backend, check, *res
                        )
                        results.append(row)
                        if on_result is not None:
                            on_result(row)
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


# --------------------------------------------------------------------------------------------
# The command line: ``manualbp check``
# --------------------------------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``check`` sub-command to ``sub``; its handler is :func:`command`."""
    parser = sub.add_parser(
        "check",
        help="gradcheck and parity with native autograd for every op, dtype and backend",
        formatter_class=Formatter,
        description=paragraphs(
            "On one device, for functional.linear (every activation in manualbp.ACTIVATIONS "
            "and None, with and without bias; leaky_relu also with a negative slope) and "
            "functional.mse_loss (mean, sum, none; same-shape and broadcast target), in every "
            "dtype the device supports and under every available backend (reference; triton "
            "on CUDA or under TRITON_INTERPRET=1): the forward and every gradient against "
            "native autograd, and torch.autograd.gradcheck / gradgradcheck in float64.",
            "Prints a pass/fail table with the largest error of each parity check and exits 1 "
            "if anything fails. Tolerance per element: torch.testing.assert_close's defaults "
            "for the dtype, plus 4*eps*sum|terms| where the value is a sum computed in another "
            "order than aten's, plus native's own rounding error (measured against float64); "
            "see manualbp.testing.",
        ),
    )
    parser.add_argument("--device", type=device, default="auto", help=DEVICE_HELP)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a representative subset (a few activations, gradgradcheck for two ops): for CI",
    )
    parser.add_argument(
        "--backend",
        choices=("all", *BACKEND_NAMES),
        default="all",
        help="which backends to check (default: all, every available one)",
    )
    parser.add_argument(
        "--dtype",
        action="append",
        metavar="DTYPE",
        choices=tuple(DTYPE_NAMES.values()),
        help="check only this dtype (repeatable; default: all the device supports)",
    )
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="on CPU, also run the Triton kernels under Triton's interpreter "
        "(sets TRITON_INTERPRET=1; slow)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random inputs (default: %(default)s)"
    )
    parser.set_defaults(handler=command, subparser=parser)
    return parser


def _enable_interpreter(parser: argparse.ArgumentParser, dev: torch.device) -> None:
    """``--interpret``: set ``TRITON_INTERPRET=1``, which works only before triton is imported."""
    if dev.type != "cpu":
        parser.error(
            "argument --interpret: only for --device cpu (on CUDA the kernels run natively)"
        )
    if "triton" in sys.modules and not interpreter_enabled():
        parser.error(
            "argument --interpret: triton was imported before TRITON_INTERPRET=1 could be set; "
            "set it in the environment"
        )
    os.environ["TRITON_INTERPRET"] = "1"


def _chosen_backends(parser: argparse.ArgumentParser, dev: torch.device, name: str) -> list[str]:
    available = available_backends(dev)
    if name == "all":
        return available
    if name not in available:
        why = (
            "triton is not installed"
            if not triton_available()
            else "on CPU the kernels need Triton's interpreter (--interpret or TRITON_INTERPRET=1)"
        )
        parser.error(f"argument --backend: {name!r} is not available on {dev}: {why}")
    return [name]


def _chosen_dtypes(
    parser: argparse.ArgumentParser, dev: torch.device, names: Sequence[str] | None
) -> list[torch.dtype]:
    supported = supported_dtypes(dev)
    if not names:
        return supported
    wanted = [getattr(torch, name) for name in dict.fromkeys(names)]
    missing = [DTYPE_NAMES[d] for d in wanted if d not in supported]
    if missing:
        parser.error(f"argument --dtype: {', '.join(missing)} not supported on {dev}")
    return wanted


def _print_plan(args: argparse.Namespace, backends: list[str], dtypes: list[torch.dtype]) -> None:
    dev: torch.device = args.device
    names = ", ".join(DTYPE_NAMES[d] for d in dtypes)
    print(
        f"manualbp check on {dev}: backends {', '.join(backends)}; dtypes {names}"
        + (" (quick subset)" if args.quick else "")
    )
    if "triton" not in backends and args.backend == "all":
        why = (
            "no GPU; run with --interpret (or TRITON_INTERPRET=1) to check the kernels under "
            "Triton's CPU interpreter"
            if dev.type == "cpu"
            else "triton not installed"
        )
        print(f"  (triton backend skipped: {why})")
    print(header())


def _summarize(results: list[CheckResult], elapsed: float) -> int:
    """Print the totals (and the failures again, on stderr); the exit status."""
    failed = [r for r in results if r.failed]
    skipped = [r for r in results if r.passed is None]
    passed = len(results) - len(failed) - len(skipped)
    print(
        f"\n{len(results)} checks: {passed} passed, {len(failed)} failed, {len(skipped)} skipped "
        f"({elapsed:.1f} s)"
    )
    if failed:
        print("FAILED:", file=sys.stderr)
        for r in failed:
            print("  " + format_row(r).replace("\n", "\n  "), file=sys.stderr)
        return 1
    print("all checks passed: manualbp agrees with native autograd and with finite differences")
    return 0


def command(args: argparse.Namespace) -> int:
    """``manualbp check``: exit status 0 if every check passes, 1 if any fails."""
    parser: argparse.ArgumentParser = args.subparser
    if args.interpret:
        _enable_interpreter(parser, args.device)
    backends = _chosen_backends(parser, args.device, args.backend)
    dtypes = _chosen_dtypes(parser, args.device, args.dtype)
    _print_plan(args, backends, dtypes)
    start = time.perf_counter()
    results = run_checks(
        args.device,
        quick=args.quick,
        backends=backends,
        dtypes=dtypes,
        seed=args.seed,
        on_result=lambda r: print(format_row(r), flush=True),
    )
    return _summarize(results, time.perf_counter() - start)
