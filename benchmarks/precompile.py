"""Compile the Triton GEMM configs a provider will autotune over, in parallel, before timing it.

Triton's autotuner compiles its configs one after another, on first use, inside the first call
of each autotuned kernel: with 2-7 configs per GEMM kernel at ~1-3 s each, that is most of a
case's set-up time. :func:`precompile_provider` instead binds a throw-away instance of the
provider and runs each of its modes once on one input set with triton's autotuner patched
(:class:`triton.runtime.autotuner.Autotuner` ``.run``) to *warm up* every config of every
autotuned launch instead of benchmarking and launching one. The warm-ups run under a
:class:`triton.AsyncCompileMode` with a thread pool, so all configs compile at once (Triton's
compiler releases the GIL in its MLIR/LLVM passes and runs ``ptxas`` as a subprocess). When the
throw-away pass ends, every compile is waited for and lands in the kernels' caches; the real
first call then only benchmarks the configs (and compiles nothing that was warmed up).

The warm-ups use the real call's arguments, so they compile exactly the specialisations (dtype,
16-byte alignment, integers equal to 1 or divisible by 16) the real launches need. Kernels that
are not autotuned (the elementwise ones) compile, as usual, when the throw-away pass launches
them; autotuned kernels launch nothing during that pass (their outputs stay uninitialised, which
nothing downstream minds: the pass's results are discarded, and its model too). The pass runs
with the Triton candidate of manualbp's per-shape Linear choice forced, so that it decides
nothing (a choice timed against GEMMs that launch nothing would be kept for the whole run);
the real first call then measures the choice.

Robustness (triton 3.6 and 3.9, the versions this project meets): both have
``triton.AsyncCompileMode``, ``Autotuner.warmup`` and ``JITFunction.warmup``. In triton 3.6 a
kernel *launched* (not warmed up) while an ``AsyncCompileMode`` is active fails (its
``FutureKernel`` has no attributes of a compiled kernel), so the mode is made active only
around each autotuner's warm-ups (triton's ``active_mode`` context variable, the same in both),
never while the throw-away pass launches anything. Compile errors are ignored here
(``ignore_errors``): the autotuner meets them again and handles them as it always does. Any
other failure is recorded and the provider is measured as without this step. Without
``triton.AsyncCompileMode`` (older triton) the step is skipped and says so.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from manualbp.kernels._host import interpreting

from benchmarks.cases import TRITON_PROVIDERS, Case

__all__ = ["TRITON_PROVIDERS", "max_workers", "precompile_provider", "unavailable_reason"]

MAX_WORKERS = 16  # the GPU machine has 16 CPU cores


def max_workers() -> int:
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def unavailable_reason(device: torch.device) -> str | None:
    """Why the step cannot run here (``None``: it can)."""
    if device.type != "cuda":
        return "no CUDA device: no Triton kernels to compile"
    if interpreting():
        return "TRITON_INTERPRET is set: nothing is compiled"
    try:
        import triton
        from triton.runtime import _async_compile  # noqa: F401
        from triton.runtime.autotuner import Autotuner
    except Exception as e:
        return f"triton's async compile API is not importable: {type(e).__name__}: {e}"
    if not hasattr(triton, "AsyncCompileMode") or not hasattr(Autotuner, "warmup"):
        return f"triton {triton.__version__} has no AsyncCompileMode / Autotuner.warmup"
    return None


@contextlib.contextmanager
def _warm_up_instead_of_tuning(mode: Any, counter: list[int]) -> Iterator[None]:
    """While active: an autotuned launch submits every config's compile to ``mode`` (active
    only during that submission) and launches nothing."""
    from triton.runtime import _async_compile
    from triton.runtime.autotuner import Autotuner

    original = Autotuner.run

    def warm_up(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("warmup", None)  # run(grid=..., warmup=False, ...) -> warmup(grid=..., ...)
        token = _async_compile.active_mode.set(mode)
        try:
            counter[0] += len(self.warmup(*args, **kwargs) or ())
        finally:
            _async_compile.active_mode.reset(token)

    Autotuner.run = warm_up
    try:
        yield
    finally:
        Autotuner.run = original


def precompile_provider(case: Case, provider: str, device: torch.device) -> dict[str, Any]:
    """Compile, in parallel, the autotuned configs ``provider`` will need on ``case``; returns
    what it did (``status`` ran / skipped / error, ``configs_warmed``: autotuner configs
    warmed up, compiled or found compiled; ``seconds``)."""
    reason = unavailable_reason(device)
    if reason is not None:
        return {"status": "skipped", "reason": reason}
    import triton

    t0 = time.perf_counter()
    counter = [0]
    workers = max_workers()
    out: dict[str, Any] = {"status": "ran", "workers": workers}
    with ThreadPoolExecutor(workers, thread_name_prefix="triton-compile") as pool:
        mode = triton.AsyncCompileMode(pool, ignore_errors=True)
        try:
            with _warm_up_instead_of_tuning(mode, counter), torch.cuda.device(device):
                _throw_away_pass(case, provider, device)
        except Exception as e:
            out.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            try:
                mode.__exit__(None, None, None)  # wait for every compile, fill the caches
            except Exception as e:
                out.update(status="error", reason=f"waiting: {type(e).__name__}: {e}")
    out.update(configs_warmed=counter[0], seconds=time.perf_counter() - t0)
    return out


def _throw_away_pass(case: Case, provider: str, device: torch.device) -> None:
    """Each mode of a fresh instance of ``provider`` once on a fresh input set (an optimizer
    step changes its set), both dropped afterwards; under :func:`_no_linear_choice`."""
    one_set = case.make_set(0)
    bound = case.bind(provider)
    try:
        with _no_linear_choice():
            for prepare, run in bound.modes.values():
                run(prepare(one_set))
        torch.cuda.synchronize(device)
    finally:
        del bound, one_set


def _no_linear_choice() -> contextlib.AbstractContextManager[Any]:
    """The Triton candidate of manualbp's Linear choice forced (``linear_choice.force``), so
    that the throw-away pass compiles its GEMM configs and decides nothing: with the autotuner
    patched, the Triton GEMMs launch nothing, and a choice timed now would keep a meaningless
    winner for the rest of the run. A provider that forces a candidate itself
    (``manualbp_cublas``) still does so inside this block."""
    try:
        from manualbp.kernels.linear import force
    except Exception:
        return contextlib.nullcontext()
    return force("triton")
