"""Compile audit: every kernel in every shipped config, built for sm_80 and sm_90 without a GPU.

Usage::

    python -m manualbp.kernels.audit [--quick] [--arch 80,90] [--kernel NAME,..] [-j N] [--list]

The jobs come from the launchers themselves. For each architecture and dtype (fp16, bf16, fp32
IEEE, fp32 TF32, fp64) the audit cases of every launcher module (its ``audit_cases``, found by
:func:`case_modules`) call the public launchers on small CPU tensors of the audited layouts
(sizes multiples of 16) under ``_host.simulate(arch, 132)`` and ``_host.record()``: nothing
runs, and every launch the launchers would make on that GPU is recorded, each candidate config
of a tuned one with that config's own arguments (TMA descriptors with its boxes). A recorded
launch becomes a compile job whose signature is derived from its arguments as Triton's launcher
specialises them (:func:`specialise`, :func:`job_of`); identical jobs are compiled once.
``--list`` prints the jobs as JSON lines instead.

Each job is compiled to a cubin by Triton's own toolchain (``triton.compile`` on an
``ASTSource`` for a ``GPUTarget``): ``ptxas -v`` gives registers and spills, the metadata the
shared memory, ``cuobjdump -sass`` whether a GEMM uses wgmma (``HGMMA``). The audit exits 1 on a
launch keyword that is neither a parameter nor an option (Triton's launcher raises), a compile
error, a spill, shared memory over the architecture's limit, a GEMM of fp16/bf16/TF32 tiles of
64+ rows without wgmma on sm_90, a Hopper-path GEMM without TMA (``cp.async.bulk.tensor`` in
the PTX, ``UTMALDG`` and ``UTMASTG`` in the SASS), or a bandwidth-bound kernel without a 128-bit
global load on contiguous, 16-byte aligned operands. After the table: the widest ``ld.global``
/ ``st.global`` of the bandwidth-bound kernels, and the Hopper path's TMA use.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any
from unittest import mock

import torch
import triton
from torch import Tensor
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.tools.tensor_descriptor import TensorDescriptor

from . import _host, linear
from ._runtime import smem_limit

ARCHS = (80, 90)
SMS = 132  # an H100 / H200 SXM: the Hopper GEMM's persistent grid is a constexpr of it


@dataclass(frozen=True)
class Variant:
    """A dtype of the table: the tensors' and torch's float32 matmul precision while recording
    (``"high"``: TF32 ``tl.dot``)."""

    name: str
    dtype: torch.dtype
    matmul_precision: str = "highest"


VARIANTS = (Variant("fp16", torch.float16), Variant("bf16", torch.bfloat16),
            Variant("fp32", torch.float32), Variant("tf32", torch.float32, "high"),
            Variant("fp64", torch.float64))  # fmt: skip
QUICK_VARIANTS = ("fp16", "bf16", "fp32")

# What a kernel is checked for, by its table name (the kernel's, less "_kernel").
# GEMMs -> the constexpr giving their tl.dot tile's rows: on sm_90, fp16/bf16/TF32 tiles of 64
# rows or more (a warpgroup's) must use wgmma; the MLP weight gradient's dot has NC rows.
GEMM_ROWS = {"linear_forward": "BLOCK_M", "matmul": "BLOCK_M", "matmul_tma": "BLOCK_M",
             "chain_grad": "BLOCK_M", "splitk_partial": "BLOCK_M", "mlp_forward": "BLOCK_M",
             "mlp_backward": "BLOCK_M", "mlp_rop": "BLOCK_M", "mlp_wgrad": "NC"}  # fmt: skip
TMA_KERNELS = {"matmul_tma"}  # TMA loads and stores required
# Bandwidth-bound: the vector-width report; 128-bit loads required when every operand is
# contiguous and 16-byte aligned and the launch keeps its vector path on (CONTIG / ALIGNED).
BANDWIDTH_BOUND = {"mse_fwd", "mse_bwd", "grad_scale", "sgd", "splitk_reduce", "linear_epilogue"}
LABEL_SHAPE = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "ROW_STEPS", "NC", "BLOCK", "RBLOCK")


# --------------------------------------------------------------------------------------------
# The cases: launcher calls on CPU tensors (recorded, never run)
# --------------------------------------------------------------------------------------------
# Each launcher module of the package declares its cases: ``audit_cases(dtype, quick)`` yields
# ``(label, call)`` pairs, calls of its public launchers on small CPU tensors (recorded, never
# run), and ``AUDIT_BY_PRECISION`` says whether they depend on tl.dot's input precision
# (recorded again for TF32). A new kernel module is audited once it declares them.
def case_modules() -> list[Any]:
    """The package's modules that declare audit cases, in name order."""
    package = importlib.import_module(__package__)
    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__))
    found = [importlib.import_module(f"{__package__}.{n}") for n in names if n != "audit"]
    return [m for m in found if hasattr(m, "audit_cases")]


@contextlib.contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def record(arch: int, variant: Variant, quick: bool = False) -> list[tuple[str, _host.Launch]]:
    """``(case label, launch)`` for every launch the cases make on ``arch`` with ``SMS`` SMs:
    each candidate of a tuned launch (``quick``: the first one only)."""
    out: list[tuple[str, _host.Launch]] = []
    with _host.simulate(arch, SMS), _matmul_precision(variant.matmul_precision), \
            linear.force("auto"), _host.record() as entries:  # fmt: skip
        for module in case_modules():
            if module.AUDIT_BY_PRECISION or variant.matmul_precision == "highest":
                for label, run in module.audit_cases(variant.dtype, quick):
                    start = len(entries)
                    run()
                    out += [(label, e) for e in entries[start:] if isinstance(e, _host.Launch)]
    return [(label, e) for label, e in out if not quick or _first_candidate(e)]


def _first_candidate(launch: _host.Launch) -> bool:
    """Whether a launch is untuned or runs the first of its candidate configs."""
    first = launch.candidates[0] if launch.candidates else {}
    return all(launch.kwargs[k] == v for k, v in first.items())


# --------------------------------------------------------------------------------------------
# Jobs: recorded launches, specialised as Triton's launcher would
# --------------------------------------------------------------------------------------------
TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
              torch.float64: "fp64", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32",
              torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}  # fmt: skip
DIVISIBLE = [["tt.divisibility", 16]]
Path = tuple[int, ...]


def specialise(value: Any, path: Path, constexprs: dict[Any, Any], attrs: dict[Path, Any], *,
               specialize: bool = True, align: bool = True) -> Any:  # fmt: skip
    """The signature type of the argument ``value`` at ``path`` (a tuple of types for a tuple)
    as Triton's launcher specialises it: what it compiles in goes to ``constexprs`` (``None``,
    an int equal to 1), a 16-byte aligned pointer or an int divisible by 16 gets
    ``tt.divisibility`` in ``attrs``; ``specialize`` / ``align`` False: the parameter is in
    ``do_not_specialize`` / ``do_not_specialize_on_alignment``."""
    if isinstance(value, tuple):
        return tuple(specialise(v, (*path, i), constexprs, attrs, specialize=specialize,
                                align=align) for i, v in enumerate(value))  # fmt: skip
    if value is None:
        constexprs[path] = None
        return "constexpr"
    if isinstance(value, bool):
        return "u1"
    if isinstance(value, int):
        if specialize and value == 1:
            constexprs[path] = 1
            return "constexpr"
        if specialize and align and value % 16 == 0:
            attrs[path] = DIVISIBLE
        return "i32" if -(2**31) <= value < 2**31 else "u64" if value >= 2**63 else "i64"
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, TensorDescriptor):
        return f"tensordesc<{TYPE_NAMES[value.base.dtype]}{list(value.block_shape)}>"
    if isinstance(value, Tensor):
        if specialize and align and value.data_ptr() % 16 == 0:
            attrs[path] = DIVISIBLE
        return "*" + TYPE_NAMES[value.dtype]
    raise TypeError(f"no signature type for a kernel argument of type {type(value).__name__}")


@dataclass
class Job:
    """One compile: the kernel (module and name), the table's labels, the ``ASTSource``
    (``constexprs`` by parameter name, or by path inside a tuple argument), the options and
    what is checked."""

    kernel: str
    module: str
    function: str
    arch: int
    dtype: str
    config: str
    signature: dict[str, Any]
    constexprs: dict[Any, Any]
    attrs: dict[Path, Any]
    options: dict[str, Any]
    wgmma: bool = False  # a GEMM whose tiles must use wgmma on sm_90 (fp16/bf16/TF32)
    tma: bool = False
    vector: bool = False
    need_v128: bool = False

    def key(self) -> str:
        """What the compile depends on: jobs with equal keys are compiled once."""
        return repr((self.module, self.function, self.arch, self.signature,
                     sorted(self.constexprs.items(), key=repr), sorted(self.attrs.items()),
                     sorted(self.options.items())))  # fmt: skip


def _leaves(values: tuple) -> Iterator[Any]:
    for v in values:
        yield from _leaves(v) if isinstance(v, tuple) else (v,)


def job_of(launch: _host.Launch, arch: int, dtype: str, case: str) -> Job:
    """The compile job of ``launch``: its arguments bound to the kernel's parameters and
    specialised (:func:`specialise`; a float or bool parameter with a type annotation, as
    ``negative_slope: tl.float64``, takes that type), the other keywords as options."""
    fn, kwargs = launch.kernel, launch.kwargs
    values = dict(zip(fn.arg_names, launch.args, strict=False)) | kwargs
    signature: dict[str, Any] = {}
    constexprs: dict[Any, Any] = {}
    attrs: dict[Path, Any] = {}
    for i, p in enumerate(fn.params):
        value = values[p.name] if p.name in values or not p.has_default else p.default
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif p.annotation_type[:2] in ("fp", "bf", "u1"):
            signature[p.name] = p.annotation_type
        else:
            found: dict[Any, Any] = {}
            ty = specialise(value, (i,), found, attrs, specialize=not p.do_not_specialize,
                            align=not p.do_not_specialize_on_alignment)  # fmt: skip
            signature[p.name] = p.annotation_type or ty  # an annotated one is never a constexpr
            if not p.annotation_type:
                constexprs |= {(p.name if k == (i,) else k): v for k, v in found.items()}
    name = fn.__name__.removesuffix("_kernel").lstrip("_")
    blocks = "x".join(str(kwargs[k]) for k in LABEL_SHAPE if k in kwargs)
    named = (("g", "GROUP_M"), ("w", "num_warps"), ("s", "num_stages"))
    label = " ".join([blocks, *(f"{p}{kwargs[k]}" for p, k in named if k in kwargs), case])
    tensors = [t for t in _leaves(tuple(values.values())) if isinstance(t, Tensor)]
    vector_path = kwargs.get("CONTIG", True) and kwargs.get("ALIGNED", True)
    aligned = all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors)
    return Job(name, fn.fn.__module__, fn.__name__, arch, dtype, label, signature, constexprs,
               attrs, {k: v for k, v in kwargs.items() if k not in fn.arg_names},
               wgmma=name in GEMM_ROWS and kwargs[GEMM_ROWS[name]] >= 64,
               tma=name in TMA_KERNELS, vector=name in BANDWIDTH_BOUND,
               need_v128=name in BANDWIDTH_BOUND and vector_path and aligned)  # fmt: skip


def build_jobs(archs: tuple[int, ...] = ARCHS, kernels: set[str] | None = None,
               quick: bool = False) -> list[Job]:  # fmt: skip
    """Every distinct compile of the recorded launches (``kernels``: of those only)."""
    jobs: dict[str, Job] = {}
    for arch in archs:
        for variant in VARIANTS:
            if not quick or variant.name in QUICK_VARIANTS:
                for case, launch in record(arch, variant, quick):
                    job = job_of(launch, arch, variant.name, case)
                    jobs.setdefault(job.key(), job)
    known = {j.kernel for j in jobs.values()}
    if kernels is not None and kernels - known:
        raise ValueError(
            f"unknown kernel(s) {sorted(kernels - known)}; choose from {sorted(known)}"
        )
    return [j for j in jobs.values() if kernels is None or j.kernel in kernels]


# --------------------------------------------------------------------------------------------
# Compiling, and reading the machine code
# --------------------------------------------------------------------------------------------
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
    """``cp.async.bulk.tensor`` in the PTX, ``UTMALDG`` / ``UTMASTG`` (TMA loads / stores) in
    the SASS, and whether the PTX moves registers between warpgroups (``setmaxnreg``:
    warp-specialised)."""
    return dict(ptx_bulk=ptx.count("cp.async.bulk.tensor"), tma_ld=sass.count("UTMALDG"),
                tma_st=sass.count("UTMASTG"), ws=int("setmaxnreg" in ptx))  # fmt: skip


def ptxas_usage(log: str) -> tuple[int, int]:
    """(registers, spill bytes) from a ``ptxas -v`` log (Triton 3.6+ runs ptxas with ``-v``
    and prints the log under ``TRITON_DUMP_PTXAS_LOG``)."""
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        raise RuntimeError("no register count in the ptxas log")
    return int(regs.group(1)), sum(map(int, re.findall(r"(\d+) bytes spill (?:stores|loads)", log)))


def _sass(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                 "cuobjdump")  # fmt: skip
        return subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip


def compile_job(job: Job) -> dict[str, Any]:
    """Compile one job; returns a result row (``error`` set on failure)."""
    row: dict[str, Any] = dict(kernel=job.kernel, config=job.config, arch=job.arch,
                               dtype=job.dtype, gemm=job.wgmma, error=None)  # fmt: skip
    t0 = time.time()
    try:
        target = GPUTarget("cuda", job.arch, 32)
        unknown = set(job.options) - set(vars(make_backend(target).parse_options({})))
        if unknown:  # what Triton's launcher raises on, before compiling
            raise KeyError(f"keyword(s) {sorted(unknown)} neither a parameter nor an option")
        fn = getattr(importlib.import_module(job.module), job.function)
        src = ASTSource(fn, job.signature, job.constexprs, job.attrs)
        # Recompile (no cache hit) with Triton's ptxas log printed: registers and spills.
        log = io.StringIO()
        env = dict(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")
        with mock.patch.dict(os.environ, env), contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=dict(job.options))
        ptx = compiled.asm["ptx"]
        row["shared"] = int(compiled.metadata.shared)
        row["regs"], row["spills"] = ptxas_usage(log.getvalue())
        # Only the GEMMs are disassembled (a good part of a small kernel's compile time).
        hopper_gemm = job.wgmma and job.arch >= 90
        sass = _sass(compiled.asm["cubin"]) if hopper_gemm or job.tma else ""
        row["wgmma"] = "HGMMA" in sass if hopper_gemm else None
        if job.tma:
            row.update(tma_usage(ptx, sass), need_tma=True)
        if job.vector:
            row.update(vector_widths(ptx), need_v128=job.need_v128)
    except Exception as e:  # any failure is reported, not raised
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


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
def _text(head: list[str], lines: list[list[Any]], indent: str = "") -> str:
    lines = [[str(v) for v in line] for line in lines]
    widths = [max([len(h), *(len(line[i]) for line in lines)]) for i, h in enumerate(head)]
    fmt = indent + "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    return "\n".join(fmt.format(*line) for line in [head, ["-" * w for w in widths], *lines])


def _status(row: dict[str, Any], shown: tuple[str, ...] | None = None) -> str:
    bad = [p for p in problems(row) if shown is None or p in shown]
    return "OK" if not bad else "FAIL: " + ", ".join(bad)


def report(rows: list[dict[str, Any]]) -> str:
    """The audit table, then (indented, so that their lines never read as rows of the table)
    the vector widths of the bandwidth-bound kernels and the Hopper path's TMA use."""
    yes = {None: "-", False: "no", True: "yes"}

    def ids(r: dict[str, Any]) -> list[str]:
        return [r["kernel"], r["config"], f"sm_{r['arch']}", r["dtype"]]

    head = ["kernel", "config", "arch", "dtype"]
    out = [_text([*head, "regs", "spill B", "smem B", "wgmma", "status"], [
        [*ids(r), r.get("regs", "-"), r.get("spills", "-"), r.get("shared", "-"),
         yes[r.get("wgmma")], _status(r) + (f" ({r['error']})" if r["error"] else "")]
        for r in rows])]  # fmt: skip
    vector = [r for r in rows if "ld_bits" in r]
    if vector:
        out += ["", "Vector widths: widest ld.global / st.global in the PTX, bits (128 = 16-byte "
                "vectors; required for contiguous aligned cases)", _text(
                    [*head, "ld bits", "st bits", "status"],
                    [[*ids(r), r["ld_bits"], r["st_bits"], _status(r, ("no 128-bit loads",))
                      if r["need_v128"] else "- (not contiguous and aligned: not required)"]
                     for r in vector], "  ")]  # fmt: skip
    tma = [r for r in rows if "ptx_bulk" in r]
    if tma:
        out += ["", "TMA (Hopper path): cp.async.bulk.tensor in the PTX, UTMALDG / UTMASTG in "
                "the SASS, wgmma (HGMMA) and warp specialisation (setmaxnreg); TMA and wgmma "
                "required", _text(
                    [*head, "regs", "spill B", "bulk.tensor", "UTMALDG", "UTMASTG", "wgmma",
                     "warp-spec", "status"],
                    [[*ids(r), r["regs"], r["spills"], r["ptx_bulk"], r["tma_ld"], r["tma_st"],
                      yes[bool(r["wgmma"])], yes[bool(r["ws"])],
                      _status(r, ("no TMA", "no wgmma", "spills"))]
                     for r in tma], "  ")]  # fmt: skip
    return "\n".join(out)


def run_audit(jobs: list[Job], workers: int) -> list[dict[str, Any]]:
    """Compile all jobs (in ``workers`` processes when > 1), in job order."""
    if workers <= 1:
        return [compile_job(j) for j in jobs]
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_job, jobs))


def as_json(job: Job) -> str:
    """A job as one JSON line (``--list``): constexprs by name, values JSON lacks as text."""
    plain = (bool, int, str, type(None))
    constexprs = {str(k): v if isinstance(v, plain) else str(v) for k, v in job.constexprs.items()}
    return json.dumps(asdict(job) | dict(attrs=sorted(job.attrs), constexprs=constexprs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m manualbp.kernels.audit", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    quick = "the first config of each tuned launch, one activation, one case an MSE/SGD kernel"
    parser.add_argument("--quick", action="store_true", help=quick + "; fp16, bf16, fp32")
    parser.add_argument("--arch", default="80,90", help="comma-separated, e.g. 90")
    parser.add_argument("--kernel", default=None, help="comma-separated names (the table's)")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel compile processes")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="print the jobs (JSON), compile none")
    args = parser.parse_args(argv)
    if _host.interpreting():
        print("audit: unset TRITON_INTERPRET (the audit compiles real GPU code)", file=sys.stderr)
        return 2
    t0 = time.time()
    kernels = set(args.kernel.split(",")) if args.kernel else None
    jobs = build_jobs(tuple(int(a) for a in args.arch.split(",")), kernels, args.quick)
    if args.list:
        print("\n".join(as_json(j) for j in jobs))
        return 0
    rows = run_audit(jobs, args.jobs)
    print(report(rows))
    failed = [r for r in rows if problems(r)]
    print(f"\n{len(rows)} compiles in {time.time() - t0:.1f} s, {len(failed)} failing "
          f"(triton {triton.__version__})")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
