"""Holding manualbp to native PyTorch: tolerances per dtype and the native oracle of each op.

``manualbp check`` and the test suite share this module, so both judge manualbp by the same
rules:

* **The oracle** is native PyTorch, never manualbp's own autograd code: :func:`native_linear`
  is ``F.linear`` followed by the activation's native module (``nn.GELU(approximate="tanh")``
  for ``"gelu_tanh"``, from the registry's :meth:`~manualbp.activations.Activation.native_module`),
  :func:`native_mse_loss` is ``F.mse_loss``. Run in float64 on the same inputs, the same ops
  give the "exact" value a rounding error is measured against.
* **The tolerance** per element of a result in dtype ``d``::

      |got - want| <= atol(d) + rtol(d) * |want|    (torch.testing.assert_close's defaults)
                    + ulps * eps(d) * sum|terms|    (where the value is a sum; ulps = 4)
                    + |want - exact|                (native's own rounding error, when known)

  The second term: an elementwise derivative evaluated in another order than aten's vectorised
  kernel may differ from it by an ulp or two, and a sum of such terms (a GEMM's dot product, a
  bias gradient, a loss reduction) taken in its own order may then differ by up to
  ``ulps * eps * sum |term|``; ``sum|terms|`` is the same sum over absolute values (``|dZ| @
  |W|`` for ``dX = dZ W``; :func:`linear_abs_sums` gives those of the Linear layer). The third:
  in float16/bfloat16 native rounds ``Z`` (or ``x - y``) to the dtype before the activation
  (before squaring) while a fused kernel keeps it in fp32 and rounds once; both are correct,
  and the more accurate one may differ from native by native's error, which is measured
  (``exact``) rather than guessed. Anything beyond that is a bug.
* **The activations to cover**, read off the registry: :data:`ACTIVATION_NAMES` (every
  activation and ``None``) and :data:`ACTIVATION_CASES` (also a negative slope for those that
  take one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from manualbp.activations import ACTIVATIONS, get_activation

__all__ = [
    "ACTIVATION_CASES",
    "ACTIVATION_NAMES",
    "DEFAULT_SLOPE",
    "DEFAULT_TOLERANCES",
    "SUM_ULPS",
    "Comparison",
    "allowed_error",
    "assert_close_through_sum",
    "compare",
    "linear_abs_sums",
    "native_activation",
    "native_linear",
    "native_linear_mse_loss",
    "native_mse_loss",
]

# --------------------------------------------------------------------------------------------
# What to cover
# --------------------------------------------------------------------------------------------
DEFAULT_SLOPE = 0.01  # functional.linear's and nn.LeakyReLU's default negative_slope
NEGATIVE_SLOPE = -0.5  # a slope that flips the sign of y (leaky ReLU then saves z, not y)

#: Every activation of the registry, and ``None`` (no activation).
ACTIVATION_NAMES: list[str | None] = [None, *ACTIVATIONS]

#: ``(activation, negative_slope)``: every activation at the default slope, and those that take
#: a slope also at a negative one (their backward may then keep another tensor).
ACTIVATION_CASES: list[tuple[str | None, float]] = [
    *((name, DEFAULT_SLOPE) for name in ACTIVATION_NAMES),
    *((a.name, NEGATIVE_SLOPE) for a in ACTIVATIONS.values() if a.slope_attr is not None),
]

# --------------------------------------------------------------------------------------------
# Tolerances
# --------------------------------------------------------------------------------------------
#: torch.testing.assert_close's default ``(rtol, atol)`` per dtype.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}

#: Ulps per summed term a sum taken in another order may differ by (module docstring).
SUM_ULPS = 4


def allowed_error(
    want: Tensor,
    *,
    abs_sum: Tensor | None = None,
    exact: Tensor | None = None,
    ulps: int = SUM_ULPS,
) -> Tensor:
    """The largest ``|got - want|`` allowed per element, in float64 (module docstring).

    ``abs_sum``: where ``want`` is a sum, the same sum over absolute values (broadcastable to
    ``want``). ``exact``: the same native op on the same inputs in float64.
    """
    rtol, atol = DEFAULT_TOLERANCES[want.dtype]
    want64 = want.detach().double()
    allowed = atol + rtol * want64.abs()
    if abs_sum is not None:
        allowed = allowed + ulps * torch.finfo(want.dtype).eps * abs_sum.detach().double()
    if exact is not None:
        allowed = allowed + (want64 - exact.detach().double()).abs()
    return allowed


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare` found: ``ok``, the largest ``|got - want|`` and, if not ok, why."""

    ok: bool
    max_error: float
    detail: str = ""


def compare(
    got: Tensor,
    want: Tensor,
    *,
    abs_sum: Tensor | None = None,
    exact: Tensor | None = None,
    ulps: int = SUM_ULPS,
) -> Comparison:
    """``got`` against ``want`` within :func:`allowed_error`; the shapes and dtypes must be
    equal, a NaN must meet a NaN and an infinity an equal infinity."""
    if got.shape != want.shape or got.dtype != want.dtype:
        why = f"got {got.dtype} {tuple(got.shape)}, want {want.dtype} {tuple(want.shape)}"
        return Comparison(False, float("inf"), why)
    if got.numel() == 0:
        return Comparison(True, 0.0)
    g, w = got.detach().double(), want.detach().double()
    err = (g - w).abs()
    same = (g == w) | (g.isnan() & w.isnan())  # == also matches equal infinities
    excess = err - allowed_error(want, abs_sum=abs_sum, exact=exact, ulps=ulps)
    bad = ~same & ~(excess <= 0)  # a NaN excess (one side NaN or inf) is bad too
    max_error = float(torch.where(same, torch.zeros_like(err), err).max())
    if not bool(bad.any()):
        return Comparison(True, max_error)
    why = (
        f"{int(bad.sum())} of {got.numel()} elements differ beyond the dtype's tolerance; "
        f"worst excess {excess[bad].max().item():.3g}"
    )
    return Comparison(False, max_error, why)


def assert_close_through_sum(
    got: Tensor, want: Tensor, abs_sum: Tensor, ulps: int = SUM_ULPS
) -> None:
    """``assert_close`` at the dtype's default tolerances, plus the rounding a sum can add:
    ``ulps * eps * abs_sum``, ``abs_sum`` being the same sum over absolute values (see the
    module docstring). Raises ``AssertionError`` naming how many elements are off."""
    result = compare(got, want, abs_sum=abs_sum, ulps=ulps)
    if not result.ok:
        raise AssertionError(result.detail)


def linear_abs_sums(
    x: Tensor, weight: Tensor, bias: Tensor | None, grad_z: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sums over absolute values that bound the rounding of Linear's sums, in float64:
    ``|X| |W|^T + |b|`` for ``Z``, ``|dZ| |W|`` for ``dX``, ``|dZ|^T |X|`` for ``dW`` and
    ``|dZ|`` summed over the rows for ``db``. ``x`` (and ``grad_z``) may have leading batch
    dims, which the weight and bias gradients sum over."""
    x64, w64 = x.detach().double().abs(), weight.detach().double().abs()
    b64 = None if bias is None else bias.detach().double().abs()
    dz64 = grad_z.detach().double().abs()
    rows = dz64.reshape(-1, dz64.shape[-1])
    dw = rows.mT @ x64.reshape(-1, x64.shape[-1])
    return F.linear(x64, w64, b64), dz64 @ w64, dw, rows.sum(0)


# --------------------------------------------------------------------------------------------
# The native oracle
# --------------------------------------------------------------------------------------------
def native_activation(
    name: str | None, negative_slope: float = DEFAULT_SLOPE
) -> Callable[[Tensor], Tensor]:
    """The native module each fused activation stands for (``nn.Identity`` for ``None``);
    ``ValueError`` for a name the registry does not know."""
    act = get_activation(name)
    return nn.Identity() if act is None else act.native_module(negative_slope)


def native_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = DEFAULT_SLOPE,
) -> Tensor:
    """What ``functional.linear`` computes, natively: ``act(F.linear(x, weight, bias))``."""
    return native_activation(activation, negative_slope)(F.linear(x, weight, bias))


def native_mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """What ``functional.mse_loss`` computes, natively: ``F.mse_loss``."""
    return F.mse_loss(input, target, reduction=reduction)


def native_linear_mse_loss(
    x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, reduction: str = "mean"
) -> Tensor:
    """What ``functional.linear_mse_loss`` computes, natively: ``F.mse_loss(F.linear(...))``."""
    return F.mse_loss(F.linear(x, weight, bias), target, reduction=reduction)
