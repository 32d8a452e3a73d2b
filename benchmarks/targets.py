"""The performance targets, judged from the measured results: pass / fall short / not measured.

Each target names the cases and modes it is judged on; it passes when every measured instance
meets it, falls short when any does not (the worst ones are listed), and is "not measured" when
nothing it needs was measured in this run.

Two kinds: the GPU targets (``path="triton"``) are judged only on a run that measures the
Triton kernels; the host-overhead and reference-path goals (``path="reference"``,
:data:`REFERENCE_GOALS`, the cases of :mod:`benchmarks.host_cases`) are judged on the CPU run
that measures them, as the time ratio manualbp / native (lower is better).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["REFERENCE_GOALS", "TARGETS", "evaluate_targets"]

PASS, SHORT, NOT_MEASURED = "pass", "fall short", "not measured"

# Goals of the CPU run's host-overhead and reference-path cases (benchmarks/host_cases.py):
# the most manualbp's fwd+bwd time may be, as a multiple of native PyTorch's, on one thread.
REFERENCE_GOALS: dict[str, float] = {
    "host_linear_tiny": 1.3,  # Linear, input 8x32, 32 -> 32
    "host_mse_tiny": 1.3,  # mse_loss on 8x32
    "ref_linear_gelu": 1.10,  # Linear+GELU 256x1024 -> 1024 fp32
    "ref_linear_gelu_zstd8": 1.2,  # the same, pre-activations of std ~8 (GELU' subnormals)
    "ref_mse_4m": 1.05,  # mse_loss on 4M (2^22) fp32 elements
}
REFERENCE_TEXT: dict[str, str] = {
    "host_linear_tiny": "tiny Linear (input 8x32, 32->32) fwd+bwd",
    "host_mse_tiny": "tiny mse_loss (8x32) fwd+bwd",
    "ref_linear_gelu": "Linear+GELU 256x1024->1024 fp32 fwd+bwd",
    "ref_linear_gelu_zstd8": "Linear+GELU 256x1024->1024 fp32 fwd+bwd, pre-activations std ~8",
    "ref_mse_4m": "mse_loss fwd+bwd on 4M fp32 elements",
}


@dataclass(frozen=True)
class Target:
    """One target: ``collect(doc)`` yields ``(where, value)``; it is met when ``value >= bound``
    (``lower_is_better``: ``value <= bound``)."""

    key: str
    text: str
    bound: float
    unit: str
    collect: Callable[[dict[str, Any]], Iterator[tuple[str, float]]]
    lower_is_better: bool = False
    path: str = "triton"  # "triton": judged on runs of the Triton kernels; "reference": any
    ceiling: str = ""  # the best any kernel could do, from bytes and FLOPs, and why


def _ran(case: dict[str, Any], mode: str, provider: str) -> dict[str, Any] | None:
    r = case.get("results", {}).get(mode, {}).get(provider)
    return r if r is not None and r.get("status") == "ran" else None


def _speedup(
    doc: dict[str, Any], group: str, mode: str, other: str, pred: Callable[[dict[str, Any]], bool]
) -> Iterator[tuple[str, float]]:
    for c in doc["cases"]:
        if c["group"] != group or not pred(c["params"]):
            continue
        value = c.get("speedups", {}).get(mode, {}).get(f"manualbp_vs_{other}")
        if value is not None:
            yield f"{c['name']} {mode}", value


# The shapes the "Linear on the GPU" issue states its Linear+GELU goals on: GEMM-bound (the MLP
# up-projection: fusion can gain at most ~1.03x there) and fusion-bound (a narrow layer).
GEMM_BOUND_SHAPE = {"M": 8192, "K": 4096, "N": 16384}
FUSION_BOUND_SHAPE = {"M": 65536, "K": 1024, "N": 1024}


def _at(shape: dict[str, int]) -> Callable[[dict[str, Any]], bool]:
    return lambda p: all(p.get(k) == v for k, v in shape.items())


def _linear_gelu(
    other: str, shape: dict[str, int] | None = None
) -> Callable[[dict[str, Any]], Iterator[tuple[str, float]]]:
    """``manualbp_vs_<other>`` of the Linear+GELU cases, fwd+bwd (at ``shape`` only, if given)."""
    at = _at(shape or {})
    return lambda doc: _speedup(
        doc, "linear", "fwd+bwd", other, lambda p: p["activation"] == "gelu" and at(p)
    )


def _linear_gelu_vs(
    others: tuple[str, ...], shape: dict[str, int]
) -> Callable[[dict[str, Any]], Iterator[tuple[str, float]]]:
    """``manualbp_vs_<other>`` of the Linear+GELU cases at ``shape``, fwd+bwd, each of
    ``others`` named."""

    def collect(doc: dict[str, Any]) -> Iterator[tuple[str, float]]:
        for other in others:
            for where, value in _linear_gelu(other, shape)(doc):
                yield f"{where} vs {other}", value

    return collect


def _plain_linear(doc: dict[str, Any]) -> Iterator[tuple[str, float]]:
    yield from _speedup(doc, "linear", "fwd+bwd", "native", lambda p: p["activation"] is None)


def _linear_pct_of_bound(doc: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """manualbp's % of the bound (benchmarks/bounds.py) of every Linear case, fwd+bwd."""
    for c in doc["cases"]:
        if c["group"] != "linear":
            continue
        r = _ran(c, "fwd+bwd", "manualbp")
        if r is not None and r.get("pct_of_bound") is not None:
            yield f"{c['name']} fwd+bwd", r["pct_of_bound"]


def _gemm_pct(doc: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """Mode ``gemms``: the Linear's three GEMMs alone, manualbp's kernels against
    ``torch.matmul`` at the same shapes and layouts: 100 * time(torch.matmul) / time(manualbp)."""
    for c in doc["cases"]:
        if c["group"] != "linear" or "gemms" not in c["modes"]:
            continue
        value = c.get("speedups", {}).get("gemms", {}).get("manualbp_vs_native")
        if value is not None:
            yield f"{c['name']} gemms", 100.0 * value


def _time_ratio(goal: str) -> Callable[[dict[str, Any]], Iterator[tuple[str, float]]]:
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


def _pct(group: str, mode: str, min_numel: int = 0):
    def collect(doc: dict[str, Any]) -> Iterator[tuple[str, float]]:
        for c in doc["cases"]:
            if c["group"] != group or c["params"].get("numel", 1 << 62) < min_numel:
                continue
            r = _ran(c, mode, "manualbp")
            if r is not None and r.get("pct_of_ceiling") is not None:
                yield c["name"], r["pct_of_ceiling"]

    return collect


# The fused narrow MLP's goals (issue 15) are stated at one shape: hidden width 64, 4 hidden
# layers, 2^18 rows (every dtype measured there is judged).
NARROW_GOAL_SHAPE = {"width": 64, "num_hidden_layers": 4, "M": 1 << 18}


def _narrow_speedup(
    group: str, mode: str, others: tuple[str, ...]
) -> Callable[[dict[str, Any]], Iterator[tuple[str, float]]]:
    """``manualbp_vs_<other>`` of the fused-MLP cases at :data:`NARROW_GOAL_SHAPE`, for each
    of ``others`` measured (torch.compile: default mode and max-autotune alike)."""

    def collect(doc: dict[str, Any]) -> Iterator[tuple[str, float]]:
        for c in doc["cases"]:
            p = c["params"]
            if c["group"] != group or any(p.get(k) != v for k, v in NARROW_GOAL_SHAPE.items()):
                continue
            for other in others:
                value = c.get("speedups", {}).get(mode, {}).get(f"manualbp_vs_{other}")
                if value is not None:
                    yield f"{c['name']} {mode} vs {other}", value

    return collect


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
        "x",
        _linear_gelu("native"),
        ceiling=(
            "native's own kernels (cuBLAS + the elementwise pass) are a candidate: 1.0x "
            "reachable; roofline 1.03x (GEMM-bound) to 1.38x (M=65536, K=N=1024 bf16, GELU passes"
            " fused away)"
        ),
    ),
    Target(
        "linear_gelu_vs_compile",
        "Linear+GELU fwd+bwd >= 1.0x torch.compile (every shape and dtype measured)",
        1.0,
        "x",
        _linear_gelu("compile"),
        ceiling=(
            "as for native eager (compile fuses the same elementwise passes): 1.0x reachable with"
            " the cuBLAS candidate"
        ),
    ),
    Target(
        "linear_gelu_gemm_bound",
        "Linear+GELU fwd+bwd >= 1.0x native eager and >= 1.0x torch.compile at M=8192, "
        "K=4096, N=16384 (GEMM-bound)",
        1.0,
        "x",
        _linear_gelu_vs(("native", "compile"), GEMM_BOUND_SHAPE),
        ceiling="roofline 1.03x: 3 GEMMs of 0.55 PFLOP; the GELU passes are ~3% of the bytes",
    ),
    Target(
        "linear_gelu_fusion_bound",
        "Linear+GELU fwd+bwd >= 1.15x native eager at M=65536, K=N=1024 (fusion-bound)",
        1.15,
        "x",
        _linear_gelu("native", FUSION_BOUND_SHAPE),
        ceiling=(
            "roofline 1.38x (both GELU passes fused into the GEMMs); 1.13x with the forward "
            "epilogue alone (the backward's dZ pass kept)"
        ),
    ),
    Target(
        "linear_plain_vs_native",
        "plain Linear fwd+bwd >= 1.0x native (cuBLAS): never slower (every shape and dtype "
        "measured)",
        1.0,
        "x",
        _plain_linear,
        ceiling="1.0x: the same GEMMs (cuBLAS is a candidate); the bias gradient fused saves < 2%",
    ),
    Target(
        "gemm_pct_of_matmul",
        "manualbp's Triton GEMMs alone >= 95% of torch.matmul at the same shapes "
        "(100 * time(torch.matmul) / time(manualbp), mode gemms)",
        95.0,
        "%",
        _gemm_pct,
        ceiling="~100%: the same FLOPs and operands as torch.matmul",
    ),
    Target(
        "linear_pct_of_bound",
        "every Linear case fwd+bwd >= 85% of its bound (best time from its FLOPs and least "
        "bytes at the measured ceilings, benchmarks/bounds.py)",
        85.0,
        "%",
        _linear_pct_of_bound,
        ceiling="100% by definition of the bound",
    ),
    Target(
        "mse_bandwidth",
        "MSE fwd+bwd >= 85% of the measured copy bandwidth (sizes >= 2^24 elements; "
        "smaller ones are latency-bound)",
        85.0,
        "%",
        _pct("mse", "fwd+bwd", 1 << 24),
        ceiling="100% of the copy bandwidth",
    ),
    Target(
        "mse_vs_native",
        "MSE fwd+bwd >= 2.2x native eager (every size measured)",
        2.2,
        "x",
        lambda doc: _speedup(doc, "mse", "fwd+bwd", "native", lambda p: True),
        ceiling=(
            "2.33x: 12 bytes per fp32 element (read x, t; write the gradient; g = 1 scales "
            "nothing) against native's 28 (16 forward: x, t, the unreduced loss written and read;"
            " 12 backward)"
        ),
    ),
    Target(
        "sgd_vs_fused",
        "SGD step >= torch's fused SGD (speedup >= 1.0x)",
        1.0,
        "x",
        lambda doc: _speedup(doc, "sgd", "step", "native_fused", lambda p: True),
        ceiling=(
            "1.0x: the same bytes per parameter as torch's fused SGD (read p, g, buf; write p, "
            "buf); only launch overhead differs"
        ),
    ),
    Target(
        "sgd_bandwidth",
        "SGD step >= 85% of the measured copy bandwidth",
        85.0,
        "%",
        _pct("sgd", "step"),
        ceiling="100% of the copy bandwidth",
    ),
    Target(
        "linear_mse_peak_memory",
        "LinearMSELoss peak memory <= 1.0x the unfused nn.Linear + nn.MSELoss: never more "
        "(output width >= 4096; max_memory_allocated during fwd+bwd)",
        1.0,
        "x",
        _linear_mse_memory,
        lower_is_better=True,
        ceiling=(
            "(|dX| + |dW| + the fp32 dW accumulator (4 B x |W|, in 16-bit dtypes) + one chunk) / "
            "(native: y and dL/dy, 2 |y|): 0.56x at M=8192, K=4096, N=8192 fp32; in 16-bit "
            "dtypes the accumulator is 3K/(2M) of native, so at M = 2K (the suite's bf16 cases) "
            "1.0x at N = 2K and 0.88x at N = 4K; 0.7x needs M >= 5K with N >= 4K"
        ),
    ),
    Target(
        "mlp_step_vs_native",
        "whole 4-layer GELU MLP training step >= 1.1x native eager",
        1.1,
        "x",
        lambda doc: _speedup(doc, "mlp_step", "step", "native", lambda p: True),
        ceiling=(
            "1.24x: perfect fusion of every elementwise pass into the GEMMs; ~1.0-1.1x predicted "
            "for the per-layer kernels"
        ),
    ),
    Target(
        "fused_mlp_train_vs_native",
        "fused narrow MLP training step (manualbp.FusedMLP, 32 -> 64 x4 ReLU -> 16, 2^18 rows, "
        "MSE + SGD) >= 3x native eager samples/s",
        3.0,
        "x",
        _narrow_speedup("fused_mlp_step", "step", ("native",)),
        ceiling=(
            "> 3x: natively the step is launch- and elementwise-bound (a GEMM and an elementwise "
            "launch per layer and pass); fused, one pass over X, T and the saved activations"
        ),
    ),
    Target(
        "fused_mlp_train_vs_compile",
        "fused narrow MLP training step (same shape) >= 2x torch.compile samples/s (default "
        "mode and mode='max-autotune', each where measured)",
        2.0,
        "x",
        _narrow_speedup("fused_mlp_step", "step", ("compile", "compile_max_autotune")),
        ceiling="> 2x: compile keeps one GEMM launch per layer and per gradient",
    ),
    Target(
        "fused_mlp_infer_vs_native",
        "fused narrow MLP inference (forward under torch.inference_mode, same shape) >= 4x "
        "native eager samples/s",
        4.0,
        "x",
        _narrow_speedup("fused_mlp_infer", "infer", ("native",)),
        ceiling=(
            "> 4x: one launch reading X and writing y, against a GEMM and an elementwise launch "
            "per layer"
        ),
    ),
] + [
    Target(
        key,
        f"CPU reference path: {REFERENCE_TEXT[key]}: manualbp / native time <= {goal:g}x "
        "(1 thread, interleaved repetitions, medians)",
        goal,
        "x",
        _time_ratio(key),
        lower_is_better=True,
        path="reference",
        ceiling="1.0x: the same aten ops; the rest is Python and autograd overhead per call",
    )
    for key, goal in REFERENCE_GOALS.items()
]


def _fmt(value: float, unit: str) -> str:
    return f"{value:.1f}%" if unit == "%" else f"{value:.3f}x"


def evaluate_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per target, with the figures it rests on."""
    measures_triton = doc.get("label", "").endswith("runs its Triton kernels")
    out = []
    for t in TARGETS:
        entry: dict[str, Any] = {
            "key": t.key,
            "target": t.text,
            "bound": t.bound,
            "unit": t.unit,
            "lower_is_better": t.lower_is_better,
            "path": t.path,
            "ceiling": t.ceiling,
        }
        if t.path == "triton" and not measures_triton:
            entry.update(
                verdict=NOT_MEASURED,
                detail=f"not measured: this run does not measure the Triton kernels "
                f"({doc.get('label')})",
            )
            out.append(entry)
            continue
        values = list(t.collect(doc))
        if not values:
            entry.update(verdict=NOT_MEASURED, detail="not measured: no case it needs ran")
            out.append(entry)
            continue
        ok = [(w, v) for w, v in values if (v <= t.bound if t.lower_is_better else v >= t.bound)]
        bad = [(w, v) for w, v in values if (w, v) not in ok]
        bad.sort(key=lambda wv: -wv[1] if t.lower_is_better else wv[1])
        worst = (
            bad[0] if bad else min(values, key=lambda wv: -wv[1] if t.lower_is_better else wv[1])
        )
        entry.update(
            verdict=PASS if not bad else SHORT,
            n_measured=len(values),
            n_met=len(ok),
            worst={"where": worst[0], "value": worst[1]},
            values=[{"where": w, "value": v} for w, v in values],
            detail=(
                f"{len(ok)}/{len(values)} meet it; worst {_fmt(worst[1], t.unit)} at {worst[0]}"
                + (
                    ""
                    if not bad
                    else "; short: "
                    + ", ".join(f"{w} ({_fmt(v, t.unit)})" for w, v in bad[:4])
                    + (f", ... {len(bad) - 4} more" if len(bad) > 4 else "")
                )
            ),
        )
        out.append(entry)
    return out
