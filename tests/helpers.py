"""Independent references and input builders for the tests.

The oracle is always native PyTorch autograd (``F.linear`` + the native
activation, ``F.mse_loss``) or float64 math, never manualbp's own code; it and
the tolerances come from :mod:`manualbp.testing` (re-exported here), the input
builders are below. So do the tables of cases (``LINEAR_CASES``, ``MSE_CASES``) that the
parity and gradcheck tests cross with their shapes and layouts: ``manualbp check`` runs the
same tables.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The oracle, the tolerances and the cases live in the library, shared with ``manualbp check``.
from manualbp.testing import (
    ACTIVATION_CASES,
    ACTIVATION_NAMES,
    DEFAULT_TOLERANCES,
    LINEAR_CASES,
    MSE_CASES,
    REDUCTIONS,
    LinearCase,
    MSECase,
    assert_close_through_sum,
    linear_abs_sums,
    native_activation,
    native_linear,
    native_mse_loss,
)

__all__ = [
    "ACTIVATION_CASES",
    "ACTIVATION_NAMES",
    "DEFAULT_TOLERANCES",
    "LINEAR_CASES",
    "MSE_CASES",
    "REDUCTIONS",
    "LinearCase",
    "MSECase",
    "assert_close_through_sum",
    "clone_leaf",
    "count_launches",
    "leaf",
    "linear_abs_sums",
    "make_layout",
    "native_activation",
    "native_linear",
    "native_mse_loss",
]


def make_layout(shape: tuple[int, ...], layout: str, **kw) -> Tensor:
    """A tensor of ``shape`` laid out as ``contiguous``, ``noncontig`` (every other
    element of the last dim) or ``transposed`` (dims reversed in memory)."""
    if layout == "contiguous":
        return torch.randn(shape, **kw)
    if layout == "noncontig":
        base = torch.randn(*shape[:-1], 2 * shape[-1], **kw)
        return base[..., ::2]
    if layout == "transposed":
        if len(shape) == 1:  # a column of a matrix: stride 3
            return torch.randn(shape[0], 3, **kw)[:, 1]
        return torch.randn(tuple(reversed(shape)), **kw).permute(*reversed(range(len(shape))))
    raise ValueError(layout)


def leaf(t: Tensor) -> Tensor:
    """``t`` as a leaf that requires grad, keeping its strides."""
    return t.detach().requires_grad_(True)


def clone_leaf(t: Tensor) -> Tensor:
    """An independent copy of ``t`` with the same strides, requiring grad if ``t`` does."""
    if not t.requires_grad:
        return t.detach()  # never written to, so sharing it (stride-0 views too) is safe
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    out.copy_(t.detach())
    return out.requires_grad_(t.requires_grad)


def count_launches(monkeypatch, module, names: tuple[str, ...]) -> dict[str, int]:
    """How often each ``@triton.jit`` kernel ``module.<name>`` is launched (``kernel[grid](...)``)
    while the test runs: the kernels are wrapped for the test's duration."""
    counts = dict.fromkeys(names, 0)

    class Counted:
        def __init__(self, name: str) -> None:
            self.name, self.kernel = name, getattr(module, name)

        def __getitem__(self, grid):
            counts[self.name] += 1
            return self.kernel[grid]

    for name in names:
        monkeypatch.setattr(module, name, Counted(name))
    return counts
