"""Host-side facts and the one launch path, importable without triton.

* Where code runs: :func:`interpreting` (Triton's CPU interpreter), :func:`target` (the GPU a
  launch compiles for: compute capability and SM count; ``None`` under the interpreter, whose
  launches take small fixed configs), :func:`runs_on`.
* :func:`launch`: every kernel launch of this package goes through it, so that a launch can be
  *recorded* instead of run (:func:`record`: what ``python -m benchmarks --plan``, the compile
  audit and the precompile step read: which kernel, arguments, constexprs and candidate
  configs each op launches, from the launchers themselves) or *observed* while it runs
  (:func:`observe`: launch counts in tests).
* :func:`simulate`: launchers plan for a given GPU (say sm_90 with 132 SMs) on any tensors,
  with nothing run: with :func:`record`, the kernels' own config tables and choices are asked
  what they would launch there.

(``manualbp`` reads these too, before anything may import triton: importing triton fixes
``TRITON_INTERPRET`` for the process.)
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["FLOAT_DTYPES", "Decision", "Launch", "acc_dtype", "gpu_code", "interpreting",
           "keep_decision", "launch", "observe", "on_device", "record", "recording", "runs_on",
           "simulate", "stream_key", "target"]  # fmt: skip

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET`` is read when triton is
    imported, so this is fixed for the process once it is)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulator dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for a launch when it is a CUDA device (Triton launches on the
    current device); a no-op otherwise."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def stream_key(device: torch.device) -> int:
    """The stream a launch on ``device`` is queued on, as a cache key: the current CUDA stream's
    handle (0 for the legacy default stream), 0 off CUDA (no streams)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


# --------------------------------------------------------------------------------------------
# The GPU a launch compiles for
# --------------------------------------------------------------------------------------------
_simulated: tuple[int, int] | None = None  # (arch, SMs) while simulate() is on


@contextlib.contextmanager
def simulate(arch: int = 90, sms: int = 132) -> Iterator[None]:
    """Launchers plan for compute capability ``arch`` (``10 * major + minor``) with ``sms`` SMs,
    whatever the tensors' device (use with :func:`record`: nothing can run)."""
    global _simulated
    previous, _simulated = _simulated, (arch, sms)
    try:
        yield
    finally:
        _simulated = previous


@functools.cache
def _cuda_facts(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return 10 * props.major + props.minor, props.multi_processor_count


def target(device: torch.device) -> tuple[int, int] | None:
    """``(arch, SMs)`` of the GPU code a launch on ``device`` runs; ``None`` for the CPU
    interpreter (small fixed configs, nothing tuned)."""
    if _simulated is not None:
        return _simulated
    if device.type != "cuda" or interpreting():
        return None
    return _cuda_facts(device.index if device.index is not None else torch.cuda.current_device())


def gpu_code(device: torch.device) -> bool:
    """Whether a launch on ``device`` runs (or plans) compiled GPU code, not the interpreter."""
    return target(device) is not None


def runs_on(device: torch.device) -> bool:
    """Whether the kernels take tensors on ``device``: CUDA, or anything under the interpreter
    (or while simulating a GPU)."""
    return device.type == "cuda" or interpreting() or _simulated is not None


# --------------------------------------------------------------------------------------------
# Launches
# --------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](*args, **kwargs)`` (``kwargs``: constexprs, block
    shapes, ``num_warps`` / ``num_stages``). ``candidates``: for a tuned launch, the configs it
    chooses among (``kwargs`` holds one of them), else empty."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict[str, Any]
    candidates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__


# record(): launches (and decisions) kept, not run, innermost last
_recorders: list[list[Launch | Decision]] = []
_observers: list[list[Launch]] = []  # observe(): launches kept, and run


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, unless recorded (module docstring)."""
    if (_recorders or _observers) and not keep(Launch(kernel, grid, args, kwargs)):
        return
    kernel[grid](*args, **kwargs)


def keep(entry: Launch) -> bool:
    """Hand ``entry`` to the open :func:`record` / :func:`observe` blocks; whether it runs."""
    for launches in _observers:
        launches.append(entry)
    if _recorders:
        _recorders[-1].append(entry)
        return False
    return True


@dataclass
class Decision:
    """A decision a recorded call would make by timing its ``candidates`` (their launches are
    recorded too)."""

    key: str
    candidates: tuple[str, ...]


def keep_decision(key: str, candidates: tuple[str, ...]) -> None:
    """Hand a :class:`Decision` to the open :func:`record` block."""
    if _recorders:
        _recorders[-1].append(Decision(key, tuple(candidates)))  # type: ignore[arg-type]


def recording() -> bool:
    """Whether launches are recorded rather than run (nothing can be timed)."""
    return bool(_recorders)


@contextlib.contextmanager
def _collect(stack: list[list[Launch]]) -> Iterator[list[Launch]]:
    launches: list[Launch] = []
    stack.append(launches)
    try:
        yield launches
    finally:
        stack.remove(launches)


def record() -> contextlib.AbstractContextManager[list[Launch | Decision]]:
    """Collect the launches made inside instead of running them (outputs stay unwritten), and
    the decisions that would be timed (:class:`Decision`), in call order."""
    return _collect(_recorders)


def observe() -> contextlib.AbstractContextManager[list[Launch]]:
    """Collect the launches made inside, and run them."""
    return _collect(_observers)


# --------------------------------------------------------------------------------------------
# Audit-case tensors: layouts the launchers' audit cases record (see audit.py)
# --------------------------------------------------------------------------------------------
def unaligned(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous zero tensor one element past a 16-byte boundary (a view at an odd offset)."""
    return torch.zeros(math.prod(shape) + 1, dtype=dtype)[1:].view(shape)


def strided_4d(dtype: torch.dtype) -> torch.Tensor:
    """A (2, 8, 16, 32) permuted zero view whose dims do not merge: the 4-d strided paths."""
    return torch.zeros(2, 16, 8, 32, dtype=dtype).permute(0, 2, 1, 3)
