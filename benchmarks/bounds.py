"""The best achievable time of a case (its *bound*), from its FLOP and byte counts.

A roofline lower bound at the ceilings the run measures (:mod:`benchmarks.ceilings`):
``best time = max(FLOPs / matmul ceiling, bytes / copy bandwidth)`` (the larger term, not the
sum: compute and memory traffic overlap in a good kernel), ``pct_of_bound = 100 * best time /
measured time``. The bytes are the least traffic of the dataflow itself: every operand read
once, every result written once, and what autograd must keep for the backward pass (a GELU
layer's pre-activation Z, a fused-MLP layer's saved tensor: ``Activation.saved_for``) written
and read once. In a perfectly fused MLP step dZ, dY and H_{l-1} of the weight gradients stay on
chip. FLOPs: ``2*M*k*n`` per GEMM; activations, loss and optimizer are not counted.
"""

from __future__ import annotations

import itertools

__all__ = ["best_time_s", "linear_min_bytes", "mlp_flops", "mlp_infer_min_bytes",
           "mlp_step_min_bytes", "second_order_flops", "second_order_min_bytes"]  # fmt: skip

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


def _mlp_params(dims: tuple[int, ...], bias: bool) -> tuple[int, int]:
    """``(weights, biases)``: element counts of every layer's ``W`` (n, k) and ``b`` (n,)."""
    pairs = list(itertools.pairwise(dims))
    return sum(k * n for k, n in pairs), (sum(n for _, n in pairs) if bias else 0)


def mlp_flops(M: int, dims: tuple[int, ...], *, train: bool, input_grad: bool = False) -> float:
    """GEMM FLOPs of an MLP of ``dims = (k_0, n_0, ..., n_{L-1})`` on ``M`` rows: the forward
    (``2*M*k*n`` a layer) and, for training, dX and dW (the first layer's dX only with
    ``input_grad``)."""
    kn = sum(k * n for k, n in itertools.pairwise(dims))
    if not train:
        return 2.0 * M * kn
    return 6.0 * M * kn - (0.0 if input_grad else 2.0 * M * dims[0] * dims[1])


def mlp_step_min_bytes(
    M: int,
    dims: tuple[int, ...],
    elsize: int,
    *,
    bias: bool = True,
    momentum: bool = False,
    out_preact: bool = False,
) -> float:
    """Least bytes of one training step (forward, MSE, backward, SGD) of an MLP of ``dims``:
    X and T read; each hidden layer's saved tensor and the prediction (and the output layer's z
    when ``out_preact``) written and read once; parameters read by forward (W, b) and backward
    (W), gradients written, SGD's read/write of the parameters (and momentum buffers)."""
    hidden = sum(dims[1:-1])
    n_out = dims[-1]
    rows = dims[0] + n_out + 2 * hidden + 2 * n_out + (2 * n_out if out_preact else 0)
    w, b = _mlp_params(dims, bias)
    params = (w + b) + w + (w + b)  # forward reads W, b; backward reads W; writes dW, db
    params += (5 if momentum else 3) * (w + b)  # SGD: read p, g (, buf); write p (, buf)
    return float((M * rows + params) * elsize)


def second_order_flops(M: int, dims: tuple[int, ...]) -> float:
    """GEMM FLOPs of a training step with the MLP's input gradient in the loss: forward
    (``2Mkn`` a layer), the input gradient's chain (``2Mkn``) and its weight gradients
    (``2Mkn``), the second order's R-op (``2Mkn``), its recomputed upstream gradients
    (``2Mkn``) and weight gradients (``2Mkn``), and the forward's backward with the R-op's
    gradients injected (chain and weight gradients, ``4Mkn``): ``16 M sum(k n)``."""
    return 16.0 * M * sum(k * n for k, n in itertools.pairwise(dims))


def second_order_min_bytes(M: int, dims: tuple[int, ...], elsize: int) -> float:
    """Least bytes of that step: read X (and the targets, at most X's and one more column);
    the parameters read, their gradients written, SGD's momentum read-modify-write. Every
    (M, width) intermediate could stay on chip (recomputed per row tile): the step is
    compute-bound at any M."""
    w, b = _mlp_params(dims, True)
    return float((M * (2 * dims[0] + 1) + 7 * (w + b)) * elsize)


def mlp_infer_min_bytes(M: int, dims: tuple[int, ...], elsize: int, *, bias: bool = True) -> float:
    """Least bytes of an inference forward: read X and the parameters, write the output."""
    w, b = _mlp_params(dims, bias)
    return float((M * (dims[0] + dims[-1]) + w + b) * elsize)


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
