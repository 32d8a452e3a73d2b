"""Which implementation runs each Linear GEMM on the Triton backend: a per-shape choice, measured.

Candidates, for each call of :class:`~manualbp.backends.triton.TritonBackend`'s Linear ops:

* forward, ``"triton"``: the fused kernel of ``triton_kernels/linear_forward.py`` (GEMM with
  the bias, the pre-activation store and the activation in its epilogue);
* forward, ``"cublas"``: ``torch.addmm`` / ``torch.mm`` (cuBLAS on CUDA), then, when there is
  an activation, the elementwise pass of ``triton_kernels/linear_epilogue.py`` (reads the GEMM
  output once, writes y, in place when the pre-activation is not kept). The bias goes into the
  GEMM (cuBLASLt's bias epilogue, native ``F.linear``'s own path and rounding) except in
  float64, where torch's addmm first copies the bias into the output: there the GEMM is
  ``mm`` and the elementwise pass adds the bias (the fp64 GEMM output is the accumulator
  itself, so z is still rounded once);
* backward: the Triton elementwise pass of ``triton_kernels/linear_backward.py`` (dZ = dY ⊙
  act'(·) and the bias gradient, deterministic) runs in both; then dX = dZ W and dW = dZᵀ X
  are chosen **separately** (``"dx"``, ``"dw"``), each between the Triton GEMM path of
  ``linear_backward.py`` (``"triton"``) and ``torch.mm`` (``"cublas"``).

The choice (``"auto"``): at the first call in a *bucket* — op, dtype (fp32 with its matmul
precision), activation, bias and pre-activation store (forward), operand layouts, M rounded up
to a power of two, N, K — every candidate runs on the call's own tensors, timed by
:func:`cuda_event_timer` (one warm-up run, which also compiles and autotunes, then the median
of :data:`TIMED_RUNS` runs between CUDA events); the fastest is kept for that bucket on that
device (ties: ``"triton"``), in memory, and every later call in the bucket runs it, with no
timing. The first call's result is computed by the kept candidate too, so results never depend
on which call measured. Nothing is timed for an empty or K == 0 shape, under Triton's CPU
interpreter or on CPU tensors (``"triton"`` runs; an injected timer, :func:`use_timer`, times
there too, for tests), or while a CUDA graph is being captured (``"triton"`` runs, unrecorded).

Forcing one candidate: :func:`force` (process-wide: the backward of CUDA tensors runs on
autograd's device threads), else ``MANUALBP_LINEAR_IMPL`` = ``auto`` | ``triton`` |
``cublas`` (read at each call; another value is a ``ValueError``).

Persisting: ``MANUALBP_LINEAR_CACHE=/path/file.json`` names a JSON file read at a device's first
decision and rewritten (atomically: a temporary file, then ``os.replace``) after each new one,
so a later run does not measure again::

    {"format": "manualbp.linear_choice", "schema": 1, "device": "NVIDIA H200",
     "torch": "2.11.0+cu128", "triton": "3.6.0",
     "choices": {"fwd|bfloat16|gelu|bias|preact|x:r,w:r|M=8192|N=16384|K=4096": "cublas", ...}}

It is only ever parsed as JSON and validated whole: a file that is not JSON, has another
format or schema, another device, torch or triton version, or any entry that is not a known
key form mapped to a candidate is ignored with a warning (and replaced by this process's
decisions). One file serves one device model; decisions for a second model in the same
process stay in memory.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import statistics
import tempfile
import threading
import warnings
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CACHE_ENV",
    "IMPLS",
    "IMPL_ENV",
    "SCHEMA",
    "TIMED_RUNS",
    "choose",
    "clear",
    "cuda_event_timer",
    "decisions",
    "force",
    "linear_backward",
    "linear_forward",
    "mode",
    "use_timer",
]

#: The candidates, in measuring order (the first wins a tie).
IMPLS = ("triton", "cublas")
MODES = ("auto", *IMPLS)
DEFAULT_IMPL = "triton"
IMPL_ENV = "MANUALBP_LINEAR_IMPL"
CACHE_ENV = "MANUALBP_LINEAR_CACHE"
SCHEMA = 1
FORMAT = "manualbp.linear_choice"
WARMUP_RUNS = 1
TIMED_RUNS = 5

#: ``timer(run, impl) -> cost``: the cost of one call of ``run`` (any unit, smaller is faster).
Timer = Callable[[Callable[[], object], str], float]


@functools.cache
def _kernels(name: str) -> ModuleType:
    """The launcher module ``manualbp.kernels.<name>`` (imported on first use: importing
    triton must wait until ``TRITON_INTERPRET`` is settled)."""
    return importlib.import_module(f"manualbp.kernels.{name}")


# ---------------------------------------------------------------------------------------------
# Settings: forcing a candidate, injecting a timer.
# ---------------------------------------------------------------------------------------------
class _Setting:
    """A process-wide setting applied at once, or for a ``with`` block (restored at its end),
    as ``torch.set_grad_enabled`` works."""

    _value: Any = None

    def __init__(self, value: Any) -> None:
        cls = type(self)
        self._previous = cls._value
        cls._value = self._check(value)

    @staticmethod
    def _check(value: Any) -> Any:
        return value

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        type(self)._value = self._previous


class force(_Setting):  # noqa: N801 (used like a function)
    """Run every Linear GEMM with ``impl`` (``"triton"`` or ``"cublas"``) instead of choosing;
    ``"auto"`` chooses (overriding ``MANUALBP_LINEAR_IMPL``), ``None`` defers to that variable.
    Process-wide; as a ``with`` block, restored at its end::

        with manualbp.backends.linear_choice.force("cublas"):
            loss = model(x).square().mean()
            loss.backward()
    """

    @staticmethod
    def _check(value: Any) -> str | None:
        if value is not None and (not isinstance(value, str) or value.lower() not in MODES):
            raise ValueError(f"force: unknown Linear implementation {value!r}; expected one of "
                             f"{', '.join(map(repr, MODES))} or None")  # fmt: skip
        return None if value is None else value.lower()


class use_timer(_Setting):  # noqa: N801 (used like a function)
    """Time candidates with ``timer(run, impl) -> cost`` instead of :func:`cuda_event_timer`,
    also where nothing is timed otherwise (CPU tensors, the interpreter); ``None`` restores the
    default. For tests (e.g. a timer that counts measurements)."""


def mode() -> str:
    """``"auto"``, ``"triton"`` or ``"cublas"``: :func:`force`'s setting, else
    ``MANUALBP_LINEAR_IMPL``, else ``"auto"``. ``ValueError`` for an unknown variable value."""
    forced = force._value
    if forced is not None:
        return forced
    value = os.environ.get(IMPL_ENV)
    if not value:
        return "auto"
    if value.lower() not in MODES:
        raise ValueError(f"{IMPL_ENV}={value!r}: unknown Linear implementation; expected one "
                         f"of {', '.join(MODES)}")  # fmt: skip
    return value.lower()


def cuda_event_timer(run: Callable[[], object], impl: str) -> float:
    """Milliseconds per call of ``run`` on the current CUDA stream: the median of
    :data:`TIMED_RUNS` calls between CUDA events, after :data:`WARMUP_RUNS` untimed ones
    (those compile and autotune the Triton kernels)."""
    for _ in range(WARMUP_RUNS):
        run()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(TIMED_RUNS)
    ]
    for start, end in events:
        start.record()
        run()
        end.record()
    events[-1][1].synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


# ---------------------------------------------------------------------------------------------
# Decisions: in memory, optionally persisted.
# ---------------------------------------------------------------------------------------------
_lock = threading.RLock()
_decisions: dict[tuple[str, str], str] = {}  # (device name, bucket key) -> impl
_loaded: set[tuple[str, str]] = set()  # (cache path, device name) already read


def decisions() -> dict[tuple[str, str], str]:
    """A copy of the decisions made (or loaded) so far: ``(device name, bucket key) -> impl``."""
    with _lock:
        return dict(_decisions)


def clear() -> None:
    """Forget every decision and which cache files were read (the next call decides anew)."""
    with _lock:
        _decisions.clear()
        _loaded.clear()


@functools.cache
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _header(device_name: str) -> dict[str, Any]:
    import triton

    return dict(format=FORMAT, schema=SCHEMA, device=device_name, torch=torch.__version__,
                triton=triton.__version__)  # fmt: skip


def _valid_key(key: object) -> bool:
    return isinstance(key, str) and key.split("|", 1)[0] in ("fwd", "dx", "dw")


def _parse(text: str, device_name: str) -> dict[str, str] | str:
    """The choices of a cache file's ``text``, or why it is not valid for ``device_name``."""
    try:
        data = json.loads(text)
    except ValueError as e:
        return f"not JSON ({e})"
    if not isinstance(data, dict):
        return "not a JSON object"
    header = _header(device_name)
    for field, want in header.items():
        if data.get(field) != want:
            return f"{field} is {data.get(field)!r}, not {want!r}"
    choices = data.get("choices")
    if not isinstance(choices, dict):
        return "no 'choices' object"
    if not all(_valid_key(k) and v in IMPLS for k, v in choices.items()):
        return "an entry is not a bucket key mapped to one of " + ", ".join(IMPLS)
    return choices


def _read(path: str, device_name: str, *, warn: bool) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        parsed: dict[str, str] | str = f"unreadable ({e})"
    else:
        parsed = _parse(text, device_name)
    if isinstance(parsed, str):
        if warn:
            warnings.warn(f"{CACHE_ENV}: ignoring {path}: {parsed}; it will be replaced by "
                          "this process's decisions", stacklevel=4)  # fmt: skip
        return {}
    return parsed


def _load(path: str, device_name: str) -> None:
    """Merge ``path``'s choices for ``device_name`` into memory, once per (path, device)."""
    if (path, device_name) in _loaded:
        return
    _loaded.add((path, device_name))
    for key, impl in _read(path, device_name, warn=True).items():
        _decisions.setdefault((device_name, key), impl)


def _save(path: str, device_name: str) -> None:
    """Write this device's decisions (merged over the file's current valid ones) atomically."""
    choices = _read(path, device_name, warn=False)
    choices.update({k: v for (d, k), v in _decisions.items() if d == device_name})
    data = {**_header(device_name), "choices": dict(sorted(choices.items()))}
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".linear_choice.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        warnings.warn(f"{CACHE_ENV}: could not write {path}: {e}", stacklevel=4)


def _can_time(device: torch.device, timer: Timer | None) -> bool:
    if timer is not None:
        return True
    from manualbp.kernels._host import interpreting

    if device.type != "cuda" or interpreting():
        return False
    return not torch.cuda.is_current_stream_capturing()


def _measure(candidates: Mapping[str, Callable[[], object]], timer: Timer) -> str:
    """The fastest candidate (the first of equals); one that raises is left out, with a
    warning, unless every one does."""
    costs: dict[str, float] = {}
    error: Exception | None = None
    for impl, run in candidates.items():
        try:
            costs[impl] = float(timer(run, impl))
        except Exception as e:
            error = e
            warnings.warn(f"Linear candidate {impl!r} failed while being timed, left out: "
                          f"{type(e).__name__}: {e}", stacklevel=4)  # fmt: skip
    if not costs:
        assert error is not None
        raise error
    return min(costs, key=lambda impl: (math.isnan(costs[impl]), costs[impl]))


def choose(key: str, device: torch.device, candidates: Mapping[str, Callable[[], object]]) -> str:
    """The candidate to run for bucket ``key`` on ``device`` (module docstring); ``candidates``
    maps each of :data:`IMPLS` to a call that runs it on this call's tensors."""
    chosen = mode()
    return chosen if chosen != "auto" else _decide(key, device, candidates)


def _decide(key: str, device: torch.device, candidates: Mapping[str, Callable[[], object]]) -> str:
    """:func:`choose` in ``"auto"`` mode: the kept decision, else a measured one."""
    name = _device_name(device)
    found = _decisions.get((name, key))
    if found is not None:
        return found
    timer = use_timer._value
    path = os.environ.get(CACHE_ENV)
    with _lock:
        if path:
            _load(path, name)
        found = _decisions.get((name, key))
        if found is not None:
            return found
        if not _can_time(device, timer):
            return DEFAULT_IMPL
        impl = _measure(candidates, timer or cuda_event_timer)
        _decisions[(name, key)] = impl
        if path:
            _save(path, name)
    return impl


# ---------------------------------------------------------------------------------------------
# Bucket keys.
# ---------------------------------------------------------------------------------------------
def _layout(t: Tensor) -> str:
    """``r`` row-major, ``c`` column-major, ``s`` neither (of a 2-D tensor)."""
    if t.stride(1) == 1 or t.shape[1] <= 1:
        return "r"
    return "c" if t.stride(0) == 1 or t.shape[0] <= 1 else "s"


def _dtype_tag(dtype: torch.dtype) -> str:
    tag = str(dtype).removeprefix("torch.")
    if dtype == torch.float32:
        tag += "-" + torch.get_float32_matmul_precision()
    return tag


def _bucket(M: int, N: int, K: int) -> str:
    return f"M={1 << max(M - 1, 0).bit_length()}|N={N}|K={K}"


def forward_key(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None, store_preact: bool
) -> str:
    """The bucket of a forward call (module docstring)."""
    parts = (
        "fwd",
        _dtype_tag(x.dtype),
        activation or "none",
        "nobias" if bias is None else "bias",
        "preact" if store_preact else "nopreact",
        f"x:{_layout(x)},w:{_layout(weight)}",
        _bucket(x.shape[0], weight.shape[0], x.shape[1]),
    )
    return "|".join(parts)


def gemm_key(op: str, a: Tensor, b: Tensor) -> str:
    """The bucket of ``a @ b`` for backward GEMM ``op`` (``"dx"`` or ``"dw"``); M, N, K are
    the layer's (dX = dZ W: the GEMM's own; dW = dZᵀ X: its M is the layer's N)."""
    m, k = a.shape
    n = b.shape[1]
    M, N, K = (m, k, n) if op == "dx" else (k, m, n)
    return "|".join((op, _dtype_tag(a.dtype), f"a:{_layout(a)},b:{_layout(b)}", _bucket(M, N, K)))


# ---------------------------------------------------------------------------------------------
# The candidates.
# ---------------------------------------------------------------------------------------------
def _forward_triton(x, weight, bias, activation, slope, y, z) -> None:
    _kernels("linear_forward").linear_forward(
        x, weight, bias, activation, slope, store_preact=z is not None, out=y, preact_out=z
    )


def _forward_cublas(x, weight, bias, activation, slope, y, z) -> None:
    """cuBLAS GEMM (the bias in it, except in fp64), then the elementwise pass if needed."""
    bias_in_gemm = bias is not None and x.dtype != torch.float64
    pass_bias = None if bias_in_gemm else bias
    target = y if z is None else z  # the GEMM writes the pre-activation here
    if bias_in_gemm:
        torch.addmm(bias, x, weight.t(), out=target)
    else:
        torch.mm(x, weight.t(), out=target)
    if target is y and activation is None and pass_bias is None:
        return  # y is the GEMM's output
    # Reads the GEMM output once; writes y (in place when target is y) and, when the bias is
    # added here, the finished z in place.
    _kernels("linear_epilogue").linear_epilogue(
        target, pass_bias, activation, slope,
        out=y, preact_out=target if target is z and pass_bias is not None else None,
    )  # fmt: skip


FORWARDS: dict[str, Callable[..., None]] = {"triton": _forward_triton, "cublas": _forward_cublas}


def _dx_triton(dz: Tensor, weight: Tensor) -> Tensor:
    # The Triton GEMM path of linear_backward.py itself, on dZ with no activation and no db.
    lb = _kernels("linear_backward")
    return lb.linear_backward(dz, None, weight, None, None, 0.0, needs_grad=(True, False, False))[0]


def _dw_triton(dz: Tensor, x: Tensor) -> Tensor:
    lb = _kernels("linear_backward")
    return lb.linear_backward(dz, x, None, None, None, 0.0, needs_grad=(False, True, False))[1]


def _dx_cublas(dz: Tensor, weight: Tensor) -> Tensor:
    return torch.mm(dz, weight)


def _dw_cublas(dz: Tensor, x: Tensor) -> Tensor:
    return torch.mm(dz.t(), x)


#: op -> impl -> ``f(dz, operand)``: dX = f(dZ, W), dW = f(dZ, X).
GEMMS: dict[str, dict[str, Callable[[Tensor, Tensor], Tensor]]] = {
    "dx": {"triton": _dx_triton, "cublas": _dx_cublas},
    "dw": {"triton": _dw_triton, "cublas": _dw_cublas},
}


# ---------------------------------------------------------------------------------------------
# The Linear ops, as TritonBackend calls them.
# ---------------------------------------------------------------------------------------------
def _pick(M: int, N: int, K: int, key: Callable[[], str], device: torch.device, runs) -> str:
    """:func:`choose` for an (M, N, K) GEMM, building the bucket key only when it is needed;
    an empty or K == 0 shape times nothing (the default runs)."""
    chosen = mode()
    if chosen != "auto":
        return chosen
    if M == 0 or N == 0 or K == 0:
        return DEFAULT_IMPL
    return _decide(key(), device, runs)


def linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: str | None,
    negative_slope: float,
    *,
    store_preact: bool,
    out: Tensor,
    preact_out: Tensor | None,
) -> None:
    """``out = act(x @ weight.T + bias)`` and, if ``store_preact``, ``preact_out`` = the
    pre-activation, for 2-D ``x`` (M, K), by the chosen candidate."""
    z = preact_out if store_preact else None
    args = (x, weight, bias, activation, negative_slope, out, z)
    runs = {i: functools.partial(FORWARDS[i], *args) for i in IMPLS}
    key = functools.partial(forward_key, x, weight, bias, activation, store_preact)
    impl = _pick(x.shape[0], weight.shape[0], x.shape[1], key, x.device, runs)
    FORWARDS[impl](*args)


def _gemm(op: str, dz: Tensor, operand: Tensor) -> Tensor:
    """dX (``op="dx"``, operand W) or dW (``"dw"``, operand X) by the chosen candidate."""
    a, b = (dz, operand) if op == "dx" else (dz.t(), operand)
    runs = {i: functools.partial(GEMMS[op][i], dz, operand) for i in IMPLS}
    key = functools.partial(gemm_key, op, a, b)
    impl = _pick(a.shape[0], b.shape[1], a.shape[1], key, dz.device, runs)
    return GEMMS[op][impl](dz, operand)


def linear_backward(
    grad_y: Tensor,
    x: Tensor | None,
    weight: Tensor | None,
    saved: Tensor | None,
    activation: str | None,
    negative_slope: float,
    *,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dW, db)`` of ``y = act(x W^T + b)`` (arguments as
    ``triton_kernels.linear_backward.linear_backward``), each GEMM by its chosen candidate:

    dZ = dY ⊙ act'(saved), db = Σ_rows dZ   (the Triton elementwise pass, always)
    dX = dZ W,  dW = dZᵀ X                  (Triton GEMM or torch.mm, chosen per GEMM)
    """
    lb = _kernels("linear_backward")
    need_dx, need_dw, need_db = needs_grad
    M, N = grad_y.shape
    if M == 0 or N == 0 or not (need_dx or need_dw):
        return lb.linear_backward(grad_y, x, weight, saved, activation, negative_slope,
                                  needs_grad=tuple(needs_grad))  # fmt: skip
    act = "none" if activation is None else activation
    dz, db = grad_y, None
    if act != "none" or need_db:
        dz_act, db = lb._act_grad_and_bias(
            grad_y, saved, act, negative_slope, act != "none", need_db
        )
        dz = grad_y if dz_act is None else dz_act
    dx = _gemm("dx", dz, weight) if need_dx else None
    dw = _gemm("dw", dz, x) if need_dw else None
    return dx, dw, db
