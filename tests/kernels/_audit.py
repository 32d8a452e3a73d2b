"""Running the compile audit (``python -m manualbp.kernels.audit``) from the tests.

The audit compiles real sm_80/sm_90 code and derives its jobs from the kernels' own parameters
(``JITFunction``), so it must not run under the CPU interpreter: it runs in a subprocess without
``TRITON_INTERPRET`` (``tests/conftest.py`` sets it in the test process when there is no GPU).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def compiled_env() -> dict[str, str]:
    """The environment of a subprocess that compiles GPU code (no interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a triton 3.9 warning
    return env


def run_python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """``python *args`` in the repository root, without the interpreter."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=compiled_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def run_audit(*args: str) -> subprocess.CompletedProcess[str]:
    return run_python("-m", "manualbp.kernels.audit", *args)


@functools.cache
def audit_jobs(*args: str) -> tuple[dict[str, Any], ...]:
    """The audit's jobs (``--list``, JSON), e.g. ``audit_jobs("--arch", "90")``."""
    proc = run_audit("--list", *args)
    assert proc.returncode == 0, proc.stderr
    return tuple(json.loads(line) for line in proc.stdout.splitlines())


def shape(job: dict[str, Any]) -> tuple[int, ...]:
    """A GEMM job's config as ``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)``."""
    c = job["constexprs"]
    return (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["GROUP_M"], job["options"]["num_warps"],
            job["options"]["num_stages"])  # fmt: skip


def config_shape(cfg: dict[str, int]) -> tuple[int, ...]:
    """A shipped config as :func:`shape` gives it."""
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
    return tuple(cfg[k] for k in keys)
