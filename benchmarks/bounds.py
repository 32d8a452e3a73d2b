"""The best achievable time of a case (its *bound*), from its FLOP and byte counts.

A roofline lower bound: no implementation can do the case's FLOPs faster than the measured
matmul rate, nor move its bytes faster than the measured copy bandwidth, so

    best time = max(FLOPs / matmul ceiling, bytes / copy bandwidth)

and ``pct_of_bound = 100 * best time / measured time`` (100% = at the bound). The ceilings are
the ones the run measures at start-up (:mod:`benchmarks.ceilings`): ``torch.matmul`` of two
8192x8192 matrices in the case's dtype and a 1 GiB device-to-device copy. The bound is the
larger of the two terms, not their sum: compute and memory traffic overlap in a good kernel.

The byte counts are the least traffic of the dataflow itself: every operand read once and every
result written once (what a perfectly fused, perfectly cached implementation of that dataflow
moves); intermediate results that the autograd dataflow must keep (the pre-activation Z of a
GELU layer, saved for the backward pass) count once written and once read.
"""

from __future__ import annotations

__all__ = ["best_time_s", "linear_min_bytes", "PREACT_ACTIVATIONS", "OUTPUT_ACTIVATIONS"]

# What the backward pass of ``act(x W^T + b)`` reads to form act': the pre-activation Z (its
# derivative is no function of the output) or the output Y (relu: Y > 0 iff Z > 0).
PREACT_ACTIVATIONS = frozenset({"gelu", "gelu_tanh", "silu"})
OUTPUT_ACTIVATIONS = frozenset({"relu", "tanh", "sigmoid"})


def linear_min_bytes(
    M: int, K: int, N: int, act: str | None, elsize: int, *, gemms: bool = False
) -> dict[str, float]:
    """Least bytes moved by each mode of ``y = act(x W^T + b)``, x (M, K), W (N, K), b (N,).

    * ``fwd``: read X, W, b; write Y, and Z too when backward needs the pre-activation;
    * ``bwd``: read dY, the saved Y or Z (with an activation), X and W; write dX, dW, db;
    * ``fwd+bwd``: the sum;
    * ``gemms`` (when asked for): the three GEMMs alone, each reading its two operands and
      writing its result: ``X W^T``, ``dY W`` and ``dY^T X``.
    """
    saved = 0 if act is None else M * N  # Z (or Y) read back by the backward pass
    stored = M * N if act in PREACT_ACTIVATIONS else 0  # Z written next to Y
    fwd = M * K + N * K + N + M * N + stored
    bwd = M * N + saved + M * K + N * K + M * K + N * K + N
    out = {"fwd": fwd * elsize, "bwd": bwd * elsize, "fwd+bwd": (fwd + bwd) * elsize}
    if gemms:
        out["gemms"] = 3 * (M * K + N * K + M * N) * elsize
    return {k: float(v) for k, v in out.items()}


def best_time_s(
    flops: float, nbytes: float, tflops: float | None, gbps: float | None
) -> float | None:
    """``max(flops / tflops, nbytes / gbps)`` in seconds; ``None`` when a ceiling that a
    nonzero term needs was not measured."""
    terms = []
    if flops:
        if not tflops:
            return None
        terms.append(flops / (tflops * 1e12))
    if nbytes:
        if not gbps:
            return None
        terms.append(nbytes / (gbps * 1e9))
    return max(terms) if terms else None
