"""The ``manualbp`` command line: ``manualbp demo`` and ``manualbp check`` (``--help``: the
commands, their options and exit codes). Each sub-command lives in its own module
(:mod:`manualbp.cli.demo`, :mod:`manualbp.cli.check`), with its parser (``add_parser``) and its
handler (``command``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from manualbp.cli import check, demo
from manualbp.cli._args import Formatter

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

EPILOG = """\
exit status: 0 success, 1 the demo's loss curves disagree (or its plot could not be written)
or a check failed, 2 bad arguments, 3 the demo's training diverged (NaN/Inf loss) in both
runs alike: not a manualbp-vs-native mismatch; lower --lr.
The backend (reference torch ops, or Triton kernels) follows MANUALBP_BACKEND (auto, reference,
triton; default auto: Triton on CUDA tensors, the reference path elsewhere).
Derivations of every backward: docs/derivations.md.
examples:
  manualbp demo                       digits, about 1000 steps, plot to manualbp-demo.png
  manualbp demo --dataset diabetes --no-plot
  manualbp demo --quick --plot out/   a few steps (CI); plot to out/manualbp-demo.png
  manualbp check --quick              a representative subset (CI)
  manualbp check --device cuda        everything, on the GPU
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``manualbp`` argument parser with its ``demo`` and ``check`` sub-commands."""
    from manualbp import __version__

    parser = argparse.ArgumentParser(
        prog="manualbp", description=DESCRIPTION, epilog=EPILOG, formatter_class=Formatter
    )
    parser.add_argument("--version", action="version", version=f"manualbp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,check}", required=True)
    demo.add_parser(sub)
    check.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``manualbp`` console script; returns the exit status (bad arguments:
    ``SystemExit`` with status 2 from argparse)."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
