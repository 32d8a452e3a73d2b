"""The compile audit (``python -m triton_kernels.audit``): a quick run on one kernel and arch.

The audit compiles real sm_80/sm_90 code with Triton's bundled toolchain, so it needs no GPU,
but it must not run under the CPU interpreter: it runs in a subprocess without
``TRITON_INTERPRET`` (``tests/conftest.py`` sets it in this process when there is no GPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_audit(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a triton 3.9 warning
    return subprocess.run(
        [sys.executable, "-m", "triton_kernels.audit", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_quick_audit_hopper_gemm_uses_wgmma():
    pytest.importorskip("triton.backends.nvidia")
    proc = _run_audit("--quick", "--arch", "90", "--kernel", "matmul", "-j", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("matmul ")]
    # Columns from the right: status, wgmma, smem, spill bytes, regs, dtype.
    assert {r[-6] for r in rows} >= {"fp16", "bf16"}, proc.stdout
    for r in rows:
        assert r[-4] == "0", f"spills: {r}"
        if r[-6] in ("fp16", "bf16"):
            assert r[-1] == "OK" and r[-2] == "yes", f"no wgmma: {r}"


def test_audit_rejects_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "triton_kernels.audit", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2


def test_problem_rules():
    from triton_kernels.audit import problems

    ok = dict(error=None, spills=0, shared=1024, arch=90, gemm=True, dtype="fp16", wgmma=True)
    assert problems(ok) == []
    assert problems({**ok, "spills": 8}) == ["spills"]
    assert problems({**ok, "wgmma": False}) == ["no wgmma"]
    assert problems({**ok, "wgmma": False, "dtype": "fp32"}) == []  # IEEE fp32: FMA path
    assert problems({**ok, "shared": 10**6}) == ["shared memory over limit"]
    assert problems({**ok, "error": "boom"}) == ["compile failed"]
    assert problems({**ok, "arch": 80, "wgmma": None}) == []


def test_every_shipped_config_is_audited():
    import torch

    from triton_kernels._matmul import configs_for
    from triton_kernels.audit import build_jobs

    jobs = build_jobs()
    for arch in (80, 90):
        for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            audited = {
                j.config
                for j in jobs
                if j.kernel == "matmul" and j.arch == arch and j.dtype == name
            }
            assert len(audited) == len(configs_for(arch, dtype, "ieee"))
