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
* **The cases to cover**, one table per op (:data:`LINEAR_CASES`, :data:`MSE_CASES`, gathered
  in :data:`CASES`), read off the activation registry: ``manualbp check`` runs them row by row
  and the parity and gradcheck tests cross them with their shapes and layouts, so a case added
  here is checked by both. :func:`parity` holds a case's op (``ours``) to its oracle
  (``native``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from manualbp.activations import ACTIVATIONS, get_activation

__all__ = ["ACTIVATION_CASES", "ACTIVATION_NAMES", "CASES", "Case", "DEFAULT_SLOPE",
           "DEFAULT_TOLERANCES", "LINEAR_CASES", "MSE_CASES", "MSE_TARGETS", "REDUCTIONS",
           "SUM_ULPS", "Comparison", "LinearCase", "MSECase", "allowed_error",
           "assert_close_through_sum", "compare", "default_param", "linear_abs_sums",
           "native_activation", "native_linear", "native_linear_mse_loss", "native_mse_loss",
           "parity"]  # fmt: skip

# --------------------------------------------------------------------------------------------
# What to cover
# --------------------------------------------------------------------------------------------
DEFAULT_SLOPE = 0.01  # functional.linear's and nn.LeakyReLU's default negative_slope
NEGATIVE_SLOPE = -0.5  # a slope that flips the sign of y (leaky ReLU then saves z, not y)

#: Every activation of the registry, and ``None`` (no activation).
ACTIVATION_NAMES: list[str | None] = [None, *ACTIVATIONS]


def default_param(activation: str | None) -> float:
    """The parameter ``activation`` runs at by default (its module's: softplus's beta 1, sin's
    omega 1), or :data:`DEFAULT_SLOPE` for an activation without one."""
    act = get_activation(activation)
    return act.param_default if act is not None and act.slope_attr else DEFAULT_SLOPE


#: ``(activation, negative_slope)``: every activation at its default parameter, and those with a
#: negative slope also at a negative one (their backward then keeps another tensor).
ACTIVATION_CASES: list[tuple[str | None, float]] = [
    *((name, default_param(name)) for name in ACTIVATION_NAMES),
    *((a.name, NEGATIVE_SLOPE) for a in ACTIVATIONS.values() if a.slope_attr == "negative_slope"),
]

#: The reductions of ``mse_loss`` / ``linear_mse_loss``.
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")

#: The target layouts of the MSE cases: the target's shape for an input of shape
#: ``(rows, cols)``. ``row`` and ``column`` broadcast (with native's warning); ``expanded`` is a
#: ``(1, cols)`` leaf that the loss sees expanded to the input's shape (a stride-0 view).
MSE_TARGETS: dict[str, Callable[[int, int], tuple[int, ...]]] = {
    "same": lambda rows, cols: (rows, cols),
    "row": lambda rows, cols: (cols,),
    "column": lambda rows, cols: (rows, 1),
    "expanded": lambda rows, cols: (1, cols),
}


@dataclass(frozen=True)
class LinearCase:
    """A case of ``functional.linear``: its activation (``None``: none), negative slope and
    whether it has a bias."""

    op: ClassVar[str] = "linear"
    grad_names: ClassVar[tuple[str, ...]] = ("dX", "dW", "db")

    activation: str | None
    negative_slope: float = DEFAULT_SLOPE
    bias: bool = True

    @property
    def variant(self) -> str:  # its name in check's table and in test ids
        act = str(self.activation)
        if self.negative_slope != default_param(self.activation):
            act += f"({self.negative_slope:g})"
        return f"{act}, {'bias' if self.bias else 'no bias'}"

    def native(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return native_linear(x, weight, bias, self.activation, self.negative_slope)

    def ours(self) -> Callable[..., Tensor]:
        from manualbp import functional  # the op under test; never the oracle's

        act, slope = self.activation, self.negative_slope
        return lambda x, w, b=None: functional.linear(x, w, b, act, negative_slope=slope)

    def inputs(self, draw: Callable[..., Tensor], small: bool) -> tuple[list, tuple[int, ...]]:
        """The case's tensors (``None``: no bias) drawn by ``draw(*shape)``, and its output's
        shape. A 3-D input: the leading dims flatten into one batch (dW, db sum over both)."""
        lead, k, n = ((2, 3), 4, 5) if small else ((3, 9), 13, 11)
        return [draw(*lead, k), draw(n, k), draw(n) if self.bias else None], (*lead, n)

    @property
    def quick(self) -> bool:
        """In ``manualbp check --quick``: every non-default slope (with bias), and a few
        activations (with bias; no activation also without)."""
        if self.negative_slope != default_param(self.activation):
            return self.bias
        return self.activation in (None, "relu", "gelu") and (self.bias or self.activation is None)

    @property
    def quick_gradgradcheck(self) -> bool:
        """gradgradcheck in ``--quick`` too: no activation and GELU, with bias."""
        return self.activation in (None, "gelu") and self.bias

    def skip(self, dtype: torch.dtype, interpreted: bool) -> str | None:
        """Why the case cannot be checked in ``dtype`` (``interpreted``: the kernels under
        Triton's CPU interpreter), if it cannot."""
        if interpreted and dtype == torch.bfloat16:
            return "Triton's CPU interpreter cannot run bf16 tl.dot; checked on CUDA only"
        return None

    def abs_sums(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, grad_out: Tensor
    ) -> list[Tensor]:
        """The sums over absolute values bounding the rounding of ``y``, ``dX``, ``dW`` and
        ``db`` (float64, for the upstream gradient ``grad_out``): :func:`linear_abs_sums`, the
        forward's carried through the activation by ``|act'(Z)|``."""
        with torch.enable_grad():
            x64, w64 = x.detach().double(), weight.detach().double()
            b64 = None if bias is None else bias.detach().double()
            z = F.linear(x64, w64, b64).requires_grad_(True)
            y = native_activation(self.activation, self.negative_slope)(z)
            (dz,) = torch.autograd.grad(y, z, grad_out.double(), retain_graph=True)
            (slope,) = torch.autograd.grad(y, z, torch.ones_like(y))
        forward, *grads = linear_abs_sums(x, weight, bias, dz)
        return [forward * slope.abs(), *grads]


@dataclass(frozen=True)
class MSECase:
    """A case of ``functional.mse_loss``: its reduction and target layout (:data:`MSE_TARGETS`)."""

    op: ClassVar[str] = "mse_loss"
    grad_names: ClassVar[tuple[str, ...]] = ("d input", "d target")

    reduction: str
    target: str = "same"

    def target_shape(self, rows: int, cols: int) -> tuple[int, ...]:  # the leaf's
        return MSE_TARGETS[self.target](rows, cols)

    def target_seen(self, target: Tensor, rows: int, cols: int) -> Tensor:
        """What the loss is called with: ``target``, expanded to ``(rows, cols)`` if so laid out."""
        return target.expand(rows, cols) if self.target == "expanded" else target

    @property
    def variant(self) -> str:  # its name in check's table and in test ids
        target = "" if self.target == "same" else f", {self.target} target"
        return self.reduction + target

    def native(self, input: Tensor, target: Tensor) -> Tensor:
        return native_mse_loss(input, self.target_seen(target, *input.shape), self.reduction)

    def ours(self) -> Callable[..., Tensor]:
        from manualbp import functional  # the op under test; never the oracle's

        return lambda x, t: functional.mse_loss(x, self.target_seen(t, *x.shape), self.reduction)

    def inputs(self, draw: Callable[..., Tensor], small: bool) -> tuple[list, tuple[int, ...]]:
        rows, cols = (3, 4) if small else (17, 23)
        inputs = [draw(rows, cols), draw(*self.target_shape(rows, cols))]
        return inputs, (rows, cols) if self.reduction == "none" else ()

    @property
    def quick(self) -> bool:
        """In ``manualbp check --quick``: same-shape targets."""
        return self.target == "same"

    @property
    def quick_gradgradcheck(self) -> bool:
        """gradgradcheck in ``--quick`` too: the mean."""
        return self.reduction == "mean"

    def skip(self, dtype: torch.dtype, interpreted: bool) -> str | None:
        return None  # checkable in every dtype

    def abs_sums(self, input: Tensor, target: Tensor, grad_out: Tensor) -> list[Tensor | None]:
        """The sums over absolute values bounding the rounding of the loss, ``d input`` and
        ``d target`` (float64; ``None`` where nothing is summed): the loss's squares, and the
        per-element input gradients the target's gradient sums over its broadcast dims."""
        diff = input.detach().double() - self.target_seen(target.detach().double(), *input.shape)
        n = max(diff.numel(), 1)
        squares = diff.square().sum()
        loss = {"mean": squares / n, "sum": squares, "none": None}[self.reduction]
        grads = (2 * diff * grad_out.double()).abs() / (n if self.reduction == "mean" else 1)
        return [loss, None, None if self.target == "same" else grads.sum_to_size(target.shape)]


#: The cases of ``functional.linear``: every activation case, with and without bias.
LINEAR_CASES: tuple[LinearCase, ...] = tuple(
    LinearCase(act, slope, bias) for act, slope in ACTIVATION_CASES for bias in (True, False)
)

#: The cases of ``functional.mse_loss``: every reduction with every target layout.
MSE_CASES: tuple[MSECase, ...] = tuple(MSECase(r, t) for r in REDUCTIONS for t in MSE_TARGETS)

#: Every op's cases, table after table: what ``manualbp check`` runs. A case is anything with
#: ``op``, ``variant``, ``grad_names``, ``native``, ``abs_sums``, ``ours``, ``inputs``,
#: ``quick``, ``quick_gradgradcheck`` and ``skip``, as the two classes above.
Case = LinearCase | MSECase
CASES: tuple[Case, ...] = (*LINEAR_CASES, *MSE_CASES)

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
    """:func:`compare` through a sum: ``AssertionError`` naming how many elements are off."""
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
    name: str | None, negative_slope: float | None = None
) -> Callable[[Tensor], Tensor]:
    """The native module each fused activation stands for (``nn.Identity`` for ``None``);
    at parameter ``negative_slope`` (``None``: its default); ``ValueError`` for a name the
    registry does not know."""
    act = get_activation(name)
    return nn.Identity() if act is None else act.native_module(negative_slope)


def native_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    negative_slope: float | None = None,
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


# --------------------------------------------------------------------------------------------
# A case held to its oracle
# --------------------------------------------------------------------------------------------
def _output_and_grads(
    fn: Callable[..., Tensor], inputs: Sequence[Tensor | None], grad_out: Tensor
) -> list[Tensor | None]:
    """``[fn(*inputs), *gradients]`` on fresh leaves (``None`` for an input that is ``None``)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    with torch.enable_grad():
        out = fn(*leaves)
        grads = iter(torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out))
    return [out, *(None if t is None else next(grads) for t in leaves)]


def parity(
    fn: Callable[..., Tensor],
    case: LinearCase | MSECase,
    inputs: Sequence[Tensor | None],
    grad_out: Tensor,
) -> dict[str, Comparison]:
    """``fn`` (the op of ``case`` under test) against the case's native oracle on ``inputs``:
    the output (``"forward"``) and, for the upstream gradient ``grad_out``, the gradient of
    each input (named by ``case.grad_names``; ``None`` inputs get none), each within
    :func:`allowed_error`: native in float64 is the exact value, ``case.abs_sums`` the sums."""
    got = _output_and_grads(fn, inputs, grad_out)
    want = _output_and_grads(case.native, inputs, grad_out)
    inputs64 = [None if t is None else t.double() for t in inputs]
    exact = _output_and_grads(case.native, inputs64, grad_out.double())
    sums = case.abs_sums(*inputs, grad_out)  # type: ignore[arg-type]
    names = ("forward", *case.grad_names)
    return {
        name: compare(g, w, exact=e, abs_sum=s)
        for name, g, w, e, s in zip(names, got, want, exact, sums, strict=True)
        if g is not None and w is not None
    }
