"""The compile audit (``python -m manualbp.kernels.audit``): its rules, its coverage of the
shipped configs, its signatures against Triton's own specialisation, and a few real compiles.

The audit records the launchers' launches and compiles real sm_80/sm_90 code with Triton's
bundled toolchain, so it needs no GPU, but it must not run under the CPU interpreter: whatever
derives jobs or compiles runs in a subprocess (``tests/kernels/_audit.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from manualbp.kernels import _host, linear
from manualbp.kernels._matmul import configs_for
from manualbp.kernels._matmul_hopper import hopper_configs_for

from tests.kernels._audit import ROOT, audit_jobs, config_shape, run_audit, run_python, shape

VARIANTS = ((torch.float16, "ieee", "fp16"), (torch.bfloat16, "ieee", "bf16"),
            (torch.float32, "ieee", "fp32"), (torch.float32, "tf32", "tf32"),
            (torch.float64, "ieee", "fp64"))  # fmt: skip


def test_audit_rejects_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "manualbp.kernels.audit", "--quick"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
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


def test_specialisation_rules():
    """The launcher's specialisation, argument by argument (Triton's is compared below)."""
    from manualbp.kernels.audit import DIVISIBLE, specialise
    from triton.tools.tensor_descriptor import TensorDescriptor

    def spec(value, **flags):
        constexprs, attrs = {}, {}
        return specialise(value, (0,), constexprs, attrs, **flags), constexprs, attrs

    aligned, odd = torch.zeros(64, dtype=torch.bfloat16), torch.zeros(65)[1:]
    assert spec(aligned) == ("*bf16", {}, {(0,): DIVISIBLE})
    assert spec(odd) == ("*fp32", {}, {})
    assert spec(aligned, align=False) == ("*bf16", {}, {})
    assert spec(1) == ("constexpr", {(0,): 1}, {})
    assert spec(1, specialize=False) == ("i32", {}, {})
    assert spec(0) == spec(48) == ("i32", {}, {(0,): DIVISIBLE})
    assert spec(48, specialize=False) == spec(7) == ("i32", {}, {})
    assert spec(2**40)[0] == "i64" and spec(2**63)[0] == "u64"
    assert spec(0.5) == ("fp32", {}, {}) and spec(True) == ("u1", {}, {})
    assert spec(None) == ("constexpr", {(0,): None}, {})
    desc = TensorDescriptor(torch.zeros(64, 64, dtype=torch.float16), [64, 64], [64, 1], [32, 16])
    assert spec(desc)[0] == "tensordesc<fp16[32, 16]>"
    assert spec((aligned, odd)) == (("*bf16", "*fp32"), {}, {(0, 0): DIVISIBLE})


def test_derived_signatures_are_tritons():
    """Every recorded launch's job (every case, dtype and arch) has the signature, constexprs,
    divisibility and options that Triton's own launcher binds it to (its binder and
    ``_pack_args``, the same in Triton 3.6 and 3.9), for the sm_80 and sm_90 backends."""
    pytest.importorskip("triton.backends.nvidia")
    code = """
import json
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from manualbp.kernels import audit

checked, kernels = 0, set()
for arch in audit.ARCHS:
    backend = make_backend(GPUTarget("cuda", arch, 32))
    for variant in audit.VARIANTS:
        for case, launch in audit.record(arch, variant):
            fn = launch.kernel
            job = audit.job_of(launch, arch, variant.name, case)
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, spec, opts = binder(*launch.args, **launch.kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, dict(launch.kwargs),
                                                                  bound, spec, opts)
            mine = {(fn.arg_names.index(k),) if isinstance(k, str) else k: v
                    for k, v in job.constexprs.items()}
            where = (fn.__name__, case, variant.name, arch)
            assert job.signature == signature, (where, job.signature, signature)
            assert mine == constexprs, (where, mine, constexprs)
            assert job.attrs == {k: v for k, v in attrs.items() if v}, (where, job.attrs, attrs)
            for k, v in job.options.items():
                assert getattr(options, k) == v, (where, k)
            checked += 1
            kernels.add(job.kernel)
print(json.dumps([checked, sorted(kernels)]))
"""
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checked, kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert checked > 1000 and len(kernels) == 19, (checked, kernels)


def test_every_shipped_gemm_config_is_audited():
    """Each tuned GEMM is compiled in every config it is tuned over, for every dtype variant
    and architecture; the split-K partial in its one config."""
    from manualbp.kernels._splitk import splitk_config_for
    from manualbp.kernels.linear import chain_configs

    jobs = audit_jobs()
    for arch in (80, 90):
        for dtype, precision, name in VARIANTS:
            mine = [j for j in jobs if (j["arch"], j["dtype"]) == (arch, name)]

            def audited(kernel, mine=mine):
                return {shape(j) for j in mine if j["kernel"] == kernel}

            def shipped(cfgs):
                return {config_shape(c) for c in cfgs}

            hopper = set() if arch < 90 else shipped(
                hopper_configs_for(arch, dtype, precision, epilogue=False)
                + hopper_configs_for(arch, dtype, precision, epilogue=True))  # fmt: skip
            assert audited("matmul_tma") == hopper, (arch, name)
            plain = shipped(configs_for(arch, dtype, precision))
            # Accumulating on tensor cores takes the epilogue tiles (dW +=; on sm_90 fp16/bf16's
            # take the TMA path, TF32's MN-major operands do not).
            if name == "tf32" or (name in ("fp16", "bf16") and arch < 90):
                plain |= shipped(configs_for(arch, dtype, precision, epilogue=True))
            assert audited("matmul") == plain, (arch, name)
            epilogue = shipped(configs_for(arch, dtype, precision, epilogue=True))
            assert audited("linear_forward") == epilogue, (arch, name)
            assert audited("chain_grad") == shipped(chain_configs(arch, dtype, precision))
            assert audited("splitk_partial") == shipped([splitk_config_for(arch, dtype, precision)])


def test_every_hopper_layout_is_audited():
    """The Hopper path on sm_90 only, with TMA required, in every operand layout its launcher
    takes: dX (both row-major), dW (A read through its transpose) and the forward (B = W^T)
    for fp16/bf16; TF32 takes K-major operands only, so only the forward."""
    jobs = [j for j in audit_jobs() if j["kernel"] == "matmul_tma"]
    assert jobs and all(j["arch"] == 90 and j["tma"] and j["wgmma"] for j in jobs)
    for name, layouts in (("fp16", {(False, False), (True, False), (False, True)}),
                          ("bf16", {(False, False), (True, False), (False, True)}),
                          ("tf32", {(False, True)})):  # fmt: skip
        mine = [j["constexprs"] for j in jobs if j["dtype"] == name]
        assert {(c["A_T"], c["B_T"]) for c in mine} == layouts, name
        assert {c["ACTIVATION"] for c in mine} == {"none", "gelu", "gelu_tanh"}
        assert any(c["ACCUMULATE"] for c in mine) == (name != "tf32")  # grad_accumulate's dW


def test_mse_and_sgd_kernels_are_audited():
    from manualbp.kernels import mse, sgd

    names = {"mse_fwd", "mse_bwd", "grad_scale", "sgd"}
    jobs = audit_jobs()
    for arch in (80, 90):
        for dtype in ("fp16", "bf16", "fp32", "fp64"):
            built = {j["kernel"] for j in jobs if j["arch"] == arch and j["dtype"] == dtype}
            assert names <= built, (arch, dtype, built)
            mine = [j for j in jobs if (j["arch"], j["dtype"]) == (arch, dtype)]
            sgd_jobs = [j for j in mine if j["kernel"] == "sgd"]
            assert len(sgd_jobs) == 5
            assert {j["need_v128"] for j in sgd_jobs} == {True, False}  # the unaligned one

    def shipped(j):  # the shipped CUDA launch configs, not the interpreter's
        if j["kernel"] == "mse_fwd":  # the launcher picks by layout: see mse.launch_config
            dtype = torch.float64 if j["dtype"] == "fp64" else None
            return mse.launch_config("fwd", j["constexprs"]["NDIM"], cuda=True, dtype=dtype)
        if j["kernel"] == "sgd":
            return sgd.launch_config(cuda=True)
        kind = "scale" if j["kernel"] == "grad_scale" else "elementwise"
        return mse.launch_config(
            kind, cuda=True, dtype=torch.float64 if j["dtype"] == "fp64" else None
        )

    mine = [j for j in jobs if j["kernel"] in names]
    for j in mine:
        cfg = shipped(j)
        assert (j["constexprs"]["BLOCK"], j["options"]["num_warps"]) == (
            cfg["BLOCK"],
            cfg["num_warps"],
        )
        assert j["vector"] and not j["wgmma"]
        # 128-bit loads required exactly of contiguous, aligned operands
        assert j["need_v128"] == ("contig" in j["config"] or (j["kernel"] == "sgd" and
                                  "unaligned" not in j["config"])), j["config"]  # fmt: skip
    fwd = {(j["constexprs"]["REDUCE"], j["constexprs"]["COMPUTE_GRAD"], j["constexprs"]["NDIM"])
           for j in mine if j["kernel"] == "mse_fwd"}  # fmt: skip
    assert fwd == {(True, True, 1), (True, True, 2), (True, True, 4), (True, False, 1),
                   (False, False, 1), (False, False, 4)}  # fmt: skip
    quick = audit_jobs("--quick", "--kernel", "sgd")
    assert quick and {j["kernel"] for j in quick} == {"sgd"}


def test_fused_mlp_is_audited_at_every_shipped_width():
    from manualbp.kernels import fused_mlp

    jobs = audit_jobs()
    for arch in (80, 90):
        for dtype, precision, name in VARIANTS:
            mine = [j for j in jobs if j["arch"] == arch and j["dtype"] == name]
            widths = set(fused_mlp.shipped_widths(arch, dtype, precision))
            for kernel in ("mlp_forward", "mlp_backward", "mlp_wgrad"):
                assert {j["constexprs"]["WIDTH"] for j in mine if j["kernel"] == kernel} == widths
            # The reduction has no tl.dot: TF32's is fp32's where both ship the width.
            reduce = {j["constexprs"]["WIDTH"] for j in jobs if j["kernel"] == "mlp_wgrad_reduce"
                      and j["arch"] == arch and j["dtype"] in (name, "fp32")}  # fmt: skip
            assert reduce >= widths, (arch, name)
            fwd = {j["constexprs"]["LOSS"] for j in mine if j["kernel"] == "mlp_forward"}
            bwd = {j["constexprs"]["G_MODE"] for j in mine if j["kernel"] == "mlp_backward"}
            if name != "fp64":
                assert fwd == {"none", *fused_mlp.LOSS_MODES} and bwd == {"grad", "mse"}


def test_quick_audit_gemm_uses_wgmma_on_hopper():
    """The pointer GEMM kernel on sm_90 (where TMA does not apply): wgmma for fp16/bf16."""
    pytest.importorskip("triton.backends.nvidia")
    proc = run_audit("--quick", "--arch", "90", "--kernel", "linear_forward", "-j", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("linear_forward ")]
    # Columns from the right: status, wgmma, smem, spill bytes, regs, dtype.
    assert {r[-6] for r in rows} == {"fp16", "bf16", "fp32"}, proc.stdout
    for r in rows:
        assert r[-1] == "OK" and r[-4] == "0", r
        assert r[-2] == ("yes" if r[-6] in ("fp16", "bf16") else "no"), r


def test_quick_audit_mse_and_sgd_compile_without_spills():
    pytest.importorskip("triton.backends.nvidia")
    proc = run_audit("--quick", "--arch", "80", "--kernel", "mse_fwd,sgd", "-j", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [
        line.split() for line in proc.stdout.splitlines() if line.startswith(("mse_fwd ", "sgd "))
    ]
    assert {r[0] for r in rows} == {"mse_fwd", "sgd"}, proc.stdout
    for r in rows:
        # Columns from the right: status, wgmma, smem, spill bytes, regs.
        assert r[-1] == "OK" and r[-4] == "0", r


@pytest.mark.slow
def test_tuned_tma_launch_precompiles_every_candidate_with_its_boxes():
    """A tuned Hopper launch (bf16 forward, GELU, stored z, sm_90 with 132 SMs) records one
    launch per shipped config, exactly ``hopper_configs_for``'s, each with descriptors on the
    call's own tensors in that config's boxes; each compiles (the audit's compile-only path, in
    a subprocess) with TMA loads and stores, wgmma and no spills."""
    x, w, b = (torch.zeros(s, dtype=torch.bfloat16) for s in ((256, 64), (128, 64), (128,)))
    with _host.simulate(90, 132), _host.record() as entries, linear.force("triton"):
        y, z = linear.forward(x, w, b, "gelu", store_preact=True)
    launches = [e for e in entries if isinstance(e, _host.Launch)]
    configs = hopper_configs_for(90, torch.bfloat16, "ieee", epilogue=True)
    assert len(configs) >= 2 and len(launches) == len(configs)
    for launch, cfg in zip(launches, configs, strict=True):
        assert launch.name == "matmul_tma_kernel" and launch.candidates == configs
        assert {k: launch.kwargs[k] for k in cfg} == cfg
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        a, bt, c, zd = launch.args[:4]
        for desc, base, box in ((a, x, [bm, bk]), (bt, w, [bn, bk]), (c, y, [bm, bn // 2]),
                                (zd, z, [bm, bn // 2])):  # fmt: skip
            assert list(desc.block_shape) == box and desc.base.data_ptr() == base.data_ptr()
    code = """
import json, torch
from manualbp.kernels import _host, audit, linear
x, w, b = (torch.zeros(s, dtype=torch.bfloat16) for s in ((256, 64), (128, 64), (128,)))
with _host.simulate(90, 132), _host.record() as entries, linear.force("triton"):
    linear.forward(x, w, b, "gelu", store_preact=True)
rows = [audit.compile_job(audit.job_of(e, 90, "bf16", "fwd gelu")) for e in entries
        if isinstance(e, _host.Launch)]
print(json.dumps([dict(r, problems=audit.problems(r)) for r in rows]))
"""
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == len(configs)
    for r in rows:
        assert r["problems"] == [] and r["spills"] == 0 and r["wgmma"], r
        assert r["ptx_bulk"] > 0 and r["tma_ld"] > 0 and r["tma_st"] > 0, r
