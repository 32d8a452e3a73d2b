"""Compile audit: build every kernel in every shipped config for sm_80 and sm_90, no GPU needed.

Usage::

    python -m triton_kernels.audit [--quick] [--arch 80,90] [--kernel NAME[,NAME]] [-j N]

For each (kernel, config, arch, dtype) it compiles the kernel to a cubin with Triton's own
toolchain (``triton.compile`` on an ``ASTSource`` for a ``GPUTarget``), reads the register count
and spill bytes from ``ptxas -v`` (the ptxas bundled with Triton), the shared memory from the
compiled metadata, and, on sm_90, whether the GEMM main loop uses wgmma (``HGMMA`` in the SASS
from ``cuobjdump -sass``). It prints a table and exits non-zero if any compile fails, any
kernel spills, a config needs more shared memory than the architecture has, or a Hopper
fp16/bf16 GEMM does not use wgmma.

The specialisation compiled is the common one (contiguous row-major operands, sizes multiple
of 16): unit strides are constexpr 1 and pointers / other strides / sizes divisible by 16,
which is what Triton's launcher would pick for such tensors.

Besides the Linear kernels (``linear_forward``, ``matmul``, ``act_grad``, ``bias_grad``, dW's
split-K ``splitk_partial`` / ``splitk_reduce`` and the cross-layer ``chain_grad``) it
covers the MSE kernels of ``triton_kernels.mse`` (``mse_fwd``, ``mse_bwd``, ``mse_scale``; each
contiguous with 16-byte aligned pointers, and as a general 4-d strided view; ``mse_fwd`` also
contiguous but unaligned) and the multi-tensor SGD kernel of ``triton_kernels.sgd`` (``sgd``, in
its main constexpr combinations, aligned, plus one unaligned), in their shipped CUDA launch
configs. Those are bandwidth-bound elementwise / reduction kernels: no wgmma requirement, but a
vector-width report: the widest ``ld.global`` / ``st.global`` in each one's PTX (``v4.b32`` and
``v2.b64``: 128 bits), printed after the table; the audit fails when a contiguous, aligned case
has no 128-bit load.

The fused-MLP kernels of ``triton_kernels.fused_mlp`` (``mlp_fwd``, ``mlp_bwd``, ``mlp_wgrad``,
``mlp_reduce``, ``mlp_loss_reduce``) are compiled for 4 layers at every WIDTH their config
tables ship, erf-GELU hidden layers (the heaviest epilogue), fp16, bf16, TF32 and IEEE fp32;
``mlp_fwd`` / ``mlp_bwd`` also with the MSE loss folded in (rows labelled ``mse:<mode>``, the
mode training uses for the dtype); wgmma is required of the fp16/bf16/TF32 row-tile kernels and
of the weight-gradient blocks of 64 rows.

The Hopper GEMM path (``triton_kernels._matmul_hopper``: persistent grid, TMA descriptors) is
compiled for sm_90 only, every shipped config (fp16, bf16, TF32), ``matmul_tma`` with dX's
operand layout and ``linear_forward_tma`` with bias, stored pre-activation and erf-GELU, plus
the first config with dW's (A read through its transpose) and the forward's (B = W^T, bias)
layouts. Each row must show TMA (``cp.async.bulk.tensor`` in the PTX, ``UTMALDG`` and
``UTMASTG`` in the SASS) and wgmma (``HGMMA``); a TMA report follows the table.

The elementwise forward pass that follows a cuBLAS GEMM (``linear_epilogue``, of
``triton_kernels.linear_epilogue``) is compiled with a bias, a stored pre-activation and each
activation, contiguous and aligned: it gets the vector-width report and must load 128 bits.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from manualbp.activations import ACTIVATIONS as REGISTRY

from . import fused_mlp as _mlp
from . import mse as _mse
from . import sgd as _sgd
from ._host import interpreting
from ._matmul import configs_for, matmul_kernel, smem_limit
from ._matmul_hopper import hopper_configs_for, matmul_tma_kernel
from ._splitk import REDUCE_CONFIGS as SPLITK_REDUCE_CONFIGS
from ._splitk import splitk_config_for, splitk_partial_kernel, splitk_reduce_kernel
from .linear_backward import (
    ELEMENTWISE_CONFIGS,
    act_grad_kernel,
    bias_grad_kernel,
    chain_configs,
    chain_grad_kernel,
)
from .linear_epilogue import EPILOGUE_CONFIGS, linear_epilogue_kernel
from .linear_forward import linear_forward_kernel

ARCHS = (80, 90)
# (dtype, tl.dot input precision) pairs compiled for the GEMMs: fp32 in both the IEEE mode
# (torch's default "highest" float32 matmul precision) and TF32 ("high"/"medium").
GEMM_VARIANTS = (
    (torch.float16, "ieee"),
    (torch.bfloat16, "ieee"),
    (torch.float32, "ieee"),
    (torch.float32, "tf32"),
    (torch.float64, "ieee"),
)
TL_NAME = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}
_NV_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass
class Job:
    """One compile: kernel name, arch, dtype, config and the ASTSource description."""

    kernel: str
    arch: int
    dtype: str
    config: str
    types: dict[str, str]
    constexprs: dict[str, Any]
    div16: set[str]
    num_warps: int
    num_stages: int
    gemm: bool = False
    fields: dict[str, Any] = field(default_factory=dict)


_KERNELS = {
    "linear_forward": linear_forward_kernel,
    "matmul": matmul_kernel,
    "matmul_tma": matmul_tma_kernel,
    "linear_forward_tma": matmul_tma_kernel,
    "act_grad": act_grad_kernel,
    "bias_grad": bias_grad_kernel,
    "linear_epilogue": linear_epilogue_kernel,
    "splitk_partial": splitk_partial_kernel,
    "splitk_reduce": splitk_reduce_kernel,
    "chain_grad": chain_grad_kernel,
    "mse_fwd": _mse._mse_fwd_kernel,
    "mse_bwd": _mse._mse_bwd_kernel,
    "mse_scale": _mse._grad_scale_kernel,
    "sgd": _sgd._sgd_kernel,
    "mlp_fwd": _mlp.mlp_forward_kernel,
    "mlp_bwd": _mlp.mlp_backward_kernel,
    "mlp_wgrad": _mlp.mlp_wgrad_kernel,
    "mlp_reduce": _mlp.mlp_wgrad_reduce_kernel,
    "mlp_loss_reduce": _mlp.mlp_loss_reduce_kernel,
}
_MSE_KERNELS = ("mse_fwd", "mse_bwd", "mse_scale")
# Bandwidth-bound kernels: their rows carry the vector-width report (see vector_widths).
VECTOR_KERNELS = (*_MSE_KERNELS, "sgd")


def _cfg_name(cfg: dict[str, int]) -> str:
    return (
        f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} g{cfg['GROUP_M']} "
        f"w{cfg['num_warps']} s{cfg['num_stages']}"
    )


def _gemm_jobs(
    arch: int, dtype: torch.dtype, precision: str, quick: bool, kernels: set[str]
) -> list[Job]:
    dname = "tf32" if precision == "tf32" else TL_NAME[dtype]
    jobs = []
    for kernel in ("linear_forward", "matmul"):
        if kernel not in kernels:
            continue
        cfgs = configs_for(arch, dtype, precision, epilogue=kernel == "linear_forward")
        for cfg in cfgs[:1] if quick else cfgs:
            jobs += _gemm_job(kernel, arch, dtype, dname, precision, cfg)
    return jobs


def _gemm_job(
    kernel: str, arch: int, dtype: torch.dtype, dname: str, precision: str, cfg: dict[str, int]
) -> list[Job]:
    t = TL_NAME[dtype]
    blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    common = dict(ACC_FP64=dtype == torch.float64, INPUT_PRECISION=precision, **blocks)
    warps, stages = cfg["num_warps"], cfg["num_stages"]
    if kernel == "matmul":
        # dX = dZ @ W: A (M, N) row-major, B = W (N, K) row-major, C row-major.
        types = {
            "a_ptr": f"*{t}",
            "b_ptr": f"*{t}",
            "c_ptr": f"*{t}",
            "M": "i32",
            "N": "i32",
            "K": "i32",
            "stride_am": "i32",
            "stride_bk": "i32",
            "stride_cm": "i32",
        }
        const = dict(stride_ak=1, stride_bn=1, stride_cn=1, **common)
        div16 = set(types)
        return [
            Job(
                "matmul", arch, dname, _cfg_name(cfg), types, const, div16, warps, stages, gemm=True
            )
        ]
    # linear_forward: the heaviest epilogues, bias + stored pre-activation + erf-GELU or
    # tanh-GELU (the other activations need fewer registers).
    types = {
        "x_ptr": f"*{t}",
        "w_ptr": f"*{t}",
        "b_ptr": f"*{t}",
        "y_ptr": f"*{t}",
        "z_ptr": f"*{t}",
        "negative_slope": "fp64",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "stride_xm": "i32",
        "stride_wn": "i32",
        "stride_ym": "i32",
        "stride_zm": "i32",
    }
    div16 = set(types) - {"negative_slope"}
    jobs = []
    for act in ("gelu", "gelu_tanh"):
        const = dict(
            stride_xk=1,
            stride_wk=1,
            stride_b=1,
            stride_yn=1,
            stride_zn=1,
            HAS_BIAS=True,
            ACTIVATION=act,
            STORE_PREACT=True,
            **common,
        )
        jobs.append(
            Job(
                "linear_forward",
                arch,
                dname,
                f"{_cfg_name(cfg)} {act}",
                types,
                const,
                div16,
                warps,
                stages,
                gemm=True,
            )
        )
    return jobs


def _splitk_chain_jobs(
    arch: int, dtype: torch.dtype, precision: str, quick: bool, kernels: set[str]
) -> list[Job]:
    """dW's split-K kernels (``triton_kernels._splitk``) with dW's operands: A = dZ^T, an
    M-major view (``stride_am`` 1), B = X row-major; and the cross-layer chain GEMM
    (``linear_backward.chain_grad_kernel``: dZ @ W, row-major, with the lower layer's erf-GELU
    or tanh-GELU gradient and bias partials in its epilogue) in every epilogue config."""
    t, acc = TL_NAME[dtype], ("fp64" if dtype == torch.float64 else "fp32")
    dname = "tf32" if precision == "tf32" else t
    fp64 = dtype == torch.float64
    jobs = []
    if "splitk_partial" in kernels:
        cfg = splitk_config_for(arch, dtype, precision)
        blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        types = dict(a_ptr=f"*{t}", b_ptr=f"*{t}", ws_ptr=f"*{acc}", M="i32", N="i32", K="i32",
                     CHUNK="i32", stride_ak="i32", stride_bk="i32")  # fmt: skip
        const = dict(stride_am=1, stride_bn=1, ACC_FP64=fp64, INPUT_PRECISION=precision, **blocks)
        jobs.append(Job("splitk_partial", arch, dname, f"{_cfg_name(cfg)} dW", types, const,
                        set(types), cfg["num_warps"], cfg["num_stages"], gemm=True))  # fmt: skip
    if "splitk_reduce" in kernels and precision == "ieee":
        cfg = SPLITK_REDUCE_CONFIGS["cuda"]
        types = dict(ws_ptr=f"*{acc}", c_ptr=f"*{t}", S="i32", M="i32", N="i32", stride_cm="i32")
        const = dict(stride_cn=1, ACC_FP64=fp64, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
        name = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']}"
        jobs.append(Job("splitk_reduce", arch, t, name, types, const, set(types) - {"S"},
                        cfg["num_warps"], 1, fields=_vector_fields("contig")))  # fmt: skip
    if "chain_grad" in kernels:
        cfgs = chain_configs(arch, dtype, precision)
        types = dict(a_ptr=f"*{t}", b_ptr=f"*{t}", s_ptr=f"*{t}", dz_ptr=f"*{t}",
                     part_ptr=f"*{acc}", negative_slope="fp64", M="i32", N="i32", K="i32",
                     stride_am="i32", stride_bk="i32", stride_sm="i32",
                     stride_dzm="i32")  # fmt: skip
        for cfg in cfgs[:1] if quick else cfgs:
            blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
            for act in ("gelu", "gelu_tanh"):
                const = dict(stride_ak=1, stride_bn=1, stride_sn=1, stride_dzn=1, ACTIVATION=act,
                             COMPUTE_DB=True, ACC_FP64=fp64, INPUT_PRECISION=precision,
                             **blocks)  # fmt: skip
                jobs.append(Job("chain_grad", arch, dname, f"{_cfg_name(cfg)} {act}", types,
                                const, set(types) - {"negative_slope"}, cfg["num_warps"],
                                cfg["num_stages"], gemm=True))  # fmt: skip
    return jobs


def _epilogue_jobs(arch: int, dtype: torch.dtype, quick: bool) -> list[Job]:
    """The cuBLAS candidate's elementwise forward pass (``linear_epilogue``) in its shipped CUDA
    config: bias, stored pre-activation and each activation (quick: erf-GELU), contiguous and
    16-byte aligned, so a 128-bit vector load is required."""
    t = TL_NAME[dtype]
    cfg = EPILOGUE_CONFIGS["cuda_fp64" if dtype == torch.float64 else "cuda"]
    types = dict(acc_ptr=f"*{t}", b_ptr=f"*{t}", y_ptr=f"*{t}", z_ptr=f"*{t}",
                 negative_slope="fp64", M="i32", N="i32", stride_am="i32", stride_ym="i32",
                 stride_zm="i32")  # fmt: skip
    jobs = []
    for act in ["gelu"] if quick else ["none", *REGISTRY]:
        const = dict(stride_an=1, stride_b=1, stride_yn=1, stride_zn=1, HAS_BIAS=True,
                     ACTIVATION=act, STORE_PREACT=True, ACC_FP64=dtype == torch.float64,
                     BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])  # fmt: skip
        name = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']} {act}"
        jobs.append(Job("linear_epilogue", arch, t, name, types, const,
                        set(types) - {"negative_slope"}, cfg["num_warps"], 1,
                        fields=_vector_fields("contig")))  # fmt: skip
    return jobs


# The persistent grid the audit compiles for: an H100 / H200 SXM's SM count (NUM_SMS is a
# constexpr of the Hopper kernel; the launcher passes the device's).
HOPPER_NUM_SMS = 132
# Operand layouts of the Hopper GEMM: (name, A_T, B_T, HAS_BIAS). dX = dZ @ W: both
# row-major; dW = dZ^T @ X: A read through its transpose; the forward x @ W^T: B = W^T.
_TMA_LAYOUTS = (("dX", False, False, False), ("dW", True, False, False),
                ("fwd+bias", False, True, True))  # fmt: skip


def _hopper_job(
    kernel: str, arch: int, dtype: torch.dtype, dname: str, precision: str,
    cfg: dict[str, Any], layout: tuple[str, bool, bool, bool], act: str,
) -> Job:  # fmt: skip
    """One compile of ``matmul_tma_kernel``: descriptors typed with the config's TMA boxes."""
    t = TL_NAME[dtype]
    name, a_t, b_t, bias = layout
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    out = f"tensordesc<{t}[{bm}, {bn // 2}]>"
    types = dict(
        a_desc=f"tensordesc<{t}[{bk}, {bm}]>" if a_t else f"tensordesc<{t}[{bm}, {bk}]>",
        b_desc=f"tensordesc<{t}[{bn}, {bk}]>" if b_t else f"tensordesc<{t}[{bk}, {bn}]>",
        c_desc=out, z_desc=out, bias_ptr=f"*{t}", negative_slope="fp64", M="i32", N="i32",
        K="i32",
    )  # fmt: skip
    blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "WARP_SPECIALIZE")}
    const = dict(stride_bias=1, HAS_BIAS=bias, ACTIVATION=act, STORE_PREACT=act != "none",
                 A_T=a_t, B_T=b_t, INPUT_PRECISION=precision, NUM_SMS=HOPPER_NUM_SMS,
                 **blocks)  # fmt: skip
    label = f"{_cfg_name(cfg)} {name if act == 'none' else act}"
    return Job(kernel, arch, dname, label, types, const, {"bias_ptr", "M", "N", "K"},
               cfg["num_warps"], cfg["num_stages"], gemm=True, fields=dict(tma=True))  # fmt: skip


def _hopper_jobs(
    arch: int, dtype: torch.dtype, precision: str, quick: bool, kernels: set[str]
) -> list[Job]:
    """The Hopper GEMM path on sm_90+: every shipped config (quick: the first) of
    ``matmul_tma`` (dX's layout; the first config also dW's and the forward's) and of
    ``linear_forward_tma`` (bias, stored pre-activation, erf-GELU: the heaviest epilogue)."""
    if arch < 90 or dtype == torch.float64 or (dtype == torch.float32 and precision != "tf32"):
        return []
    dname = "tf32" if precision == "tf32" else TL_NAME[dtype]
    jobs = []
    if "matmul_tma" in kernels:
        cfgs = hopper_configs_for(arch, dtype, precision, epilogue=False)
        for i, cfg in enumerate(cfgs[:1] if quick else cfgs):
            for layout in _TMA_LAYOUTS if i == 0 else _TMA_LAYOUTS[:1]:
                jobs.append(_hopper_job("matmul_tma", arch, dtype, dname, precision, cfg,
                                        layout, "none"))  # fmt: skip
    if "linear_forward_tma" in kernels:
        cfgs = hopper_configs_for(arch, dtype, precision, epilogue=True)
        for cfg in cfgs[:1] if quick else cfgs:
            jobs.append(_hopper_job("linear_forward_tma", arch, dtype, dname, precision, cfg,
                                    _TMA_LAYOUTS[2], "gelu"))  # fmt: skip
    return jobs


def _elementwise_jobs(arch: int, dtype: torch.dtype, quick: bool, kernels: set[str]) -> list[Job]:
    t = TL_NAME[dtype]
    fp64 = dtype == torch.float64
    cfg = ELEMENTWISE_CONFIGS["cuda_fp64" if fp64 else "cuda"]
    acc = "fp64" if fp64 else "fp32"
    jobs = []
    if "act_grad" in kernels:
        acts = ["gelu"] if quick else list(REGISTRY)
        for act in acts:
            types = {
                "g_ptr": f"*{t}",
                "s_ptr": f"*{t}",
                "dz_ptr": f"*{t}",
                "part_ptr": f"*{acc}",
                "negative_slope": "fp64",
                "M": "i32",
                "N": "i32",
                "stride_gm": "i32",
                "stride_sm": "i32",
                "stride_dzm": "i32",
            }
            const = dict(
                stride_gn=1,
                stride_sn=1,
                stride_dzn=1,
                ACTIVATION=act,
                STORE_DZ=True,
                COMPUTE_DB=True,
                ACC_FP64=fp64,
                BLOCK_M=cfg["BLOCK_M"],
                BLOCK_N=cfg["BLOCK_N"],
                ROW_STEPS=cfg["ROW_STEPS"],
            )
            div16 = {
                "g_ptr",
                "s_ptr",
                "dz_ptr",
                "part_ptr",
                "M",
                "N",
                "stride_gm",
                "stride_sm",
                "stride_dzm",
            }
            name = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['ROW_STEPS']} w{cfg['num_warps']} {act}"
            jobs.append(Job("act_grad", arch, t, name, types, const, div16, cfg["num_warps"], 1))
    if "bias_grad" in kernels:
        types = {"part_ptr": f"*{acc}", "db_ptr": f"*{t}", "R": "i32", "N": "i32"}
        const = dict(stride_db=1, BLOCK_R=cfg["BLOCK_R"], BLOCK_N=cfg["BLOCK_N"], ACC_FP64=fp64)
        div16 = {"part_ptr", "db_ptr", "N"}
        name = f"{cfg['BLOCK_R']}x{cfg['BLOCK_N']} w{cfg['num_warps']}"
        jobs.append(Job("bias_grad", arch, t, name, types, const, div16, cfg["num_warps"], 1))
    return jobs


# Merged dims of each MSE layout the audit compiles.
_MSE_NDIM = {"contig": 1, "unaligned": 1, "ndim2": 2, "ndim4": 4}


def _strided_args(prefix: str, layout: str) -> tuple[dict[str, str], dict[str, Any], set[str]]:
    """Types, constexprs and div16 set for one operand's strides ``{prefix}0..3`` of the MSE
    kernels' 4-d layout: contiguous (coalesced to one dim: strides ``0, 0, 0, 1``) or a strided
    view of ``ndim`` dims (padding strides 0, the others plain i32, nothing specialised)."""
    names = [f"{prefix}{i}" for i in range(4)]
    if layout in ("contig", "unaligned"):
        return {n: "i32" for n in names[:3]}, {names[3]: 1}, set(names[:3])
    return {n: "i32" for n in names}, {}, set(names[: 4 - _MSE_NDIM[layout]])


def _mse_layout(layout: str, *prefixes: str) -> tuple[dict[str, str], dict[str, Any], set[str]]:
    """Sizes ``S1..S3``, the strides of ``prefixes`` and ``NDIM``/``CONTIG`` for the MSE kernels.

    ``"contig"`` / ``"unaligned"``: the launcher coalesces to ``NDIM=1``, sizes ``1, 1, N``
    (``N`` arbitrary: the full-block path must not rely on it), unit strides constexpr 1 (what
    Triton's launcher specialises), ``CONTIG=True``. ``"ndim2"`` (e.g. a broadcast row) and
    ``"ndim4"`` (the heaviest indexing: three int64 div/mod per element): the used sizes and
    strides plain i32, the padding sizes constexpr 1, every access masked.
    """
    ndim = _MSE_NDIM[layout]
    sizes = ["S1", "S2", "S3"]
    types = {s: "i32" for s in sizes[3 - ndim :]}
    const: dict[str, Any] = {s: 1 for s in sizes[: 3 - ndim]}
    div16: set[str] = set()
    for prefix in prefixes:
        t, c, d = _strided_args(prefix, layout)
        types.update(t)
        const.update(c)
        div16 |= d
    const.update(NDIM=ndim, CONTIG=ndim == 1)
    return types, const, div16


def _vector_fields(layout: str) -> dict[str, Any]:
    """Job fields asking for the vector-width report; a contiguous, aligned layout must show a
    128-bit load."""
    return dict(vector=True, need_v128=layout == "contig")


def _mse_jobs(arch: int, dtype: torch.dtype, quick: bool, kernels: set[str]) -> list[Job]:
    """The MSE kernels of ``triton_kernels.mse`` in their shipped CUDA configs."""
    t = TL_NAME[dtype]
    acc_name = "fp64" if dtype == torch.float64 else "fp32"
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    jobs = []
    if "mse_fwd" in kernels:
        # (REDUCE, MEAN, COMPUTE_GRAD, layout); quick: the fused loss + gradient only.
        variants = [(True, True, True, "contig")]
        if not quick:
            variants += [
                (True, True, True, "unaligned"),
                (True, True, True, "ndim2"),
                (True, True, True, "ndim4"),
                (True, True, False, "contig"),
                (False, False, False, "contig"),
                (False, False, False, "ndim4"),
            ]
        for reduce, mean, grad, layout in variants:
            lay_t, lay_c, lay_d = _mse_layout(layout, "xs", "ts")
            cfg = _mse.launch_config("fwd", lay_c["NDIM"], cuda=True)  # the launcher's choice
            # Without a reduction the launcher passes ``out`` for the partials and the counter.
            part, count = (f"*{acc_name}", "*i32") if reduce else (f"*{t}", f"*{t}")
            types = {
                "x_ptr": f"*{t}",
                "t_ptr": f"*{t}",
                "out_ptr": f"*{t}",
                "grad_ptr": f"*{t}",
                "part_ptr": part,
                "count_ptr": count,
                "N": "i32",  # do_not_specialize
                **lay_t,
            }
            const = dict(
                REDUCE=reduce, MEAN=mean, COMPUTE_GRAD=grad, ACC=acc, BLOCK=cfg["BLOCK"],
                RBLOCK=cfg["RBLOCK"], **lay_c,
            )  # fmt: skip
            # Triton marks 16-byte aligned pointers; of an unaligned view's, only the ones the
            # launcher allocates.
            ptrs = ("x_ptr", "t_ptr", "out_ptr", "grad_ptr", "part_ptr", "count_ptr")
            div16 = set(ptrs[2:] if layout == "unaligned" else ptrs) | lay_d
            what = ("mean+grad" if grad else "mean") if reduce else "none"
            name = f"{cfg['BLOCK']} w{cfg['num_warps']} {what} {layout}"
            jobs.append(Job("mse_fwd", arch, t, name, types, const, div16, cfg["num_warps"], 3,
                            fields=_vector_fields(layout)))  # fmt: skip
    cfg = _mse.launch_config("elementwise", cuda=True)
    block, warps = cfg["BLOCK"], cfg["num_warps"]
    if "mse_bwd" in kernels:
        # (GO_SCALAR, MEAN, layout): "mean" (scalar grad_output) and "none" (grad_output of the
        # input's shape).
        variants = [(True, True, "contig")]
        if not quick:
            variants += [(False, False, "contig"), (False, False, "ndim4")]
        for scalar, mean, layout in variants:
            lay_t, lay_c, lay_d = _mse_layout(layout, "gs", "xs", "ts")
            if scalar:  # the launcher passes grad_output strides 0, 0, 0, 0
                for i in range(4):
                    lay_c.pop(f"gs{i}", None)
                    lay_t[f"gs{i}"] = "i32"
                    lay_d.add(f"gs{i}")
            types = {
                "go_ptr": f"*{t}",
                "x_ptr": f"*{t}",
                "t_ptr": f"*{t}",
                "out_ptr": f"*{t}",
                "N": "i32",  # do_not_specialize
                **lay_t,
            }
            const = dict(GO_SCALAR=scalar, MEAN=mean, ACC=acc, BLOCK=block, **lay_c)
            div16 = {"go_ptr", "x_ptr", "t_ptr", "out_ptr"} | lay_d
            what = "mean" if scalar else "none"
            name = f"{block} w{warps} {what} {layout}"
            jobs.append(Job("mse_bwd", arch, t, name, types, const, div16, warps, 3,
                            fields=_vector_fields(layout)))  # fmt: skip
    if "mse_scale" in kernels:
        for layout in ("contig",) if quick else ("contig", "ndim4"):
            lay_t, lay_c, lay_d = _mse_layout(layout, "gs")
            types = {"g_ptr": f"*{t}", "go_ptr": f"*{t}", "N": "i32", **lay_t}
            const = dict(ACC=acc, BLOCK=block, **lay_c)
            div16 = {"g_ptr", "go_ptr"} | lay_d
            name = f"{block} w{warps} {layout}"
            jobs.append(Job("mse_scale", arch, t, name, types, const, div16, warps, 3,
                            fields=_vector_fields(layout)))  # fmt: skip
    return jobs


# SGD constexpr combinations compiled: (name, HAS_WD, HAS_MOMENTUM, NESTEROV, MAXIMIZE,
# LR_TENSOR, ALIGNED). The last aligned one switches every branch on (the heaviest); --quick
# compiles it alone. The unaligned one is what views at odd offsets get (scalar accesses).
SGD_VARIANTS = (
    ("plain", False, False, False, False, False, True),
    ("wd lr_tensor", True, False, False, False, True, True),
    ("momentum", False, True, False, False, False, True),
    ("nesterov wd maximize lr_tensor", True, True, True, True, True, True),
    ("nesterov wd maximize lr_tensor unaligned", True, True, True, True, True, False),
)


def _sgd_jobs(arch: int, dtype: torch.dtype, quick: bool) -> list[Job]:
    """The multi-tensor SGD kernel of ``triton_kernels.sgd`` in its shipped CUDA config."""
    t = TL_NAME[dtype]
    cfg = _sgd.launch_config(cuda=True)
    block, warps = cfg["BLOCK"], cfg["num_warps"]
    jobs = []
    for name, wd, mom, nesterov, maximize, lr_tensor, aligned in (
        SGD_VARIANTS[3:4] if quick else SGD_VARIANTS
    ):
        types = {
            "p_witness": f"*{t}",
            "rows_ptr": "*i64",
            "hp_ptr": "*fp64",
            # A tensor lr is moved to the device as is (typically fp32); else hp is passed.
            "lr_ptr": "*fp32" if lr_tensor else "*fp64",
        }
        const = dict(
            HAS_WD=wd, HAS_MOMENTUM=mom, NESTEROV=nesterov, MAXIMIZE=maximize,
            LR_TENSOR=lr_tensor, ALIGNED=aligned, BLOCK=block,
            COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
        )  # fmt: skip
        div16 = {"p_witness", "rows_ptr", "hp_ptr", "lr_ptr"}
        fields = _vector_fields("contig" if aligned else "unaligned")
        jobs.append(Job("sgd", arch, t, f"{block} w{warps} {name}", types, const, div16, warps, 3,
                        fields=fields))  # fmt: skip
    return jobs


# The fused MLP (``triton_kernels.fused_mlp``): 4 layers of WIDTH -> WIDTH (every width the
# shipped configs cover; the common, fully aligned specialisation), erf-GELU hidden layers (the
# heaviest activation: its z is stored, and recomputed by the weight-gradient kernel).
MLP_LAYERS = 4
MLP_WIDTHS = (16, 32, 64, 128)


def _mlp_types(t: str, acc: str) -> dict[str, dict[str, Any]]:
    """Argument types of each MLP kernel for MLP_LAYERS layers of dtype ``t``."""
    L, p = MLP_LAYERS, f"*{t}"
    layers, hidden = (p,) * L, (p,) * (L - 1)
    slopes = {"hidden_slope": "fp64", "out_slope": "fp64"}
    return {
        "mlp_fwd": dict(x_ptr=p, y_ptr=p, zo_ptr=p, ws=layers, bs=layers, ss=hidden, t_ptr=p,
                        lp_ptr=f"*{acc}", **slopes, M="i32", stride_xm="i32", numel="i32"),
        "mlp_bwd": dict(g_ptr=p, so_ptr=p, dx_ptr=p, ws=layers, ss=hidden, dzs=layers, gs_ptr=p,
                        t_ptr=p, **slopes, M="i32", stride_gm="i32", numel="i32"),
        "mlp_wgrad": dict(x_ptr=p, ss=hidden, dzs=layers, dws=layers, dbs=layers,
                          part_ptr=f"*{acc}", hidden_slope="fp64", M="i32", stride_xm="i32",
                          chunk="i32", S="i32"),
        "mlp_reduce": dict(part_ptr=f"*{acc}", dws=layers, dbs=layers, S="i32"),
        "mlp_loss_reduce": dict(lp_ptr=f"*{acc}", loss_ptr=p, T="i32", numel="i32"),
    }  # fmt: skip


def _mlp_jobs(
    arch: int, dtype: torch.dtype, precision: str, quick: bool, kernels: set[str]
) -> list[Job]:
    """The fused-MLP kernels in their shipped CUDA configs, one job per (kernel, WIDTH)."""
    t, dname = TL_NAME[dtype], ("tf32" if precision == "tf32" else TL_NAME[dtype])
    acc = "fp64" if dtype == torch.float64 else "fp32"
    jobs = []
    widths = [w for w in MLP_WIDTHS if w in _mlp.shipped_widths(arch, dtype, precision)]
    for width in widths[-1:] if quick else widths:
        cfg = _mlp.launch_config(torch.device("cuda"), dtype, width, precision, arch, cuda=True)
        common = dict(DIMS=(width,) * (MLP_LAYERS + 1), NUM_LAYERS=MLP_LAYERS,
                      ACC_FP64=False, WIDTH=width)  # fmt: skip
        nc = min(cfg["CHUNK"], width)  # the forward / backward chunk
        chain = dict(HIDDEN_ACT="gelu", OUT_ACT="none", INPUT_PRECISION=precision, **common)
        bias = (True,) * MLP_LAYERS
        # The loss folded into the last layer (mse, mean), as training runs it: fp32 / TF32
        # write dZ for an upstream gradient of 1, fp16 / bf16 write y.
        loss_fwd, loss_bwd = ("dz", "scaled") if t == "fp32" else ("y", "mse")
        const = {
            "mlp_fwd": dict(stride_xk=1, HAS_BIAS=bias, HIDDEN_PREACT=True,
                            STORE=True, STORE_OUT_PREACT=False, LOSS="none", LOSS_MEAN=False,
                            OUT_PREACT=False, BLOCK_M=cfg["BLOCK_M"], NC=nc, **chain),
            "mlp_fwd+mse": dict(stride_xk=1, HAS_BIAS=bias, HIDDEN_PREACT=True,
                                STORE=True, STORE_OUT_PREACT=False, LOSS=loss_fwd,
                                LOSS_MEAN=True, OUT_PREACT=False, BLOCK_M=cfg["BLOCK_M"],
                                NC=nc, **chain),
            "mlp_bwd": dict(stride_gn=1, NEED_DX=True, G_MODE="grad",
                            LOSS_MEAN=False, BLOCK_M=cfg["BLOCK_M"], NC=nc, **chain),
            "mlp_bwd+mse": dict(stride_gn=1, NEED_DX=True, G_MODE=loss_bwd,
                                LOSS_MEAN=True, BLOCK_M=cfg["BLOCK_M"], NC=nc, **chain),
            "mlp_wgrad": dict(stride_xk=1, HAS_BIAS=bias, HIDDEN_ACT="gelu", HIDDEN_PREACT=True,
                              DIRECT=False, INPUT_PRECISION=precision, BLOCK_R=cfg["BLOCK_R"],
                              NC=min(cfg["WGRAD_CHUNK"], width), **common),
            "mlp_reduce": dict(HAS_BIAS=bias, BLOCK=_mlp.REDUCE_BLOCK["cuda"], **common),
            "mlp_loss_reduce": dict(MEAN=True, BLOCK=_mlp.REDUCE_BLOCK["cuda"]),
        }  # fmt: skip
        warps = dict(mlp_fwd=cfg["num_warps"], mlp_bwd=cfg["num_warps"],
                     mlp_wgrad=cfg["wgrad_warps"], mlp_reduce=4, mlp_loss_reduce=4)  # fmt: skip
        rows = dict(mlp_fwd=cfg["BLOCK_M"], mlp_bwd=cfg["BLOCK_M"], mlp_wgrad=cfg["BLOCK_R"])
        types_of = _mlp_types(t, acc)
        for variant in const:
            name, _, loss = variant.partition("+")
            last = width == widths[-1]
            if name not in kernels or (name in ("mlp_reduce", "mlp_loss_reduce") and not last):
                continue
            chunk = const[variant].get("NC")
            what = f"{rows[name]}x{chunk}" if name in rows else f"{const[variant]['BLOCK']}"
            label = f"{MLP_LAYERS}x{width} {what} w{warps[name]}"
            if loss:
                mode = const[variant].get("LOSS", const[variant].get("G_MODE"))
                label += f" {loss}:{mode}"
            types = types_of[name]
            div16 = {k for k, v in types.items() if v not in ("fp32", "fp64")}
            # wgmma needs 64 rows per warpgroup: a weight-gradient block has NC rows.
            gemm = name in ("mlp_fwd", "mlp_bwd") or (name == "mlp_wgrad" and chunk >= 64)
            jobs.append(Job(name, arch, dname, label, types, const[variant], div16, warps[name],
                            1, gemm=gemm))  # fmt: skip
    return jobs


_VECTOR_OP = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)+)")


def vector_widths(ptx: str) -> dict[str, int]:
    """The widest ``ld.global`` and ``st.global`` in ``ptx``, in bits (``v4.b32``: 128), as
    ``{"ld_bits": .., "st_bits": ..}`` (0: none)."""
    best = {"ld": 0, "st": 0}
    for op, qualifiers in _VECTOR_OP.findall(ptx):
        parts = qualifiers.split(".")[1:]
        lanes = next((int(q[1:]) for q in parts if re.fullmatch(r"v\d+", q)), 1)
        bits = next((int(q[1:]) for q in reversed(parts) if re.fullmatch(r"[bfsu]\d+", q)), 0)
        best[op] = max(best[op], lanes * bits)
    return {"ld_bits": best["ld"], "st_bits": best["st"]}


def tma_usage(ptx: str, sass: str) -> dict[str, int]:
    """TMA and warp specialisation in a compiled kernel: ``cp.async.bulk.tensor`` instructions
    in the PTX, ``UTMALDG`` (TMA loads) and ``UTMASTG`` (TMA stores) in the SASS, and whether
    the PTX reallocates registers between warpgroups (``setmaxnreg``: warp-specialised)."""
    return dict(
        ptx_bulk=ptx.count("cp.async.bulk.tensor"),
        tma_ld=sass.count("UTMALDG"),
        tma_st=sass.count("UTMASTG"),
        ws=int("setmaxnreg" in ptx),
    )


def format_tma_table(rows: list[dict[str, Any]]) -> str:
    """The TMA report for the Hopper path's rows ("" if none), indented like the vector
    report: registers, spills, TMA instruction counts, wgmma and warp specialisation."""
    rows = [r for r in rows if "ptx_bulk" in r]
    if not rows:
        return ""
    head = ["kernel", "config", "arch", "dtype", "regs", "spill B", "bulk.tensor", "UTMALDG",
            "UTMASTG", "wgmma", "warp-spec", "status"]  # fmt: skip
    lines = []
    for r in rows:
        bad = [p for p in problems(r) if p in ("no TMA", "no wgmma", "spills")]
        lines.append([r["kernel"], r["config"], f"sm_{r['arch']}", r["dtype"], str(r["regs"]),
                      str(r["spills"]), str(r["ptx_bulk"]), str(r["tma_ld"]), str(r["tma_st"]),
                      "yes" if r["wgmma"] else "no", "yes" if r["ws"] else "no",
                      "OK" if not bad else "FAIL: " + ", ".join(bad)])  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    title = (
        "TMA (Hopper path): cp.async.bulk.tensor in the PTX, UTMALDG / UTMASTG in the SASS, "
        "wgmma (HGMMA) and warp specialisation (setmaxnreg); TMA and wgmma required"
    )
    out = [title, fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    return "\n".join(out + [fmt.format(*line) for line in lines])


def format_vector_table(rows: list[dict[str, Any]]) -> str:
    """The vector-width report for the bandwidth-bound kernels' rows ("" if none). Its lines
    are indented, so they never read as rows of the main table."""
    rows = [r for r in rows if "ld_bits" in r]
    if not rows:
        return ""
    head = ["kernel", "config", "arch", "dtype", "ld bits", "st bits", "status"]
    lines = []
    for r in rows:
        if r["need_v128"]:
            status = "OK" if r["ld_bits"] >= 128 else "FAIL: no 128-bit loads"
        else:
            status = "- (not contiguous and aligned: not required)"
        lines.append([r["kernel"], r["config"], f"sm_{r['arch']}", r["dtype"],
                      str(r["ld_bits"]), str(r["st_bits"]), status])  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    title = (
        "Vector widths: widest ld.global / st.global in the PTX, bits (128 = 16-byte vectors; "
        "required for contiguous aligned cases)"
    )
    out = [title, fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    return "\n".join(out + [fmt.format(*line) for line in lines])


def build_jobs(
    archs: tuple[int, ...] = ARCHS,
    kernels: set[str] | None = None,
    quick: bool = False,
) -> list[Job]:
    """Every (kernel, config, arch, dtype) the audit compiles."""
    kernels = set(_KERNELS) if kernels is None else kernels
    unknown = kernels - set(_KERNELS)
    if unknown:
        raise ValueError(f"unknown kernel(s) {sorted(unknown)}; choose from {sorted(_KERNELS)}")
    jobs: list[Job] = []
    for arch in archs:
        for dtype, precision in GEMM_VARIANTS:
            if quick and (dtype == torch.float64 or precision == "tf32"):
                continue
            jobs += _gemm_jobs(arch, dtype, precision, quick, kernels)
            jobs += _hopper_jobs(arch, dtype, precision, quick, kernels)
            jobs += _splitk_chain_jobs(arch, dtype, precision, quick, kernels)
            if precision == "ieee":
                jobs += _elementwise_jobs(arch, dtype, quick, kernels)
                if "linear_epilogue" in kernels:
                    jobs += _epilogue_jobs(arch, dtype, quick)
                jobs += _mse_jobs(arch, dtype, quick, kernels)
                if "sgd" in kernels:
                    jobs += _sgd_jobs(arch, dtype, quick)
            if dtype != torch.float64:
                jobs += _mlp_jobs(arch, dtype, precision, quick, kernels)
    return jobs


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for ``arch`` (its bundled legacy one is too old for PTX 9)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):
        return os.path.join(_NV_BIN, "ptxas")


@contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _parse_ptxas_log(log: str) -> tuple[int, int] | None:
    """(registers, spill bytes) from a ``ptxas -v`` log, or None if it has none."""
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        return None
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return int(regs.group(1)), sum(spills)


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ``ptxas -v`` on the kernel's PTX."""
    m = re.search(r"^\s*\.target\s+(\S+)", ptx, re.M)
    gpu = m.group(1).rstrip(",") if m else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # Same ptxas and register-allocation flag as Triton's own cubin build.
        out = subprocess.run(
            [
                _ptxas(arch),
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={gpu}",
                src,
                "-o",
                os.path.join(tmp, "k.cubin"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    return _parse_ptxas_log(out.stdout + out.stderr) or (-1, 0)


def _sass(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run(
            [os.path.join(_NV_BIN, "cuobjdump"), "-sass", path],
            capture_output=True,
            text=True,
            check=True,
        )
    return out.stdout


def compile_job(job: Job) -> dict[str, Any]:
    """Compile one job; returns a result row (``error`` set on failure)."""
    fn = _KERNELS[job.kernel]
    row: dict[str, Any] = dict(
        kernel=job.kernel,
        config=job.config,
        arch=job.arch,
        dtype=job.dtype,
        gemm=job.gemm,
        error=None,
    )
    t0 = time.time()
    try:
        signature: dict[str, str] = {}
        attrs: dict[tuple[int, ...], list[list[Any]]] = {}
        for i, name in enumerate(fn.arg_names):
            if name in job.constexprs:
                signature[name] = "constexpr"
            else:
                signature[name] = job.types[name]
                if name in job.div16:  # a tuple of pointers: each element
                    n = len(job.types[name]) if isinstance(job.types[name], tuple) else 0
                    for path in [(i, j) for j in range(n)] if n else [(i,)]:
                        attrs[path] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=signature, constexprs=dict(job.constexprs), attrs=attrs)
        target = GPUTarget("cuda", job.arch, 32)
        # Recompile (no cache hit) with Triton's ptxas log printed, and capture that log: it
        # has the register and spill counts. Fall back to running ptxas -v ourselves.
        log = io.StringIO()
        with _env(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1"), redirect_stdout(log):
            compiled = triton.compile(
                src,
                target=target,
                options=dict(num_warps=job.num_warps, num_stages=job.num_stages),
            )
        row["shared"] = int(compiled.metadata.shared)
        usage = _parse_ptxas_log(log.getvalue())
        row["regs"], row["spills"] = usage or _ptxas_usage(compiled.asm["ptx"], job.arch)
        # Only the GEMMs are checked for wgmma (disassembling is a good part of a small
        # kernel's compile time).
        hopper_gemm = job.gemm and job.arch >= 90
        sass = _sass(compiled.asm["cubin"]) if hopper_gemm else ""
        row["wgmma"] = "HGMMA" in sass if hopper_gemm else None
        if job.fields.get("tma"):  # the Hopper path's TMA report
            row.update(tma_usage(compiled.asm["ptx"], sass), need_tma=True)
        if job.fields.get("vector"):  # the bandwidth-bound kernels' vector-width report
            row.update(vector_widths(compiled.asm["ptx"]), need_v128=job.fields["need_v128"])
    except Exception as e:  # any compile failure is reported, not raised
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    row["seconds"] = time.time() - t0
    return row


def problems(row: dict[str, Any]) -> list[str]:
    """Why a result row fails the audit (empty list: it passes)."""
    if row["error"]:
        return ["compile failed"]
    out = []
    if row["spills"] > 0:
        out.append("spills")
    if row["shared"] > smem_limit(row["arch"]):
        out.append("shared memory over limit")
    needs_wgmma = row["dtype"] in ("fp16", "bf16", "tf32")
    if row["gemm"] and row["arch"] >= 90 and needs_wgmma and not row["wgmma"]:
        out.append("no wgmma")
    if row.get("need_tma") and not (row["ptx_bulk"] and row["tma_ld"] and row["tma_st"]):
        out.append("no TMA")
    if row.get("need_v128") and row.get("ld_bits", 0) < 128:
        out.append("no 128-bit loads")
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """The audit table as text."""
    head = ["kernel", "config", "arch", "dtype", "regs", "spill B", "smem B", "wgmma", "status"]
    lines = []
    for r in rows:
        bad = problems(r)
        status = "OK" if not bad else "FAIL: " + ", ".join(bad)
        if r["error"]:
            status += f" ({r['error']})"
        wg = "-" if not r["gemm"] or r.get("wgmma") is None else ("yes" if r["wgmma"] else "no")
        lines.append(
            [
                r["kernel"],
                r["config"],
                f"sm_{r['arch']}",
                r["dtype"],
                str(r.get("regs", "-")),
                str(r.get("spills", "-")),
                str(r.get("shared", "-")),
                wg,
                status,
            ]
        )
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
        for i, h in enumerate(head)
    ]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def run_audit(jobs: list[Job], workers: int) -> list[dict[str, Any]]:
    """Compile all jobs (in ``workers`` processes when > 1), in job order."""
    if workers <= 1:
        return [compile_job(j) for j in jobs]
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_job, jobs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m triton_kernels.audit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one config per GEMM kernel, one activation, one variant per MSE/SGD kernel, no fp64",
    )
    parser.add_argument("--arch", default="80,90", help="comma-separated, e.g. 90")
    parser.add_argument(
        "--kernel", default=None, help=f"comma-separated subset of {','.join(_KERNELS)}"
    )
    parser.add_argument(
        "-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes"
    )
    args = parser.parse_args(argv)
    if interpreting():
        print("audit: unset TRITON_INTERPRET (the audit compiles real GPU code)", file=sys.stderr)
        return 2
    archs = tuple(int(a) for a in args.arch.split(","))
    kernels = set(args.kernel.split(",")) if args.kernel else None
    jobs = build_jobs(archs, kernels, args.quick)
    t0 = time.time()
    rows = run_audit(jobs, args.jobs)
    print(format_table(rows))
    vector_table = format_vector_table(rows)
    if vector_table:
        print("\n" + vector_table)
    tma_table = format_tma_table([r for r in rows if not r["error"]])
    if tma_table:
        print("\n" + tma_table)
    failed = [r for r in rows if problems(r)]
    print(
        f"\n{len(rows)} compiles in {time.time() - t0:.1f} s, {len(failed)} failing "
        f"(triton {triton.__version__})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
