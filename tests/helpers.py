"""Independent references and input builders for the tests.

The oracle is always native PyTorch autograd (``F.linear`` + the native
activation, ``F.mse_loss``) or float64 math, never manualbp's own code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATION_NAMES = [None, "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "leaky_relu"]


def native_activation(name: str | None, negative_slope: float = 0.01) -> Callable[[Tensor], Tensor]:
    return {
        None: lambda z: z,
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
        "silu": F.silu,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "leaky_relu": lambda z: F.leaky_relu(z, negative_slope),
    }[name]


def native_linear(x, w, b, activation, negative_slope=0.01):
    return native_activation(activation, negative_slope)(F.linear(x, w, b))


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


# torch.testing.assert_close's default (rtol, atol) per dtype.
DEFAULT_TOLERANCES = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}


def assert_close_through_sum(got: Tensor, want: Tensor, abs_sum: Tensor, ulps: int = 4) -> None:
    """``assert_close`` at the dtype's default tolerances, plus the rounding a sum can add.

    An elementwise derivative evaluated in another order than aten's vectorised kernel
    may differ from it by an ulp or two; a sum (a GEMM's dot product, a bias gradient)
    of such terms may then differ by up to ``ulps * eps * sum |term|``, which
    ``abs_sum`` (the same sum over absolute values) bounds. Anything larger is a bug.
    """
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
    rtol, atol = DEFAULT_TOLERANCES[want.dtype]
    allowed = atol + rtol * want.abs() + ulps * torch.finfo(want.dtype).eps * abs_sum
    excess = (got - want).abs() - allowed
    bad = ~(excess <= 0) & ~(got.isnan() & want.isnan()) & ~(got == want)  # equal infs
    assert not bad.any(), (
        f"{int(bad.sum())} of {got.numel()} elements differ beyond the dtype's tolerance; "
        f"worst excess {excess[bad].max().item():.3g}"
    )
