"""Compile, all at once, every Triton kernel a provider's first calls will launch.

A first call compiles launch after launch (the forward's configs, each elementwise kernel, dX's,
dW's). :func:`precompile_provider` looks ahead for it: it records a throw-away pass of the
provider on the case's own tensors (:func:`benchmarks.plan.record_modes`: nothing runs), keeps
one launch per specialisation (:func:`benchmarks.plan.compile_key`) and warms them all up under
one Triton ``AsyncCompileMode`` on a thread pool (triton 3.6 and 3.9; the mode is active only
around the warm-ups). Compile errors are left to the launch; any other failure is recorded in
the provider's ``precompile`` record and the provider is measured as without this step.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from manualbp.kernels._host import Decision, Launch, interpreting

from benchmarks.cases import Case
from benchmarks.plan import compile_key, record_modes

__all__ = ["compile_all", "precompile_provider", "unavailable_reason", "unique_launches"]

MAX_WORKERS = 16  # the GPU machine has 16 CPU cores


def unavailable_reason(device: torch.device) -> str | None:
    """Why the step cannot run here (``None``: it can)."""
    if device.type != "cuda":
        return "no CUDA device: no Triton kernels to compile"
    if interpreting():
        return "TRITON_INTERPRET is set: nothing is compiled"
    try:
        import triton
        from triton.runtime import _async_compile  # noqa: F401
    except Exception as e:
        return f"triton's async compile API is not importable: {type(e).__name__}: {e}"
    if not hasattr(triton, "AsyncCompileMode"):
        return f"triton {triton.__version__} has no AsyncCompileMode"
    return None


def unique_launches(entries: Iterable[Launch | Decision]) -> list[Launch]:
    """The first launch of each specialisation among ``entries``, in call order."""
    first: dict[tuple, Launch] = {}
    for entry in entries:
        if isinstance(entry, Launch):
            first.setdefault(compile_key(entry), entry)
    return list(first.values())


def compile_all(launches: list[Launch], workers: int) -> None:
    """Warm up every one of ``launches`` (compile, launch nothing) under one
    ``AsyncCompileMode`` on ``workers`` threads, and wait for every compile."""
    import triton
    from triton.runtime import _async_compile

    with ThreadPoolExecutor(workers, thread_name_prefix="triton-compile") as pool:
        mode = triton.AsyncCompileMode(pool, ignore_errors=True)
        token = _async_compile.active_mode.set(mode)
        try:
            for launch in launches:
                launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
        finally:
            _async_compile.active_mode.reset(token)
            mode.__exit__(None, None, None)  # wait for every compile: they fill the caches


def precompile_provider(case: Case, provider: str, device: torch.device) -> dict[str, Any]:
    """Compile what ``provider``'s first calls on ``case`` will launch; returns what it did
    (``status`` ran / skipped / error, ``compiles``: specialisations warmed up, compiled or
    found compiled, ``kernels``: of which kernels, ``workers``, ``seconds``)."""
    reason = unavailable_reason(device)
    if reason is not None:
        return {"status": "skipped", "reason": reason}
    t0 = time.perf_counter()
    workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    out: dict[str, Any] = {"status": "ran", "workers": workers}
    try:
        with torch.cuda.device(device):
            launches = unique_launches(record_modes(case, provider))
            compile_all(launches, workers)
        out.update(compiles=len(launches), kernels=dict(Counter(lz.name for lz in launches)))
    except Exception as e:
        out.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
    out["seconds"] = time.perf_counter() - t0
    return out
