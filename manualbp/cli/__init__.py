"""The ``manualbp`` command line: ``manualbp demo`` and ``manualbp check``.

Run ``manualbp --help`` (or ``python -m manualbp --help``) for the commands and
``manualbp demo --help`` / ``manualbp check --help`` for their options. Exit codes: 0 on
success, 1 when the demo's two loss curves disagree or a check fails, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
import time
from collections.abc import Sequence

import torch

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
manualbp: hand-written backprop for PyTorch. Autograd Functions whose backward passes are
derived by hand (Linear + fused activation, MSE loss), drop-in nn.Linear / nn.MSELoss
stand-ins, an SGD optimizer, and Triton kernels on CUDA.

  manualbp demo    train the same MLP with manualbp and with native autograd, side by side,
                   on a dataset that ships with scikit-learn; compare the loss curves, the
                   held-out accuracy / R² and the time per step; plot the curves
  manualbp check   gradcheck / gradgradcheck and parity with native autograd for every op,
                   activation, reduction, dtype and backend on a device; pass/fail table
"""


def _paragraphs(*texts: str, width: int = 88) -> str:
    """Each text wrapped to ``width``, separated by blank lines (for RawDescription help)."""
    return "\n\n".join(textwrap.fill(" ".join(t.split()), width) for t in texts)


EPILOG = """\
exit status: 0 success, 1 the demo's loss curves disagree or a check failed, 2 bad arguments.
The backend (reference torch ops, or Triton kernels) follows MANUALBP_BACKEND (auto, reference,
triton; default auto: Triton on CUDA tensors, the reference path elsewhere).
Derivations of every backward: docs/derivations.md.
examples:
  manualbp demo                       digits, about 1000 steps, plot to manualbp-demo.png
  manualbp demo --dataset diabetes --no-plot
  manualbp demo --quick               a few steps (CI)
  manualbp check --quick              a representative subset (CI)
  manualbp check --device cuda        everything, on the GPU
"""


# --------------------------------------------------------------------------------------------
# Argument types: each raises ArgumentTypeError, which argparse turns into exit status 2
# with "argument --flag: <message>".
# --------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def _nonnegative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def _device(text: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    name = text.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; expected auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(
            f"unsupported device {text!r}; manualbp runs on cpu and cuda (expected auto, cpu, "
            "cuda or cuda:N)"
        )
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text!r} requested but CUDA is not available (torch {torch.__version__}, "
            f"built with CUDA: {torch.version.cuda or 'no'}); use --device cpu"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text!r}: there are only {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the description's line breaks."""


def build_parser() -> argparse.ArgumentParser:
    """The ``manualbp`` argument parser with its ``demo`` and ``check`` sub-commands."""
    from manualbp import __version__
    from manualbp._demo import DATASETS, QUICK_STEPS

    parser = argparse.ArgumentParser(
        prog="manualbp", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter
    )
    parser.add_argument("--version", action="version", version=f"manualbp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,check}", required=True)

    demo_defaults = "; ".join(
        f"{name}: {d['steps']} steps, lr {d['lr']:g}, hidden {d['hidden']}"
        for name, d in DATASETS.items()
    )
    demo = sub.add_parser(
        "demo",
        help="train an MLP with manualbp and with native autograd side by side",
        formatter_class=_Formatter,
        description=_paragraphs(
            "Train the same MLP (Linear-act-Linear-act-Linear) twice, from the same initial "
            "weights, on the same mini-batches: once with native autograd (nn.Linear, "
            "nn.MSELoss, torch.optim.SGD), once with manualbp (manualbp.convert of a copy: "
            "manualbp.Linear with the activation fused; manualbp.MSELoss; manualbp.optim.SGD).",
            "Reports how closely the two loss curves agree step by step, the held-out accuracy "
            "(digits: 10 classes, one-hot targets with MSE) or R² (diabetes: regression), the "
            "time per step of each, and plots both curves. The datasets ship with scikit-learn "
            "(no download). Runs on CUDA with the Triton kernels when there is a GPU, on the "
            "reference path (plain torch ops) on CPU, and says which.",
            "Exits 1 if the curves differ by more than floating-point rounding explains: "
            "|Δloss| <= 1e-3 x the curve's largest loss at every step.",
            f"Dataset defaults: {demo_defaults}.",
        ),
    )
    demo.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default="digits",
        help="scikit-learn dataset to train on (default: %(default)s)",
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help=f"training steps (default: per dataset; {QUICK_STEPS} with --quick)",
    )
    demo.add_argument(
        "--batch-size",
        type=_positive_int,
        default=64,
        help="mini-batch size (default: %(default)s)",
    )
    demo.add_argument(
        "--lr", type=_positive_float, default=None, help="learning rate (default: per dataset)"
    )
    demo.add_argument(
        "--momentum",
        type=_nonnegative_float,
        default=0.9,
        help="SGD momentum (default: %(default)s)",
    )
    demo.add_argument(
        "--hidden",
        type=_positive_int,
        default=None,
        help="width of the two hidden layers (default: per dataset)",
    )
    demo.add_argument(
        "--activation",
        default="relu",
        choices=_activation_names(),
        help="hidden activation, fused into manualbp.Linear by convert (default: %(default)s)",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initial weights, the split and the batch order (default: %(default)s)",
    )
    demo.add_argument(
        "--device",
        type=_device,
        default="auto",
        help="auto (CUDA if available, else CPU; the default), cpu, cuda or cuda:N",
    )
    demo.add_argument(
        "--threads",
        type=_nonnegative_int,
        default=1,
        help="CPU threads for torch (default: %(default)s; 0: torch's own "
        "default). One thread is as fast for this small MLP and keeps the "
        "timing steady when other processes share the cores",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_STEPS} steps (unless --steps): a fast run for CI",
    )
    demo.add_argument(
        "--plot",
        default="manualbp-demo.png",
        metavar="PATH",
        help="where to write the PNG of both loss curves; needs matplotlib (default: %(default)s)",
    )
    demo.add_argument("--no-plot", action="store_true", help="write no plot")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(handler=_run_demo, subparser=demo)

    check = sub.add_parser(
        "check",
        help="gradcheck and parity with native autograd for every op, dtype and backend",
        formatter_class=_Formatter,
        description=_paragraphs(
            "On one device, for functional.linear (every activation in manualbp.ACTIVATIONS "
            "and None, with and without bias; leaky_relu also with a negative slope) and "
            "functional.mse_loss (mean, sum, none; same-shape and broadcast target), in every "
            "dtype the device supports and under every available backend (reference; triton "
            "on CUDA or under TRITON_INTERPRET=1): the forward and every gradient against "
            "native autograd, and torch.autograd.gradcheck / gradgradcheck in float64.",
            "Prints a pass/fail table with the largest error of each parity check and exits 1 "
            "if anything fails. Tolerance per element: torch.testing.assert_close's defaults "
            "for the dtype, plus 4*eps*sum|terms| where the value is a sum computed in another "
            "order than aten's, plus native's own rounding error (measured against float64).",
        ),
    )
    check.add_argument(
        "--device",
        type=_device,
        default="auto",
        help="auto (CUDA if available, else CPU; the default), cpu, cuda or cuda:N",
    )
    check.add_argument(
        "--quick",
        action="store_true",
        help="a representative subset (a few activations, gradgradcheck for two ops): for CI",
    )
    check.add_argument(
        "--backend",
        choices=("all", "reference", "triton"),
        default="all",
        help="which backends to check (default: all, every available one)",
    )
    check.add_argument(
        "--dtype",
        action="append",
        metavar="DTYPE",
        choices=("float16", "bfloat16", "float32", "float64"),
        help="check only this dtype (repeatable; default: all the device supports)",
    )
    check.add_argument(
        "--interpret",
        action="store_true",
        help="on CPU, also run the Triton kernels under Triton's interpreter "
        "(sets TRITON_INTERPRET=1; slow)",
    )
    check.add_argument(
        "--seed", type=int, default=0, help="seed of the random inputs (default: %(default)s)"
    )
    check.set_defaults(handler=_run_check, subparser=check)
    return parser


def _activation_names() -> list[str]:
    from manualbp.activations import ACTIVATIONS

    return list(ACTIVATIONS)


# --------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------
def _run_demo(args: argparse.Namespace) -> int:
    """``manualbp demo``: exit status 0 if the curves agree, 1 if not, 2 for bad arguments."""
    from manualbp._demo import QUICK_STEPS, DemoConfig, describe_backend, run_demo, save_plot

    demo_parser: argparse.ArgumentParser = args.subparser
    plot = None if args.no_plot else args.plot
    if plot is not None:
        folder = os.path.dirname(os.path.abspath(plot))
        if not os.path.isdir(folder):
            demo_parser.error(f"argument --plot: directory {folder!r} does not exist")
    try:
        describe_backend(args.device)
    except (RuntimeError, ValueError) as e:  # MANUALBP_BACKEND unknown, or triton on bare CPU
        demo_parser.error(str(e))
    if args.device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else None)
    config = DemoConfig(
        dataset=args.dataset,
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        hidden=args.hidden,
        activation=args.activation,
        seed=args.seed,
        device=str(args.device),
        progress=not args.no_progress,
    )
    start = time.perf_counter()
    try:
        result = run_demo(config)
    except RuntimeError as e:
        print(f"manualbp demo: error: {e}", file=sys.stderr)
        return 1
    if plot is not None:
        try:
            save_plot(result, plot)
            print(f"  plot of both loss curves: {plot}")
        except ImportError:
            print(
                "manualbp demo: matplotlib is not installed, so no plot was written "
                "(pip install 'manualbp[demo]', or pass --no-plot)",
                file=sys.stderr,
            )
    print(f"  total time {time.perf_counter() - start:.1f} s")
    if not result.agree:
        print(
            "manualbp demo: FAILED: the manualbp and native loss curves differ by more than "
            "floating-point rounding explains",
            file=sys.stderr,
        )
        return 1
    return 0


def _run_check(args: argparse.Namespace) -> int:
    """``manualbp check``: exit status 0 if every check passes, 1 if any fails."""
    from manualbp import _check, _dispatch

    check_parser: argparse.ArgumentParser = args.subparser
    device: torch.device = args.device
    if args.interpret:
        if device.type != "cpu":
            check_parser.error(
                "argument --interpret: only for --device cpu (on CUDA the kernels run natively)"
            )
        if "triton" in sys.modules and not _dispatch.interpreter_enabled():
            check_parser.error(
                "argument --interpret: triton was imported before "
                "TRITON_INTERPRET=1 could be set; set it in the environment"
            )
        os.environ["TRITON_INTERPRET"] = "1"
    available = _check.available_backends(device)
    if args.backend == "all":
        backends = available
    elif args.backend not in available:
        why = (
            "triton is not installed"
            if not _dispatch.triton_available()
            else "on CPU the kernels need Triton's interpreter (--interpret or TRITON_INTERPRET=1)"
        )
        check_parser.error(f"argument --backend: 'triton' is not available on {device}: {why}")
    else:
        backends = [args.backend]
    supported = _check.supported_dtypes(device)
    if args.dtype:
        wanted = [getattr(torch, name) for name in dict.fromkeys(args.dtype)]
        missing = [str(d).removeprefix("torch.") for d in wanted if d not in supported]
        if missing:
            check_parser.error(f"argument --dtype: {', '.join(missing)} not supported on {device}")
        dtypes = wanted
    else:
        dtypes = supported

    names = ", ".join(_check.DTYPE_NAMES[d] for d in dtypes)
    print(
        f"manualbp check on {device}: backends {', '.join(backends)}; dtypes {names}"
        + (" (quick subset)" if args.quick else "")
    )
    if "triton" not in backends and args.backend == "all":
        why = (
            (
                "no GPU; run with --interpret (or TRITON_INTERPRET=1) to check the kernels under "
                "Triton's CPU interpreter"
            )
            if device.type == "cpu"
            else "triton not installed"
        )
        print(f"  (triton backend skipped: {why})")
    print(_check.header())
    start = time.perf_counter()
    results = _check.run_checks(
        device,
        quick=args.quick,
        backends=backends,
        dtypes=dtypes,
        seed=args.seed,
        on_result=lambda r: print(_check.format_row(r), flush=True),
    )
    failed = [r for r in results if r.failed]
    skipped = [r for r in results if r.passed is None]
    passed = len(results) - len(failed) - len(skipped)
    elapsed = time.perf_counter() - start
    print(
        f"\n{len(results)} checks: {passed} passed, {len(failed)} failed, {len(skipped)} skipped "
        f"({elapsed:.1f} s)"
    )
    if failed:
        print("FAILED:", file=sys.stderr)
        for r in failed:
            print("  " + _check.format_row(r).replace("\n", "\n  "), file=sys.stderr)
        return 1
    print("all checks passed: manualbp agrees with native autograd and with finite differences")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``manualbp`` console script; returns the exit status.

    Bad arguments exit with status 2 (``SystemExit`` from argparse), naming the problem.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
