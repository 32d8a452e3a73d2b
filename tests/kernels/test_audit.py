"""The compile audit (``python -m triton_kernels.audit``): a quick run on one kernel and arch.

The audit compiles real sm_80/sm_90 code with Triton's bundled toolchain, so it needs no GPU,
but it must not run under the CPU interpreter: it runs in a subprocess without
``TRITON_INTERPRET`` (``tests/conftest.py`` sets it in this process when there is no GPU).
"""

from __future__ import annotations

import json
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
        [sys.executable, "-m", "manualbp.kernels.audit", *args],
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
        [sys.executable, "-m", "manualbp.kernels.audit", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Exit 2 alone would also be argparse's answer to a bad flag: check the reason given.
    assert proc.returncode == 2
    assert "unset TRITON_INTERPRET" in proc.stderr, proc.stderr


def test_problem_rules():
    from manualbp.kernels.audit import problems

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
    from manualbp.kernels._matmul import configs_for
    from manualbp.kernels.audit import build_jobs

    jobs = build_jobs()
    for arch in (80, 90):
        for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            audited = {
                j.config
                for j in jobs
                if j.kernel == "matmul" and j.arch == arch and j.dtype == name
            }
            assert len(audited) == len(configs_for(arch, dtype, "ieee"))


def test_mse_and_sgd_kernels_are_audited():
    from manualbp.kernels import mse, sgd
    from manualbp.kernels.audit import SGD_VARIANTS, build_jobs

    names = {"mse_fwd", "mse_bwd", "mse_scale", "sgd"}
    jobs = build_jobs()
    for arch in (80, 90):
        for dtype in ("fp16", "bf16", "fp32", "fp64"):
            built = {j.kernel for j in jobs if j.arch == arch and j.dtype == dtype}
            assert names <= built, (arch, dtype, built)

    # Shipped CUDA launch configs, not the interpreter's.
    def shipped(j):
        if j.kernel == "mse_fwd":  # the launcher picks by layout: see mse.launch_config
            return mse.launch_config("fwd", j.constexprs["NDIM"], cuda=True)
        if j.kernel == "sgd":
            return sgd.launch_config(cuda=True)
        return mse.launch_config("elementwise", cuda=True)

    for j in jobs:
        if j.kernel in names:
            cfg = shipped(j)
            assert (j.constexprs["BLOCK"], j.num_warps) == (cfg["BLOCK"], cfg["num_warps"]), j
        if j.kernel in names:
            assert not j.gemm
    fwd = {
        (j.constexprs["REDUCE"], j.constexprs["COMPUTE_GRAD"])
        for j in jobs
        if j.kernel == "mse_fwd"
    }
    assert fwd == {(True, True), (True, False), (False, False)}
    sgd_cfgs = {j.config for j in jobs if j.kernel == "sgd" and j.arch == 90 and j.dtype == "fp32"}
    assert len(sgd_cfgs) == len(SGD_VARIANTS)
    assert build_jobs(kernels={"sgd"}, quick=True) and all(
        j.kernel == "sgd" for j in build_jobs(kernels={"sgd"}, quick=True)
    )


def test_quick_audit_mse_and_sgd_compile_without_spills():
    pytest.importorskip("triton.backends.nvidia")
    proc = _run_audit("--quick", "--arch", "80", "--kernel", "mse_fwd,sgd", "-j", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [
        line.split() for line in proc.stdout.splitlines() if line.startswith(("mse_fwd ", "sgd "))
    ]
    assert {r[0] for r in rows} == {"mse_fwd", "sgd"}, proc.stdout
    for r in rows:
        # Columns from the right: status, wgmma, smem, spill bytes, regs.
        assert r[-1] == "OK" and r[-4] == "0", r


def test_vector_width_rule():
    from manualbp.kernels.audit import problems, vector_widths

    assert vector_widths("ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];")["ld_bits"] == 128
    assert vector_widths("ld.global.b16 %rs1, [%rd1];")["ld_bits"] == 16
    row = {"error": None, "spills": 0, "shared": 0, "arch": 90, "dtype": "fp32", "gemm": False}
    row.update(need_v128=True, ld_bits=32)
    assert "no 128-bit loads" in problems(row)


def test_tma_rule():
    from manualbp.kernels.audit import problems, tma_usage

    usage = tma_usage("cp.async.bulk.tensor.2d.shared::cluster.global", "UTMALDG UTMASTG HGMMA")
    assert usage == dict(ptx_bulk=1, tma_ld=1, tma_st=1, ws=0)
    row = dict(error=None, spills=0, shared=1024, arch=90, gemm=True, dtype="bf16", wgmma=True)
    row.update(usage, need_tma=True)
    assert problems(row) == []
    assert problems({**row, "tma_ld": 0}) == ["no TMA"]  # loads through cp.async: not TMA
    assert problems({**row, "tma_st": 0}) == ["no TMA"]
    assert problems({**row, "ptx_bulk": 0, "wgmma": False}) == ["no wgmma", "no TMA"]


def test_every_hopper_config_is_audited():
    import torch
    from manualbp.kernels._matmul_hopper import hopper_configs_for
    from manualbp.kernels.audit import build_jobs

    jobs = build_jobs()
    tma = [j for j in jobs if j.kernel in ("matmul_tma", "linear_forward_tma")]
    assert tma and all(j.arch >= 90 and j.gemm and j.fields.get("tma") for j in tma)
    for dtype, precision, name in (
        (torch.float16, "ieee", "fp16"),
        (torch.bfloat16, "ieee", "bf16"),
        (torch.float32, "tf32", "tf32"),
    ):
        for kernel, epilogue in (("matmul_tma", False), ("linear_forward_tma", True)):
            audited = {j.config.rsplit(" ", 1)[0] for j in tma
                       if j.kernel == kernel and j.dtype == name}  # fmt: skip
            cfgs = hopper_configs_for(90, dtype, precision, epilogue=epilogue)
            assert len(audited) == len(cfgs), (kernel, name, audited)
        layouts = {(j.constexprs["A_T"], j.constexprs["B_T"]) for j in tma if j.dtype == name}
        assert layouts == {(False, False), (True, False), (False, True)}  # dX, dW, forward
    assert not [j for j in build_jobs(archs=(80,)) if j.kernel.endswith("_tma")]


def test_hopper_kernel_compiles_with_tma_and_wgmma():
    """Two real sm_90 compiles (this process runs the interpreter: a subprocess): the forward
    with erf-GELU and dW's transposed-A layout, bf16, must show TMA loads and stores, wgmma
    and no spills."""
    pytest.importorskip("triton.backends.nvidia")
    code = (
        "import json\n"
        "from manualbp.kernels.audit import build_jobs, compile_job, problems\n"
        "jobs = [j for j in build_jobs((90,), {'matmul_tma', 'linear_forward_tma'}, quick=True)\n"
        "        if j.dtype == 'bf16' and (j.kernel == 'linear_forward_tma' or 'dW' in j.config)]\n"
        "rows = [compile_job(j) for j in jobs]\n"
        "print(json.dumps([dict(r, problems=problems(r)) for r in rows]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in rows} == {"matmul_tma", "linear_forward_tma"}, rows
    for r in rows:
        assert r["problems"] == [] and r["spills"] == 0 and r["wgmma"], r
        assert r["ptx_bulk"] > 0 and r["tma_ld"] > 0 and r["tma_st"] > 0, r
