"""The fused activations: their names, forward maps and hand-written derivatives.

Each derivative follows the formula PyTorch's own backward uses (so NaN and Inf
propagate as they do natively) and is written in plain, differentiable torch ops,
so that a backward built from it can itself be differentiated (double backward).
Derivations: ``docs/derivations.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "Activation", "get_activation", "saves"]

SavedKind = Literal["nothing", "output", "preact"]


@dataclass(frozen=True)
class Activation:
    """One fusable activation ``y = f(z)`` and its derivative ``f'``.

    ``grad`` maps ``(dY, s, negative_slope)`` to ``dZ = dY * f'(z)`` where ``s`` is the
    saved tensor: the output ``y`` when ``saves == "output"``, else the pre-activation ``z``.
    """

    name: str
    forward: Callable[[Tensor, float], Tensor]
    grad: Callable[[Tensor, Tensor, float], Tensor]
    saves: SavedKind


_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_BETA = math.sqrt(2.0 / math.pi)
_GELU_TANH_KAPPA = 0.044715


def _relu_grad(g: Tensor, y: Tensor, _: float) -> Tensor:
    # y = max(z, 0): y' = 1 where y > 0, else 0 (a NaN output lets the gradient through, as aten).
    return torch.where(y <= 0, torch.zeros_like(g), g)


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
    # y = z * Phi(z): y' = Phi(z) + z * phi(z)
    cdf = 0.5 * (1 + torch.erf(z * _SQRT1_2))
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return g * (cdf + z * pdf)


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
    return g * (s * (1 + z * (1 - s)))


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("relu", lambda z, _: F.relu(z), _relu_grad, "output"),
        Activation("gelu", lambda z, _: F.gelu(z), _gelu_grad, "preact"),
        Activation(
            "gelu_tanh", lambda z, _: F.gelu(z, approximate="tanh"), _gelu_tanh_grad, "preact"
        ),
        Activation("silu", lambda z, _: F.silu(z), _silu_grad, "preact"),
        Activation("tanh", lambda z, _: torch.tanh(z), _tanh_grad, "output"),
        Activation("sigmoid", lambda z, _: torch.sigmoid(z), _sigmoid_grad, "output"),
        Activation("leaky_relu", lambda z, s: F.leaky_relu(z, s), _leaky_relu_grad, "output"),
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


def saves(act: Activation | None, negative_slope: float) -> SavedKind:
    """What the backward of ``act`` needs kept: nothing, the output ``y`` or the input ``z``."""
    if act is None:
        return "nothing"
    if act.name == "leaky_relu" and negative_slope < 0:
        return "preact"  # a negative slope flips the sign of y, so y no longer tells z > 0
    return act.saves
