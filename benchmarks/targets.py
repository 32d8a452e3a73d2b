"""The performance targets, judged from the measured results: pass / fall short / not measured.

A target passes when every measured instance meets it, falls short when any does not (the worst
listed), and is "not measured" when nothing it needs ran. The GPU targets (``path="triton"``)
are judged only on a run of the Triton kernels; the host-overhead and reference-path goals
(``path="reference"``, :data:`REFERENCE_GOALS`) on the CPU run, as time(manualbp) /
time(native), lower is better.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["REFERENCE_GOALS", "TARGETS", "evaluate_targets"]

PASS, SHORT, NOT_MEASURED = "pass", "fall short", "not measured"
Collect = Callable[[dict[str, Any]], Iterator[tuple[str, float]]]  # doc -> (where, value)

# Goals of the CPU run's host-overhead and reference-path cases (benchmarks/host_cases.py):
# the most manualbp's fwd+bwd time may be, as a multiple of native PyTorch's, on one thread.
REFERENCE: dict[str, tuple[float, str]] = {
    "host_linear_tiny": (1.3, "tiny Linear (input 8x32, 32->32) fwd+bwd"),
    "host_mse_tiny": (1.3, "tiny mse_loss (8x32) fwd+bwd"),
    "ref_linear_gelu": (1.10, "Linear+GELU 256x1024->1024 fp32 fwd+bwd"),
    "ref_linear_gelu_zstd8": (
        1.2,
        "Linear+GELU 256x1024->1024 fp32 fwd+bwd, pre-activations std ~8",
    ),
    "ref_mse_4m": (1.05, "mse_loss fwd+bwd on 4M fp32 elements"),
}
REFERENCE_GOALS: dict[str, float] = {key: goal for key, (goal, _) in REFERENCE.items()}


@dataclass(frozen=True)
class Target:
    """One target: ``collect(doc)`` yields ``(where, value)``; it is met when ``value >= bound``
    (``lower_is_better``: ``value <= bound``)."""

    key: str
    text: str
    bound: float
    collect: Collect
    unit: str = "x"  # "x" (a ratio) or "%"
    lower_is_better: bool = False
    path: str = "triton"  # "triton": judged on runs of the Triton kernels; "reference": any
    ceiling: str = ""  # the best any kernel could do, from bytes and FLOPs, and why


def _ran(case: dict[str, Any], mode: str, provider: str) -> dict[str, Any] | None:
    r = case.get("results", {}).get(mode, {}).get(provider)
    return r if r is not None and r.get("status") == "ran" else None


def _vs(
    group: str,
    mode: str,
    others: tuple[str, ...] = ("native",),
    at: dict[str, Any] | None = None,
    *,
    named: bool = False,
) -> Collect:
    """``manualbp_vs_<other>`` in ``mode`` of the ``group`` cases whose params match ``at``, for
    each of ``others`` measured (``named``: the place of each value names the other)."""

    def collect(doc: dict[str, Any]) -> Iterator[tuple[str, float]]:
        for c in doc["cases"]:
            if c["group"] != group or any(c["params"].get(k) != v for k, v in (at or {}).items()):
                continue
            for other in others:
                value = c.get("speedups", {}).get(mode, {}).get(f"manualbp_vs_{other}")
                if value is not None:
                    yield f"{c['name']} {mode}" + (f" vs {other}" if named else ""), value

    return collect


def _chain(*collects: Collect) -> Collect:
    return lambda doc: (value for collect in collects for value in collect(doc))


# The shapes the "Linear on the GPU" issue states its Linear+GELU goals on: GEMM-bound (the MLP
# up-projection: fusion can gain at most ~1.03x there) and fusion-bound (a narrow layer).
GELU = {"activation": "gelu"}
GEMM_BOUND_SHAPE = {"M": 8192, "K": 4096, "N": 16384}
FUSION_BOUND_SHAPE = {"M": 65536, "K": 1024, "N": 1024}


def _gemm_pct(doc: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """Mode ``gemms``: the Linear's three GEMMs alone, manualbp's kernels against
    ``torch.matmul`` at the same shapes and layouts: 100 * time(torch.matmul) / time(manualbp)."""
    return ((where, 100.0 * value) for where, value in _vs("linear", "gemms")(doc))


def _time_ratio(goal: str) -> Collect:
    """time(manualbp) / time(native) of the cases of ``goal`` (``native_vs_manualbp``)."""

    def collect(doc: dict[str, Any]) -> Iterator[tuple[str, float]]:
        for c in doc["cases"]:
            if c.get("params", {}).get("goal") != goal:
                continue
            for mode in c["modes"]:
                value = c.get("speedups", {}).get(mode, {}).get("native_vs_manualbp")
                if value is not None:
                    yield f"{c['name']} {mode}", value

    return collect


def _pct(group: str, mode: str, min_numel: int = 0, of: str = "ceiling") -> Collect:
    """manualbp's ``pct_of_<of>`` in ``mode`` of the ``group`` cases of at least ``min_numel``
    elements (the place names the mode for the bound)."""

    def collect(doc: dict[str, Any]) -> Iterator[tuple[str, float]]:
        for c in doc["cases"]:
            if c["group"] != group or c["params"].get("numel", 1 << 62) < min_numel:
                continue
            r = _ran(c, mode, "manualbp")
            if r is not None and r.get(f"pct_of_{of}") is not None:
                yield c["name"] + (f" {mode}" if of == "bound" else ""), r[f"pct_of_{of}"]

    return collect


# The fused narrow MLP's goals (issue 15) are stated at one shape: hidden width 64, 4 hidden
# layers, 2^18 rows (every dtype measured there is judged).
NARROW_GOAL_SHAPE = {"width": 64, "num_hidden_layers": 4, "M": 1 << 18}


def _linear_mse_memory(doc: dict[str, Any]) -> Iterator[tuple[str, float]]:
    for c in doc["cases"]:
        if c["group"] != "linear_mse" or c["params"]["N"] < 4096:
            continue
        mine = c["providers"].get("manualbp", {}).get("peak_mem_bytes")
        theirs = c["providers"].get("native", {}).get("peak_mem_bytes")
        if mine and theirs and c["providers"]["manualbp"].get("status") == "ran":
            yield c["name"], mine / theirs


# The Linear goals are the "Linear on the GPU" issue's (never slower than native; fusion pays
# where the elementwise traffic is a real share: at K=4096 the best possible gain of fusing
# GELU is ~1.03x, so the earlier 1.15x-at-every-shape goal is stated at the narrow shape only).
# They judge the ``manualbp`` provider (the per-shape choice); the forced candidates
# (manualbp_triton, manualbp_cublas) are in the table next to it, each with its own ratios.
TARGETS: list[Target] = [
    Target(
        "linear_gelu_vs_native",
        "Linear+GELU fwd+bwd >= 1.0x native eager: never slower (every shape and dtype measured)",
        1.0,
        _vs("linear", "fwd+bwd", at=GELU),
        ceiling="native's own kernels (cuBLAS + the elementwise pass) are a candidate: 1.0x "
        "reachable; roofline 1.03x (GEMM-bound) to 1.38x (M=65536, K=N=1024 bf16, GELU passes"
        " fused away)",
    ),
    Target(
        "linear_gelu_vs_compile",
        "Linear+GELU fwd+bwd >= 1.0x torch.compile (every shape and dtype measured)",
        1.0,
        _vs("linear", "fwd+bwd", ("compile",), GELU),
        ceiling="as for native eager (compile fuses the same elementwise passes): 1.0x reachable "
        "with the cuBLAS candidate",
    ),
    Target(
        "linear_gelu_gemm_bound",
        "Linear+GELU fwd+bwd >= 1.0x native eager and >= 1.0x torch.compile at M=8192, "
        "K=4096, N=16384 (GEMM-bound)",
        1.0,
        _chain(
            *(
                _vs("linear", "fwd+bwd", (o,), GELU | GEMM_BOUND_SHAPE, named=True)
                for o in ("native", "compile")
            )
        ),
        ceiling="roofline 1.03x: 3 GEMMs of 0.55 PFLOP; the GELU passes are ~3% of the bytes",
    ),
    Target(
        "linear_gelu_fusion_bound",
        "Linear+GELU fwd+bwd >= 1.15x native eager at M=65536, K=N=1024 (fusion-bound)",
        1.15,
        _vs("linear", "fwd+bwd", at=GELU | FUSION_BOUND_SHAPE),
        ceiling="roofline 1.38x (both GELU passes fused into the GEMMs); 1.13x with the forward "
        "epilogue alone (the backward's dZ pass kept)",
    ),
    Target(
        "linear_plain_vs_native",
        "plain Linear fwd+bwd >= 1.0x native (cuBLAS): never slower (every shape and dtype "
        "measured)",
        1.0,
        _vs("linear", "fwd+bwd", at={"activation": None}),
        ceiling="1.0x: the same GEMMs (cuBLAS is a candidate); the bias gradient fused saves < 2%",
    ),
    Target(
        "gemm_pct_of_matmul",
        "manualbp's Triton GEMMs alone >= 95% of torch.matmul at the same shapes "
        "(100 * time(torch.matmul) / time(manualbp), mode gemms)",
        95.0,
        _gemm_pct,
        unit="%",
        ceiling="~100%: the same FLOPs and operands as torch.matmul",
    ),
    Target(
        "linear_pct_of_bound",
        "every Linear case fwd+bwd >= 85% of its bound (best time from its FLOPs and least "
        "bytes at the measured ceilings, benchmarks/bounds.py)",
        85.0,
        _pct("linear", "fwd+bwd", of="bound"),
        unit="%",
        ceiling="100% by definition of the bound",
    ),
    Target(
        "mse_bandwidth",
        "MSE fwd+bwd >= 85% of the measured copy bandwidth (sizes >= 2^24 elements; "
        "smaller ones are latency-bound)",
        85.0,
        _pct("mse", "fwd+bwd", 1 << 24),
        unit="%",
        ceiling="100% of the copy bandwidth",
    ),
    Target(
        "mse_vs_native",
        "MSE fwd+bwd >= 2.2x native eager (every size measured)",
        2.2,
        _vs("mse", "fwd+bwd"),
        ceiling="2.33x: 12 bytes per fp32 element (read x, t; write the gradient; g = 1 scales "
        "nothing) against native's 28 (16 forward: x, t, the unreduced loss written and read;"
        " 12 backward)",
    ),
    Target(
        "sgd_vs_fused",
        "SGD step >= torch's fused SGD (speedup >= 1.0x)",
        1.0,
        _vs("sgd", "step", ("native_fused",)),
        ceiling="1.0x: the same bytes per parameter as torch's fused SGD (read p, g, buf; write p, "
        "buf); only launch overhead differs",
    ),
    Target(
        "sgd_bandwidth",
        "SGD step >= 85% of the measured copy bandwidth",
        85.0,
        _pct("sgd", "step"),
        unit="%",
        ceiling="100% of the copy bandwidth",
    ),
    Target(
        "linear_mse_peak_memory",
        "LinearMSELoss peak memory <= 1.0x the unfused nn.Linear + nn.MSELoss: never more "
        "(output width >= 4096; max_memory_allocated during fwd+bwd)",
        1.0,
        _linear_mse_memory,
        lower_is_better=True,
        ceiling="(|dX| + |dW| + the fp32 dW accumulator (4 B x |W|, in 16-bit dtypes) + one "
        "chunk) / (native: y and dL/dy, 2 |y|): 0.56x at M=8192, K=4096, N=8192 fp32; in 16-bit "
        "dtypes the accumulator is 3K/(2M) of native, so at M = 2K (the suite's bf16 cases) "
        "1.0x at N = 2K and 0.88x at N = 4K; 0.7x needs M >= 5K with N >= 4K",
    ),
    Target(
        "mlp_step_vs_native",
        "whole 4-layer GELU MLP training step >= 1.1x native eager",
        1.1,
        _vs("mlp_step", "step"),
        ceiling="1.24x: perfect fusion of every elementwise pass into the GEMMs; ~1.0-1.1x "
        "predicted for the per-layer kernels",
    ),
    Target(
        "fused_mlp_train_vs_native",
        "fused narrow MLP training step (manualbp.FusedMLP, 32 -> 64 x4 ReLU -> 16, 2^18 rows, "
        "MSE + SGD) >= 3x native eager samples/s",
        3.0,
        _vs("fused_mlp_step", "step", ("native",), NARROW_GOAL_SHAPE, named=True),
        ceiling="> 3x: natively the step is launch- and elementwise-bound (a GEMM and an "
        "elementwise launch per layer and pass); fused, one pass over X, T and the saved "
        "activations",
    ),
    Target(
        "fused_mlp_train_vs_compile",
        "fused narrow MLP training step (same shape) >= 2x torch.compile samples/s (default "
        "mode and mode='max-autotune', each where measured)",
        2.0,
        _vs(
            "fused_mlp_step",
            "step",
            ("compile", "compile_max_autotune"),
            NARROW_GOAL_SHAPE,
            named=True,
        ),
        ceiling="> 2x: compile keeps one GEMM launch per layer and per gradient",
    ),
    Target(
        "fused_mlp_infer_vs_native",
        "fused narrow MLP inference (forward under torch.inference_mode, same shape) >= 4x "
        "native eager samples/s",
        4.0,
        _vs("fused_mlp_infer", "infer", ("native",), NARROW_GOAL_SHAPE, named=True),
        ceiling="> 4x: one launch reading X and writing y, against a GEMM and an elementwise "
        "launch per layer",
    ),
    Target(
        "second_order_vs_native_bf16",
        "second-order training step (3 -> 64 x4 -> 1, softplus / sin, 2^18 points, eikonal and "
        "force-matching losses, bf16) >= 3x native eager samples/s",
        3.0,
        _vs("second_order_step", "step", ("native",), {"dtype": "bf16"}, named=True),
        ceiling="compute-bound (> 10x) if every (M, 64) intermediate stayed on chip; predicted "
        "~3.2x for the shipped 8-launch design: it moves ~56 (M, 64) tensors a step (launch "
        "arguments summed) against native's ~179 in ~120 launches (aten ops' inputs + outputs, "
        "counted on CPU at 4096 rows; docs/derivations.md section 10)",
    ),
    Target(
        "second_order_vs_native_tf32",
        "second-order training step (same cases, fp32 with TF32 matmuls on both sides) >= 2x "
        "native eager samples/s",
        2.0,
        _vs("second_order_step", "step", ("native",), {"dtype": "fp32_tf32"}, named=True),
        ceiling="as the bf16 step: predicted ~3.2x (the same tensors at twice the bytes on "
        "both sides; the step stays memory-bound: 52.6 GFLOP against ~3.8 GB moved)",
    ),
] + [
    Target(
        key,
        f"CPU reference path: {what}: manualbp / native time <= {goal:g}x "
        "(1 thread, interleaved repetitions, medians)",
        goal,
        _time_ratio(key),
        lower_is_better=True,
        path="reference",
        ceiling="1.0x: the same aten ops; the rest is Python and autograd overhead per call",
    )
    for key, (goal, what) in REFERENCE.items()
]


def _fmt(value: float, unit: str) -> str:
    return f"{value:.1f}%" if unit == "%" else f"{value:.3f}x"


def evaluate_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per target, with the figures it rests on."""
    measures_triton = doc.get("label", "").endswith("runs its Triton kernels")
    out = []
    for t in TARGETS:
        entry: dict[str, Any] = {"key": t.key, "target": t.text}
        entry |= {f: getattr(t, f) for f in ("bound", "unit", "lower_is_better", "path", "ceiling")}
        out.append(entry)
        values = list(t.collect(doc)) if t.path != "triton" or measures_triton else None
        if not values:
            why = "no case it needs ran"
            if values is None:
                why = f"this run does not measure the Triton kernels ({doc.get('label')})"
            entry.update(verdict=NOT_MEASURED, detail=f"not measured: {why}")
            continue
        badness = (lambda wv: -wv[1]) if t.lower_is_better else (lambda wv: wv[1])
        ok = [(w, v) for w, v in values if (v <= t.bound if t.lower_is_better else v >= t.bound)]
        bad = sorted([(w, v) for w, v in values if (w, v) not in ok], key=badness)
        worst = min(values, key=badness)  # the first of ``bad`` where any falls short
        detail = f"{len(ok)}/{len(values)} meet it; worst {_fmt(worst[1], t.unit)} at {worst[0]}"
        if bad:
            detail += "; short: " + ", ".join(f"{w} ({_fmt(v, t.unit)})" for w, v in bad[:4])
            detail += f", ... {len(bad) - 4} more" if len(bad) > 4 else ""
        entry.update(verdict=SHORT if bad else PASS, n_measured=len(values), n_met=len(ok))
        entry["worst"] = {"where": worst[0], "value": worst[1]}
        entry["values"] = [{"where": w, "value": v} for w, v in values]
        entry["detail"] = detail
    return out
