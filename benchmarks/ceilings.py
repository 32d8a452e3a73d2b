"""The device's ceilings, measured at start-up in the run that uses them: the rate of
``torch.matmul`` of two ``n x n`` matrices per dtype (``n`` = 8192 on CUDA, 1024 on CPU; TFLOP/s)
and the bandwidth of a device-to-device ``copy_`` of 1 GiB (64 MiB on CPU; GB/s of the bytes
read plus written)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from benchmarks.timing import bench

__all__ = ["measure_ceilings", "DTYPE_NAMES"]

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
}


def _matmul_tflops(n: int, dtype: torch.dtype, device: torch.device, rep_ms: float) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    randn = lambda: torch.randn(n, n, device=device, dtype=dtype, generator=g)
    sets = [(randn(), randn()) for _ in range(2)]
    out = torch.empty(n, n, device=device, dtype=dtype)
    matmul = lambda ab: torch.matmul(ab[0], ab[1], out=out)
    t = bench(matmul, lambda s: s, sets, device, rep_ms=rep_ms, min_reps=5)
    return {
        "tflops": 2 * n**3 / (t.median_ms * 1e-3) / 1e12,
        "shape": [n, n, n],
        "median_ms": t.median_ms,
        "n_reps": t.n_reps,
    }


def _copy_gbps(nbytes: int, device: torch.device, rep_ms: float) -> dict:
    n = nbytes // 4
    src = [torch.ones(n, dtype=torch.float32, device=device) for _ in range(2)]
    dst = torch.empty(n, dtype=torch.float32, device=device)
    t = bench(lambda s: dst.copy_(s), lambda s: s, src, device, rep_ms=rep_ms, min_reps=5)
    return {
        "gbps": 2 * nbytes / (t.median_ms * 1e-3) / 1e9,
        "bytes_copied": nbytes,
        "bytes_moved_per_call": 2 * nbytes,
        "median_ms": t.median_ms,
        "n_reps": t.n_reps,
    }


def measure_ceilings(
    device: torch.device, dtypes: Iterable[torch.dtype], rep_ms: float = 100.0
) -> dict[str, Any]:
    """Matmul TFLOP/s for each dtype and copy GB/s on ``device``, with how they were measured."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    result: dict[str, Any] = {
        "matmul": {},
        "method": {
            "matmul": f"torch.matmul of two {n}x{n} matrices, 2*n^3 FLOPs per call, median",
            "bandwidth": "device-to-device copy_ of a buffer; bytes read + bytes written per "
            "call, median",
        },
    }
    for dtype in dtypes:
        name = DTYPE_NAMES[dtype]
        try:
            result["matmul"][name] = _matmul_tflops(n, dtype, device, rep_ms)
        except Exception as e:  # report it; the cases then have no percentage for this dtype
            result["matmul"][name] = {"tflops": None, "error": f"{type(e).__name__}: {e}"}
    try:
        result["bandwidth"] = _copy_gbps((1 << 30) if cuda else (64 << 20), device, rep_ms)
    except Exception as e:
        result["bandwidth"] = {"gbps": None, "error": f"{type(e).__name__}: {e}"}
    if cuda:
        torch.cuda.empty_cache()
    return result
