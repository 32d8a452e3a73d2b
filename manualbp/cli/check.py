"""``manualbp check``: gradcheck and parity against native autograd for every op, dtype, backend.

On one device, for functional.linear (every activation in manualbp.ACTIVATIONS and None, with
and without bias; leaky_relu also with a negative slope) and functional.mse_loss (mean, sum,
none; same-shape, row- and column-broadcast and expanded targets) -- the case table CASES of
manualbp.testing, which the test suite runs too -- in every dtype
the device supports and under every available backend (reference; triton on CUDA or under
TRITON_INTERPRET=1): the forward and every gradient against native autograd, and
torch.autograd.gradcheck / gradgradcheck in float64.

Prints a pass/fail table with the largest error of each parity check and exits 1 if anything
fails. Tolerance per element: torch.testing.assert_close's defaults for the dtype, plus
4*eps*sum|terms| where the value is a sum computed in another order than aten's, plus native's
own rounding error (measured against float64); see manualbp.testing.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import manualbp
from manualbp import testing
from manualbp.cli._args import DEVICE_HELP, Formatter, device, paragraphs
from manualbp.kernels._host import interpreting as interpreter_enabled

__all__ = ["CheckResult", "add_parser", "available_backends", "cases_to_check", "command",
           "format_row", "header", "run_checks", "supported_dtypes"]  # fmt: skip

DTYPE_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in testing.DEFAULT_TOLERANCES}
BACKEND_NAMES = ("reference", "triton")

Case = testing.Case
Outcome = tuple[bool | None, float | None, str]  # (passed, max error, why not); None: skipped


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


# --- What to check ---------------------------------------------------------------------------
def _why_no_triton(device: torch.device) -> str | None:
    """Why the triton backend cannot run on ``device``, if it cannot (triton is looked up
    without importing it: importing it fixes ``TRITON_INTERPRET``)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type != "cuda" and not interpreter_enabled():
        return "on CPU the kernels need Triton's interpreter (--interpret or TRITON_INTERPRET=1)"
    return None


def available_backends(device: torch.device) -> list[str]:
    """``reference`` always; ``triton`` on CUDA, or on CPU under ``TRITON_INTERPRET=1``."""
    return list(BACKEND_NAMES[:1] if _why_no_triton(device) else BACKEND_NAMES)


def supported_dtypes(device: torch.device) -> list[torch.dtype]:
    """The floating dtypes in which native linear, activations and MSE (with their backward)
    run on ``device``: probed, so that what this torch build lacks is left out."""
    out = []
    for dtype in DTYPE_NAMES:
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


def cases_to_check(quick: bool) -> list[Case]:
    """The shared table's cases (:data:`manualbp.testing.CASES`); ``quick``: those marked so."""
    return [c for c in testing.CASES if c.quick or not quick]


# --- The checks ------------------------------------------------------------------------------
def _parity(case: Case, inputs: list[Tensor | None], grad_out: Tensor) -> dict[str, Outcome]:
    """The forward, and every gradient in one row: :func:`manualbp.testing.parity`."""
    (_, forward), *grads = testing.parity(case.ours(), case, inputs, grad_out).items()
    error = max((c.max_error for _, c in grads), default=0.0)
    why = "; ".join(f"{name}: {c.detail}" for name, c in grads if not c.ok)
    return {
        "forward": (forward.ok, forward.max_error, forward.detail),
        "backward": (all(c.ok for _, c in grads), error, why),
    }


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _check_case(
    case: Case, dtype: torch.dtype, device: torch.device, seed: int, quick: bool
) -> dict[str, Outcome]:
    """Every check of one case in one dtype, on the current backend. The inputs are standard
    normal draws made in float64 on the CPU (the same on every device and dtype)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)

    try:
        inputs, out_shape = case.inputs(draw, small=False)
        checks = _parity(case, inputs, draw(*out_shape))
    except Exception as e:  # the op crashed: report it, keep checking
        checks = dict.fromkeys(("forward", "backward"), (False, None, _first_line(e)))
    if dtype != torch.float64:
        return checks
    leaves = [t.requires_grad_(True) for t in case.inputs(draw, small=True)[0] if t is not None]
    both = case.quick_gradgradcheck or not quick
    for name in ("gradcheck", "gradgradcheck") if both else ("gradcheck",):
        check = getattr(torch.autograd, name)
        try:  # fast_mode (--quick): a random projection of the Jacobian, far fewer evaluations
            ok = bool(check(case.ours(), leaves, fast_mode=quick))
            checks[name] = (ok, None, "" if ok else "returned False")
        except Exception as e:  # GradcheckError or a crash of the op: a failure either way
            checks[name] = (False, None, _first_line(e))
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
    backends = backends or available_backends(device)
    dtypes = dtypes or supported_dtypes(device)
    results: list[CheckResult] = []
    with warnings.catch_warnings():  # one block, so that other warnings still show once each
        warnings.filterwarnings("ignore", "Using a target size", UserWarning)  # MSE broadcasts
        for backend, case, dtype in itertools.product(backends, cases_to_check(quick), dtypes):
            skip = case.skip(dtype, interpreted=backend == "triton" and device.type == "cpu")
            if skip is not None:
                checks: dict[str, Outcome] = {"all": (None, None, skip)}
            else:
                with manualbp.use_backend(backend):
                    checks = _check_case(case, dtype, device, seed, quick)
            for check, outcome in checks.items():
                row = CheckResult(
                    case.op, case.variant, DTYPE_NAMES[dtype], backend, check, *outcome
                )
                results.append(row)
                if on_result is not None:
                    on_result(row)
    return results


# --- The table -------------------------------------------------------------------------------
COLUMNS = ("op", "activation / reduction", "dtype", "backend", "check", "result", "max error")
WIDTHS = (8, 26, 8, 9, 13, 6, 9)


def _cells(cells: Sequence[str]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, WIDTHS, strict=True)).rstrip()


def header() -> str:
    """The table's header and rule."""
    return _cells(COLUMNS) + "\n" + "  ".join("-" * w for w in WIDTHS)


def format_row(r: CheckResult) -> str:
    """One table row (plus the reason on a second line when it did not pass)."""
    err = "-" if r.max_error is None else f"{r.max_error:.2e}"
    result = {True: "pass", False: "FAIL", None: "skip"}[r.passed]
    line = _cells([r.op, r.variant, r.dtype, r.backend, r.check, result, err])
    return line + (f"\n    -> {r.detail}" if r.passed is not True and r.detail else "")


# --- The command line: ``manualbp check`` ----------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``check`` sub-command to ``sub``; its handler is :func:`command`."""
    parser = sub.add_parser(
        "check",
        help="gradcheck and parity with native autograd for every op, dtype and backend",
        formatter_class=Formatter,
        description=paragraphs(*(__doc__ or "").split("\n\n")[1:]),  # the module docstring
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


def _chosen(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[str], list[torch.dtype]]:
    """The backends and dtypes to check: ``--backend`` and ``--dtype``, validated."""
    dev: torch.device = args.device
    backends, dtypes = available_backends(dev), supported_dtypes(dev)
    if args.backend not in ("all", *backends):
        why = _why_no_triton(dev)
        parser.error(f"argument --backend: {args.backend!r} is not available on {dev}: {why}")
    wanted = [getattr(torch, name) for name in dict.fromkeys(args.dtype or ())]
    missing = [DTYPE_NAMES[d] for d in wanted if d not in dtypes]
    if missing:
        parser.error(f"argument --dtype: {', '.join(missing)} not supported on {dev}")
    return (backends if args.backend == "all" else [args.backend]), (wanted or dtypes)


def _summarize(results: list[CheckResult], elapsed: float) -> int:
    """Print the totals (and the failures again, on stderr); the exit status."""
    failed = [r for r in results if r.passed is False]
    skipped = sum(r.passed is None for r in results)
    passed = len(results) - len(failed) - skipped
    print(
        f"\n{len(results)} checks: {passed} passed, {len(failed)} failed, {skipped} skipped "
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
    backends, dtypes = _chosen(parser, args)
    names = ", ".join(DTYPE_NAMES[d] for d in dtypes)
    quick = " (quick subset)" if args.quick else ""
    print(f"manualbp check on {args.device}: backends {', '.join(backends)}; dtypes {names}{quick}")
    if "triton" not in backends and args.backend == "all":
        print(f"  (triton backend skipped: {_why_no_triton(args.device)})")
    print(header())
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
