"""Argument types and help formatting shared by the ``manualbp`` sub-commands.

Each type raises ``argparse.ArgumentTypeError``, which argparse turns into exit status 2 with
``argument --flag: <message>``.
"""

from __future__ import annotations

import argparse
import math
import textwrap

import torch

__all__ = ["DEVICE_HELP", "Formatter", "device", "finite_float", "nonnegative_float",
           "nonnegative_int", "paragraphs", "positive_float", "positive_int"]  # fmt: skip


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the description's line breaks."""


def paragraphs(*texts: str, width: int = 88) -> str:
    """Each text wrapped to ``width``, separated by blank lines (for RawDescription help)."""
    return "\n\n".join(textwrap.fill(" ".join(t.split()), width) for t in texts)


def _int_at_least(text: str, low: int, wanted: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def nonnegative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


DEVICE_HELP = "auto (CUDA if available, else CPU; the default), cpu, cuda or cuda:N"


def device(text: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    name = text.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; expected auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise argparse.ArgumentTypeError(
            f"unsupported device {text!r}; manualbp runs on cpu and cuda (expected auto, cpu, "
            "cuda or cuda:N)"
        )
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text!r} requested but CUDA is not available (torch {torch.__version__}, "
            f"built with CUDA: {torch.version.cuda or 'no'}); use --device cpu"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text!r}: there are only {torch.cuda.device_count()} CUDA device(s)"
        )
    return dev
