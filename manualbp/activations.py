"""The activation registry: each fusable activation as one entry.

An entry holds the activation's name, its forward map, its hand-derived derivative, what that
derivative reads (the output or the pre-activation) and the native module ``convert`` folds.
Its Triton code lives under the same name in ``triton_kernels/_activations.py``. Everything
else (``convert``, the CLI, the tests) derives its list from :data:`ACTIVATIONS`: adding an
activation touches this file and the Triton one, nothing else (see CONTRIBUTING.md). An
activation *with its parameter* (the slope of leaky_relu) is an :class:`Act`, the one value
the ops pass around: :func:`bind` makes it.

Each derivative follows the formula PyTorch's own backward uses (so NaN and Inf
propagate as they do natively) and is written in plain, differentiable torch ops,
so that a backward built from it can itself be differentiated (double backward).
Derivations: ``docs/derivations.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from manualbp._mode import in_place_ok

__all__ = [
    "ACTIVATIONS", "Act", "Activation", "Sine", "activation_of_module", "bind", "get_activation",
]  # fmt: skip

Saved = Literal["output", "preact"]


@dataclass(frozen=True)
class Activation:
    """One fusable activation ``y = f(z)``: everything manualbp knows about it, in one place.

    Attributes:
        name: the string users pass (``activation="gelu"``); also the ``ACTIVATION``
            ``tl.constexpr`` the Triton kernels branch on (``triton_kernels/_activations.py``).
        forward: ``(z, p) -> y``, ``p`` the activation's parameter (see ``slope_attr``).
        grad: ``(dY, s, p) -> dZ = dY * f'(z)``, the hand-derived derivative read off the saved
            tensor ``s`` (see :meth:`saved_for`).
        saves: what ``grad`` reads: the output ``y`` (``"output"``) or the pre-activation
            ``z`` (``"preact"``).
        module: the native module type :func:`manualbp.convert` folds into this activation.
        module_attrs: attributes the native module must have for that (``approximate``).
        slope_attr: the module attribute holding the activation's one parameter, if it has one:
            ``LeakyReLU.negative_slope``, ``Softplus.beta``, :class:`Sine`'s ``omega``. The
            ops take it as ``negative_slope`` (its first use), whatever it means.
        param_default: that parameter's default (the module's).
        grad2: ``(T, s, p) -> T * d f'(.)/d s``: the derivative of ``grad``'s ``f'`` with respect
            to the saved tensor itself, ``f''(z)`` where ``s`` is z; where ``s`` is y, ``f'(y)``
            differentiated in y (tanh: -2y). What the fused MLP's second-order backward feeds
            back into the saved tensor (``None``: 0, as for the piecewise-linear ones).
    """

    name: str
    forward: Callable[[Tensor, float], Tensor]
    grad: Callable[[Tensor, Tensor, float], Tensor]
    saves: Saved
    module: type[nn.Module]
    module_attrs: Mapping[str, object] = field(default_factory=dict)
    slope_attr: str | None = None
    param_default: float = 0.01
    grad2: Callable[[Tensor, Tensor, float], Tensor] | None = None

    def saved_for(self, negative_slope: float) -> Saved:
        """What backward keeps for this activation at ``negative_slope``: ``y`` or ``z``."""
        if self.slope_attr is not None and negative_slope < 0:
            return "preact"  # a negative slope flips the sign of y: y no longer tells z > 0
        return self.saves

    def native_module(self, negative_slope: float | None = None) -> nn.Module:
        """The native module computing this activation (the oracle tests compare against), at
        parameter ``negative_slope`` (``None``: its default)."""
        kwargs = dict(self.module_attrs)
        if self.slope_attr is not None:
            param = self.param_default if negative_slope is None else negative_slope
            kwargs[self.slope_attr] = param
        return self.module(**kwargs)

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is exactly this activation's native module."""
        return type(module) is self.module and all(
            getattr(module, k, None) == v for k, v in self.module_attrs.items()
        )


_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_PDF_FLOOR = 1e-34  # exp(-u^2) at or below this (exp(-80) = 1.8e-35 included) is 0
_GELU_TANH_BETA = math.sqrt(2.0 / math.pi)
_GELU_TANH_KAPPA = 0.044715


def _relu_grad(g: Tensor, y: Tensor, _: float) -> Tensor:
    # y = max(z, 0): y' = 1 where y > 0, else 0: g where y > 0, else 0 (a NaN output lets the
    # gradient through). One elementwise op computing exactly that: aten's threshold_backward
    # (a boolean mask and where cost ~20x as much on CPUs); differentiable, batchable.
    return torch.ops.aten.threshold_backward(g, y, 0.0)


def _leaky_relu_grad(g: Tensor, s: Tensor, slope: float) -> Tensor:
    # y = z if z > 0 else slope*z; for slope >= 0, sign(y) == sign(z), so s may be y or z.
    return torch.where(s > 0, g, g * slope)


def _tanh_grad(g: Tensor, y: Tensor, _: float) -> Tensor:
    # d tanh(z)/dz = 1 - tanh(z)^2 = 1 - y^2
    return g * (1 - y * y)


def _sigmoid_grad(g: Tensor, y: Tensor, _: float) -> Tensor:
    # d sigma(z)/dz = sigma(z)(1 - sigma(z)) = y(1 - y)
    return g * (1 - y) * y


def _gelu_grad(g: Tensor, z: Tensor, _: float) -> Tensor:
    # y = z * Phi(z): y' = Phi(z) + z * phi(z), phi(z) = exp(-z^2/2) / sqrt(2 pi).
    # Where -z^2/2 < -80 (|z| > 12.6) exp(-z^2/2) is taken as exactly 0: z * phi(z) < 1e-33
    # is far below the rounding of Phi(z) there, a subnormal never arises (on CPUs a
    # subnormal costs ~100x: pre-activations of std 8 made a step 4-5x slower), and
    # z = +-inf still gives 0 * inf = nan, as aten does.
    if not in_place_ok(g, z):  # recorded for double backward, or batched: out-of-place ops
        cdf = 0.5 * (1 + torch.erf(z * _SQRT1_2))
        expo = -0.5 * z * z
        pdf = torch.exp(expo.masked_fill(expo < -80.0, -math.inf)) * _INV_SQRT_2PI
        return g * (cdf + z * pdf)
    # In place, with u = z / sqrt 2: y' = (1 + erf(u) + 2 z exp(-u^2) / sqrt(2 pi)) / 2.
    # exp runs on u^2 clamped to 80 (exp of very negative or infinite arguments takes a slow
    # path on CPUs), and what lies at the clamp (or below 1e-34) is then set to 0 by a
    # threshold: no masks either, which are slow there too. erf, not ndtr, for Phi: ndtr
    # is several times slower and makes subnormals in the far left tail.
    u = torch.mul(z, _SQRT1_2)
    pdf_unscaled = torch.mul(u, u).clamp_(max=80.0).neg_().exp_()
    F.threshold_(pdf_unscaled, _GELU_PDF_FLOOR, 0.0)
    grad = u.erf_().addcmul_(pdf_unscaled, z, value=2.0 * _INV_SQRT_2PI).add_(1.0)
    return grad.mul_(g).mul_(0.5)


def _gelu_tanh_grad(g: Tensor, z: Tensor, _: float) -> Tensor:
    # y = z/2 * (1 + tanh(u)), u = beta*(z + kappa*z^3):
    # y' = (1 + tanh u)/2 + z/2 * (1 - tanh^2 u) * beta*(1 + 3*kappa*z^2)
    t = torch.tanh(_GELU_TANH_BETA * (z + _GELU_TANH_KAPPA * z * z * z))
    left = 0.5 * (1 + t)
    right = 0.5 * z * (1 - t * t) * (_GELU_TANH_BETA * (1 + 3 * _GELU_TANH_KAPPA * z * z))
    return g * (left + right)


def _silu_grad(g: Tensor, z: Tensor, _: float) -> Tensor:
    # y = z * sigma(z): y' = sigma(z) * (1 + z * (1 - sigma(z)))
    s = torch.sigmoid(z)
    if not in_place_ok(g, z):  # recorded for double backward, or batched: out-of-place ops
        return g * (s * (1 + z * (1 - s)))
    return torch.rsub(s, 1.0).mul_(z).add_(1.0).mul_(s).mul_(g)


# Second derivatives: T * d f'/d s, f' as grad reads it off the saved tensor s (f''(z) where s is
# z). Derivations: docs/derivations.md, section 10.
def _gelu_grad2(t: Tensor, z: Tensor, _: float) -> Tensor:
    # y' = Phi(z) + z phi(z), phi' = -z phi: y'' = phi(z) (2 - z^2) (the pdf floor as in y').
    expo = -0.5 * z * z
    pdf = torch.exp(expo.masked_fill(expo < -80.0, -math.inf)) * _INV_SQRT_2PI
    return t * (pdf * (2 - z * z))


def _gelu_tanh_grad2(t: Tensor, z: Tensor, _: float) -> Tensor:
    # y' = (1 + th)/2 + z/2 (1 - th^2) u',  th = tanh(u),  u = beta (z + kappa z^3):
    # y'' = (1 - th^2) (u' + z/2 (u'' - 2 th u'^2)),
    # u' = beta (1 + 3 kappa z^2),  u'' = 6 beta kappa z
    th = torch.tanh(_GELU_TANH_BETA * (z + _GELU_TANH_KAPPA * z * z * z))
    u1 = _GELU_TANH_BETA * (1 + 3 * _GELU_TANH_KAPPA * z * z)
    u2 = (6 * _GELU_TANH_BETA * _GELU_TANH_KAPPA) * z
    return t * ((1 - th * th) * (u1 + 0.5 * z * (u2 - 2 * th * u1 * u1)))


def _silu_grad2(t: Tensor, z: Tensor, _: float) -> Tensor:
    # y' = s (1 + z (1 - s)), s = sigma(z): y'' = s (1 - s) (2 + z (1 - 2 s))
    s = torch.sigmoid(z)
    return t * (s * (1 - s) * (2 + z * (1 - 2 * s)))


def _tanh_grad2(t: Tensor, y: Tensor, _: float) -> Tensor:
    return t * (-2 * y)  # f' = 1 - y^2 read off y: d f'/dy = -2y (f'' = -2y f')


def _sigmoid_grad2(t: Tensor, y: Tensor, _: float) -> Tensor:
    return t * (1 - 2 * y)  # f' = y (1 - y) read off y: d f'/dy = 1 - 2y (f'' = (1 - 2y) f')


SOFTPLUS_THRESHOLD = 20.0  # nn.Softplus's default: beyond beta z > 20 it is the identity


def _softplus_grad(g: Tensor, z: Tensor, beta: float) -> Tensor:
    # y = log(1 + e^{beta z}) / beta: y' = e^{beta z} / (1 + e^{beta z}), 1 on the identity
    # branch (beta z > 20). One elementwise op computing exactly that: aten's softplus_backward
    # (differentiable, batchable; five ops of exp/div/where cost ~5x as much).
    return torch.ops.aten.softplus_backward(g, z, beta, SOFTPLUS_THRESHOLD)


def _softplus_grad2(t: Tensor, z: Tensor, beta: float) -> Tensor:
    # y'' = beta s (1 - s), s = sigma(beta z); 0 on the identity branch (aten: where x < 20).
    x = z * beta
    s = torch.sigmoid(x)
    return torch.where(x < SOFTPLUS_THRESHOLD, t * (s * (1 - s) * beta), 0.0)


class Sine(nn.Module):
    """``sin(omega * x)``, SIREN's activation (torch has no module for it): what
    :func:`manualbp.convert` fuses as the ``"sin"`` activation."""

    def __init__(self, omega: float = 1.0) -> None:
        super().__init__()
        self.omega = omega

    def forward(self, input: Tensor) -> Tensor:
        return torch.sin(self.omega * input)

    def extra_repr(self) -> str:
        return f"omega={self.omega}"


def _sin_grad(g: Tensor, z: Tensor, omega: float) -> Tensor:
    return g * torch.cos(omega * z) * omega  # d sin(w z)/dz = w cos(w z), autograd's order


def _sin_grad2(t: Tensor, z: Tensor, omega: float) -> Tensor:
    return t * (-(omega * omega) * torch.sin(omega * z))  # (sin(w z))'' = -w^2 sin(w z)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("relu", lambda z, _: F.relu(z), _relu_grad, "output", nn.ReLU),
        Activation(
            "gelu",
            lambda z, _: F.gelu(z),
            _gelu_grad,
            "preact",
            nn.GELU,
            {"approximate": "none"},
            grad2=_gelu_grad2,
        ),
        Activation(
            "gelu_tanh",
            lambda z, _: F.gelu(z, approximate="tanh"),
            _gelu_tanh_grad,
            "preact",
            nn.GELU,
            {"approximate": "tanh"},
            grad2=_gelu_tanh_grad2,
        ),
        Activation(
            "silu", lambda z, _: F.silu(z), _silu_grad, "preact", nn.SiLU, grad2=_silu_grad2
        ),
        Activation(
            "tanh", lambda z, _: torch.tanh(z), _tanh_grad, "output", nn.Tanh, grad2=_tanh_grad2
        ),
        Activation(
            "sigmoid",
            lambda z, _: torch.sigmoid(z),
            _sigmoid_grad,
            "output",
            nn.Sigmoid,
            grad2=_sigmoid_grad2,
        ),
        Activation(
            "leaky_relu",
            lambda z, s: F.leaky_relu(z, s),
            _leaky_relu_grad,
            "output",
            nn.LeakyReLU,
            slope_attr="negative_slope",
        ),
        Activation(
            "softplus",
            lambda z, beta: F.softplus(z, beta, SOFTPLUS_THRESHOLD),
            _softplus_grad,
            "preact",
            nn.Softplus,
            {"threshold": SOFTPLUS_THRESHOLD},
            slope_attr="beta",
            param_default=1.0,
            grad2=_softplus_grad2,
        ),
        Activation(
            "sin",
            lambda z, omega: torch.sin(omega * z),
            _sin_grad,
            "preact",
            Sine,
            slope_attr="omega",
            param_default=1.0,
            grad2=_sin_grad2,
        ),
    )
}


def get_activation(name: str | None) -> Activation | None:
    """The :class:`Activation` called ``name`` (``None`` for no activation)."""
    if name is None:
        return None
    if not isinstance(name, str) or name not in ACTIVATIONS:
        choices = ", ".join(["None", *map(repr, ACTIVATIONS)])
        raise ValueError(f"unknown activation {name!r}; expected one of {choices}")
    return ACTIVATIONS[name]


def activation_of_module(module: nn.Module) -> tuple[Activation, float] | None:
    """``(activation, negative_slope)`` when ``module`` is a native activation module of the
    registry (exactly its type: a subclass may compute something else), else ``None``."""
    cls = type(module)
    for act in ACTIVATIONS.values():
        if act.module is cls and act.matches(module):
            slope = float(getattr(module, act.slope_attr)) if act.slope_attr else 0.01
            return act, slope
    return None


class Act(NamedTuple):
    """An activation with its parameter: what an op applies. ``reads_preact``: whether its
    derivative reads the pre-activation z (else the output y), see :meth:`Activation.saved_for`."""

    fn: Activation
    slope: float
    reads_preact: bool

    @property
    def name(self) -> str:
        return self.fn.name

    def forward(self, z: Tensor) -> Tensor:
        return self.fn.forward(z, self.slope)

    def grad(self, g: Tensor, saved: Tensor) -> Tensor:
        """``dZ = g * f'(.)`` read off ``saved`` (z or y, as :attr:`reads_preact` says)."""
        return self.fn.grad(g, saved, self.slope)

    def grad2(self, t: Tensor, saved: Tensor) -> Tensor | None:
        """``t * d f'/d saved`` (:attr:`Activation.grad2`); ``None`` where it is 0."""
        return None if self.fn.grad2 is None else self.fn.grad2(t, saved, self.slope)


_BOUND: dict[tuple[str, float], Act] = {}


def resolve_param(name: str | None, value: float | None) -> float:
    """The parameter activation ``name`` runs at: ``value`` as a float, or (``None``) the
    activation's own default (leaky_relu's slope 0.01, softplus's beta and sin's omega 1); a
    placeholder 0.01 for activations without one."""
    if value is not None:
        if not isinstance(value, Real) or isinstance(value, bool):
            raise TypeError(f"negative_slope must be a real number, got {type(value).__name__}")
        return float(value)
    fn = ACTIVATIONS.get(name) if name is not None else None
    return fn.param_default if fn is not None and fn.slope_attr else 0.01


def bind(name: str | None, negative_slope: float | None = None) -> Act | None:
    """The :class:`Act` of registry activation ``name`` (``None``: no activation) at parameter
    ``negative_slope`` (kept only by activations that take one; ``None``: its default), made
    once per pair."""
    if name is None:
        return None
    act = _BOUND.get((name, negative_slope))
    if act is None:
        fn = get_activation(name)
        if fn.slope_attr is None:
            slope = 0.01
        else:
            slope = fn.param_default if negative_slope is None else float(negative_slope)
        act = Act(fn, slope, fn.saved_for(slope) == "preact")
        _BOUND[(name, negative_slope)] = act
    return act
