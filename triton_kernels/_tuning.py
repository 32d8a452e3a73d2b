"""Decisions made by measuring: which kernel config, and which Linear candidate (Triton or
cuBLAS), runs for a bucket of shapes. One mechanism for both, importable without triton.

:func:`choose` returns the candidate to run for a bucket ``key`` on a device:

1. a decision already made in this process (a dictionary look-up: the steady state);
2. where nothing may be timed, the caller's ``default``, kept for nothing: under the interpreter
   or on CPU tensors, while launches are only recorded (:func:`._host.record`), and during CUDA
   graph capture (timing synchronises and allocates, which would invalidate the capture: a
   bucket first met there runs its default, unrecorded, until an eager call decides it);
3. else, under a lock (one thread decides; others wait): the decision from the cache file
   (``MANUALBP_LINEAR_CACHE``), or measured: each candidate runs on the call's own tensors,
   timed by :func:`cuda_event_timer`, and the cheapest after its ``margins`` wins (margin 0.05:
   must be 5 % faster; ties go to the first). Under ``torch.distributed`` the first rank to
   decide a key publishes it on the process group's store and every rank runs that one
   (:func:`agree`): the same kernels on all ranks, for DDP's bitwise reproducibility and for
   replicated tensor-parallel weights that are never all-reduced. The decision is kept in
   memory (per device model) and written to the cache file.

No state of a call is kept on a shared object: each launch builds its own arguments for the
config it is given (a tuned launcher's ``make(config)``), so threads never see each other's.

Cache file, read at a device's first decision and rewritten atomically after each new one
(through a symbolic link, to its target)::

    {"format": "manualbp.tuning", "schema": 2, "device": "NVIDIA H200", "torch": "2.11.0",
     "triton": "3.6.0", "choices": {"fwd|bfloat16|gelu|...|K=4096": "cublas",
                                    "cfg|matmul_tma_kernel|...": "128x256x64 g8 w8 s3", ...}}

Only a regular file of at most :data:`MAX_CACHE_BYTES` is read, as JSON, validated whole;
anything else (another format, schema, device or version, an entry that is not a known key
form mapped to a name) is ignored with a warning, as is a choice naming a config or candidate
that no longer exists.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import stat
import statistics
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from . import _host

__all__ = ["CACHE_ENV", "TIMED_RUNS", "WARMUP_RUNS", "agree", "choose", "clear", "cuda_event_timer",
           "decisions", "use_timer"]  # fmt: skip

CACHE_ENV = "MANUALBP_LINEAR_CACHE"
FORMAT, SCHEMA = "manualbp.tuning", 2
MAX_CACHE_BYTES = 4 << 20
KEY_KINDS = ("fwd", "dx", "dw", "chain", "cfg")  # what a key starts with
_CANDIDATE = re.compile(r"triton|cublas")  # a Linear candidate
_CONFIG_LABEL = re.compile(r"\d+(x\d+)*( [gws]\d+)*")  # a config's label()
WARMUP_RUNS = 1
TIMED_RUNS = 5

#: ``timer(run, name) -> cost``: the cost of one call of ``run`` (any unit; smaller is faster).
Timer = Callable[[Callable[[], object], str], float]

_lock = threading.RLock()
_decisions: dict[tuple[str, str], str] = {}  # (device name, key) -> candidate name
_loaded: set[tuple[str, str]] = set()  # (cache path, device name) already read
_timer: Timer | None = None


def decisions() -> dict[tuple[str, str], str]:
    """A copy of the decisions made (or loaded) so far: ``(device name, key) -> name``."""
    with _lock:
        return dict(_decisions)


def clear() -> None:
    """Forget every decision and which cache files were read."""
    with _lock:
        _decisions.clear()
        _loaded.clear()


@contextlib.contextmanager
def use_timer(timer: Timer | None) -> Iterator[None]:
    """Time candidates with ``timer(run, name) -> cost`` instead of :func:`cuda_event_timer`,
    also where nothing is timed otherwise (CPU tensors, the interpreter); for tests."""
    global _timer
    previous, _timer = _timer, timer
    try:
        yield
    finally:
        _timer = previous


def cuda_event_timer(run: Callable[[], object], name: str) -> float:
    """Milliseconds per call of ``run`` on the current CUDA stream: the median of
    :data:`TIMED_RUNS` calls between CUDA events, after :data:`WARMUP_RUNS` untimed ones."""
    for _ in range(WARMUP_RUNS):
        run()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(TIMED_RUNS)]  # fmt: skip
    for start, end in events:
        start.record()
        run()
        end.record()
    events[-1][1].synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


@functools.cache
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (never on a CPU build)."""
    try:
        return torch.cuda.is_current_stream_capturing()
    except RuntimeError:  # a CPU-only build of torch
        return False


def _can_time(device: torch.device) -> bool:
    if _host.recording() or capturing():
        return False
    if _timer is not None:
        return True
    return device.type == "cuda" and _host.gpu_code(device)


def choose(key: str, device: torch.device, names: tuple[str, ...],
           run_of: Callable[[str], Callable[[], object]], *, default: str,
           margins: Mapping[str, float] | None = None,
           timing: Callable[[], contextlib.AbstractContextManager] | None = None,
           ) -> str:  # fmt: skip
    """The candidate (one of ``names``) to run for bucket ``key`` on ``device`` (module
    docstring); ``run_of(name)`` is a call that runs that candidate on this call's tensors;
    ``timing()``: a context entered around the timing runs, once per key (under the lock)."""
    dev = device_name(device)
    found = _decisions.get((dev, key))
    if found is not None and found in names:
        return found
    if _host.recording():  # every candidate's launches are what a first call compiles
        _host.keep_decision(key, names)
        for name in names:
            run_of(name)()
        return default
    if not _can_time(device):
        loaded = _from_file(dev, key)
        return loaded if loaded in names else default
    with _lock:
        found = _decisions.get((dev, key))
        if found is None or found not in names:
            found = _from_file(dev, key)
        if found not in names:
            with timing() if timing is not None else contextlib.nullcontext():
                found = _measure(names, run_of, _timer or cuda_event_timer, margins or {})
        found = agree(f"{dev}|{key}", found)
        _decisions[(dev, key)] = found
        path = os.environ.get(CACHE_ENV)
        if path:
            _save(path, dev)
    return found


def _measure(names: tuple[str, ...], run_of: Callable[[str], Callable[[], object]], timer: Timer,
             margins: Mapping[str, float]) -> str:  # fmt: skip
    """The cheapest candidate after its margin (the first of equals); one that raises is left
    out, with a warning, unless every one does."""
    costs: dict[str, float] = {}
    error: Exception | None = None
    for name in names:
        try:
            costs[name] = float(timer(run_of(name), name)) * (1.0 + margins.get(name, 0.0))
        except Exception as e:
            error = e
            warnings.warn(f"candidate {name!r} failed while being timed, left out: "
                          f"{type(e).__name__}: {e}", stacklevel=4)  # fmt: skip
    if not costs:
        assert error is not None
        raise error
    return min(costs, key=lambda n: (math.isnan(costs[n]), costs[n]))


def agree(key: str, mine: str) -> str:
    """``mine``, or the decision another rank of the ``torch.distributed`` job already made for
    ``key``: the first rank to decide writes it to the default process group's store, and every
    rank runs what is there. No collective: ranks that never meet ``key`` (pipeline stages)
    wait for nothing."""
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return mine
    if dist.get_world_size() < 2:
        return mine
    store = dist.distributed_c10d._get_default_store()
    found = store.compare_set(f"manualbp.tuning/{key}", "", mine)
    return found.decode() if isinstance(found, bytes) else str(found)


# --------------------------------------------------------------------------------------------
# The cache file
# --------------------------------------------------------------------------------------------
def _header(name: str) -> dict[str, Any]:
    import triton

    return dict(format=FORMAT, schema=SCHEMA, device=name, torch=torch.__version__,
                triton=triton.__version__)  # fmt: skip


def _from_file(name: str, key: str) -> str | None:
    path = os.environ.get(CACHE_ENV)
    if path and (path, name) not in _loaded:
        _loaded.add((path, name))
        for k, v in _read(path, name, warn=True).items():
            _decisions.setdefault((name, k), v)
    return _decisions.get((name, key))


def _parse(text: str, name: str) -> dict[str, str] | str:
    """The choices of a cache file's ``text``, or why they cannot be used for device ``name``."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        return f"not JSON ({type(e).__name__})"
    if not isinstance(data, dict):
        return "not a JSON object"
    for field, want in _header(name).items():
        if data.get(field) != want:
            return f"{field} is {str(data.get(field))[:80]!r}, not {want!r}"
    choices = data.get("choices")
    if not isinstance(choices, dict):
        return "no 'choices' object"
    for k, v in choices.items():
        kind = k.split("|", 1)[0]
        names = _CONFIG_LABEL if kind == "cfg" else _CANDIDATE
        if kind not in KEY_KINDS or not isinstance(v, str) or not names.fullmatch(v):
            return "an entry is not a known key mapped to a candidate or config"
    return choices


def _read(path: str, name: str, *, warn: bool) -> dict[str, str]:
    problem: dict[str, str] | str  # the choices, or why not
    try:
        info = os.stat(path)  # through a link, to its target
    except FileNotFoundError:
        return {}
    except OSError as e:
        problem = f"unreadable ({e})"
    else:
        if not stat.S_ISREG(info.st_mode):
            problem = "not a regular file"
        elif info.st_size > MAX_CACHE_BYTES:
            problem = f"larger than {MAX_CACHE_BYTES} bytes"
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    problem = _parse(f.read(MAX_CACHE_BYTES + 1), name)
            except (OSError, UnicodeDecodeError) as e:
                problem = f"unreadable ({type(e).__name__})"
            if not isinstance(problem, str):
                return problem
    if warn:
        warnings.warn(f"{CACHE_ENV}: ignoring {path}: {problem}", stacklevel=5)
    return {}


def _save(path: str, name: str) -> None:
    """Write this device's decisions, merged over the file's valid ones, atomically; through a
    symbolic link to its target; never over something that is not a regular file."""
    real = os.path.realpath(path)
    if os.path.exists(real) and not os.path.isfile(real):
        warnings.warn(f"{CACHE_ENV}: not writing {path}: not a regular file", stacklevel=5)
        return
    choices = _read(real, name, warn=False)
    choices.update({k: v for (d, k), v in _decisions.items() if d == name})
    data = {**_header(name), "choices": dict(sorted(choices.items()))}
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(real), prefix=".manualbp.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, real)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        warnings.warn(f"{CACHE_ENV}: could not write {path}: {e}", stacklevel=5)


# --------------------------------------------------------------------------------------------
# Tuned launches
# --------------------------------------------------------------------------------------------
#: ``make(config) -> (grid, args, kwargs)``: one config's launch of a tuned kernel, with
#: arguments of its own (a TMA descriptor's box, a partials buffer sized by the config).
Make = Callable[[dict[str, Any]], tuple[tuple[int, ...], tuple, dict[str, Any]]]
COMPILE_WORKERS = 16  # the GPU machine's CPU cores


def label(config: Mapping[str, Any]) -> str:
    """A config's name in decisions and reports: ``BMxBNxBK gG wW sS`` (block shapes, L2
    grouping, warps, stages; what it has of them)."""
    dims = "x".join(str(config[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in config)
    named = (("g", "GROUP_M"), ("w", "num_warps"), ("s", "num_stages"))
    parts = [dims, *(f"{p}{config[k]}" for p, k in named if k in config)]
    return " ".join(p for p in parts if p)


def tuned_launch(kernel: Any, key: str, configs: list[dict[str, Any]], make: Make,
                 device: torch.device, *,
                 restore: tuple[torch.Tensor, ...] = ()) -> dict[str, Any]:  # fmt: skip
    """Launch ``kernel`` with the config :func:`choose` keeps for ``key`` (``"cfg|<kernel>|"``
    + ``key``; default: the first config) and return that config. Before the first timing of a
    key every config is compiled at once (:func:`precompile`); ``restore``: tensors the launches
    accumulate into, put back as they were after the timing runs. Recorded
    (``_host.record``), each config's launch is recorded, as a candidate, and the first
    config is returned."""
    if _host.recording():
        for config in configs:
            grid, args, kwargs = make(config)
            _host.keep(_host.Launch(kernel, grid, args, kwargs, list(configs)))
        return configs[0]
    chosen = configs[0]
    if len(configs) > 1:
        by_label = {label(c): c for c in configs}

        def run_of(name: str) -> Callable[[], None]:
            grid, args, kwargs = make(by_label[name])
            return lambda: kernel[grid](*args, **kwargs)

        @contextlib.contextmanager
        def timing() -> Iterator[None]:
            saved = [t.clone() for t in restore]
            precompile(kernel, [make(c) for c in configs])
            try:
                yield
            finally:
                for t, copy in zip(restore, saved, strict=True):
                    t.copy_(copy)

        name = f"cfg|{kernel.__name__}|{key}"
        picked = choose(name, device, tuple(by_label), run_of, default=label(chosen),
                        timing=timing)  # fmt: skip
        chosen = by_label[picked]
    grid, args, kwargs = make(chosen)
    # _host.launch, inline (nothing records here): one frame fewer between op and kernel.
    if _host._observers:
        _host.keep(_host.Launch(kernel, grid, args, kwargs))
    kernel[grid](*args, **kwargs)
    return chosen


def precompile(kernel: Any, launches: list[tuple[tuple[int, ...], tuple, dict[str, Any]]]) -> int:
    """Compile ``kernel`` for every one of ``launches`` (their own arguments: the very
    specialisations the launches need) at once, on a thread pool under Triton's
    ``AsyncCompileMode`` where it has one (else one after another); returns how many were
    submitted. Compile errors surface when the config is launched."""
    import triton

    try:
        from concurrent.futures import ThreadPoolExecutor

        from triton.runtime import _async_compile
    except ImportError:  # no async compile in this triton: compiled when first launched
        return 0
    workers = max(1, min(COMPILE_WORKERS, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="triton-compile") as pool:
        mode = triton.AsyncCompileMode(pool, ignore_errors=True)
        # Active only around the warm-ups: triton 3.6 fails a launch made inside the mode.
        token = _async_compile.active_mode.set(mode)
        try:
            for grid, args, kwargs in launches:
                kernel.warmup(*args, grid=grid, **kwargs)
        finally:
            _async_compile.active_mode.reset(token)
            mode.__exit__(None, None, None)  # wait for every compile: they fill the caches
    return len(launches)
