"""Activation functions and their derivatives as ``@triton.jit`` helpers.

The activation is selected by an integer ``tl.constexpr`` code (see :data:`ACTIVATIONS`), so
each kernel specialisation contains only the branch it needs. All helpers compute in the dtype
of their input (the kernels pass the fp32 or fp64 accumulator) and use only core ``tl`` ops
(``exp``, ``erf``, ``where``) that both the CPU interpreter and the CUDA backend support.

Derivatives follow PyTorch's own backward formulas, including NaN propagation.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Activation name -> constexpr code used by the kernels.
ACTIVATIONS: dict[str | None, int] = {
    None: 0,
    "relu": 1,
    "gelu": 2,
    "gelu_tanh": 3,
    "silu": 4,
    "tanh": 5,
    "sigmoid": 6,
    "leaky_relu": 7,
}

ACT_NONE: tl.constexpr = tl.constexpr(0)
ACT_RELU: tl.constexpr = tl.constexpr(1)
ACT_GELU: tl.constexpr = tl.constexpr(2)
ACT_GELU_TANH: tl.constexpr = tl.constexpr(3)
ACT_SILU: tl.constexpr = tl.constexpr(4)
ACT_TANH: tl.constexpr = tl.constexpr(5)
ACT_SIGMOID: tl.constexpr = tl.constexpr(6)
ACT_LEAKY_RELU: tl.constexpr = tl.constexpr(7)

# 1/sqrt(2), 1/sqrt(2*pi), sqrt(2/pi) and the tanh-GELU cubic coefficient.
SQRT1_2: tl.constexpr = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)
SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)
GELU_KAPPA: tl.constexpr = tl.constexpr(0.044715)


def activation_code(activation: str | None) -> int:
    """The constexpr code of ``activation`` (``ValueError`` for an unknown name)."""
    try:
        return ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(
            f"unknown activation {activation!r}; expected one of {list(ACTIVATIONS)}"
        ) from None


@triton.jit
def _sigmoid(x):
    # 1 / (1 + exp(-x)): exp overflows to inf for very negative x, giving exactly 0.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _expm1(y):
    # exp(y) - 1 without the cancellation of the plain formula near 0 (Kahan's trick:
    # (u - 1) * y / log(u) corrects the rounding of u = exp(y)); libdevice's expm1 is not
    # available in the interpreter. NaN propagates.
    u = tl.exp(y)
    um1 = u - 1.0
    return tl.where(u == 1.0, y, tl.where(um1 == -1.0, -1.0, um1 * y / tl.log(u)))


@triton.jit
def _tanh(x):
    # tanh(|x|) from exp(-2|x|) in (0, 1], which never overflows; libdevice's tanh is not
    # available in the interpreter. 1 - exp(-2|x|) cancels near 0:
    if x.dtype == tl.float64:
        # fp64 (small tiles, registers to spare): -m / (2 + m), m = expm1(-2|x|), to ~1 ulp.
        m = _expm1(-2.0 * tl.abs(x))
        t = -m / (2.0 + m)
    else:
        # fp32, in the epilogue of big tensor-core tiles: (1 - e) / (1 + e). Near 0 this is
        # accurate to ~eps absolutely, not relatively; the cheaper accurate forms tried (the
        # expm1 above, a Taylor branch) made the 128x128 / 128x64 GELU-tanh tiles spill.
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def apply_activation(z, negative_slope, ACTIVATION: tl.constexpr):
    """``act(z)`` for the activation selected by the constexpr code ``ACTIVATION``."""
    if ACTIVATION == ACT_RELU:
        # where(z < 0, 0, z) keeps NaN (torch.relu(nan) is nan).
        y = tl.where(z < 0, 0.0, z)
    elif ACTIVATION == ACT_GELU:
        y = 0.5 * z * (1.0 + tl.erf(z * SQRT1_2))
    elif ACTIVATION == ACT_GELU_TANH:
        inner = SQRT_2_OVER_PI * (z + GELU_KAPPA * z * z * z)
        y = 0.5 * z * (1.0 + _tanh(inner))
    elif ACTIVATION == ACT_SILU:
        y = z * _sigmoid(z)
    elif ACTIVATION == ACT_TANH:
        y = _tanh(z)
    elif ACTIVATION == ACT_SIGMOID:
        y = _sigmoid(z)
    elif ACTIVATION == ACT_LEAKY_RELU:
        y = tl.where(z > 0, z, z * negative_slope)
    else:
        y = z
    return y


@triton.jit
def activation_grad(g, s, negative_slope, ACTIVATION: tl.constexpr):
    """``dZ = g * act'(.)`` given the saved tensor ``s``.

    ``s`` is the activation output y for relu, leaky_relu (slope >= 0), tanh and sigmoid, and
    the pre-activation z for gelu, gelu_tanh, silu and leaky_relu (slope < 0); leaky_relu's
    formula is the same for both because sign(y) == sign(z) when the slope is >= 0.
    """
    if ACTIVATION == ACT_RELU:
        # aten threshold_backward: where(y <= 0, 0, g); a NaN output passes g through.
        dz = tl.where(s <= 0, 0.0, g)
    elif ACTIVATION == ACT_GELU:
        cdf = 0.5 * (1.0 + tl.erf(s * SQRT1_2))
        pdf = tl.exp(-0.5 * s * s) * INV_SQRT_2PI
        dz = g * (cdf + s * pdf)
    elif ACTIVATION == ACT_GELU_TANH:
        # aten GeluBackward, tanh branch.
        s_sq = s * s
        inner = SQRT_2_OVER_PI * (s + GELU_KAPPA * s_sq * s)
        t = _tanh(inner)
        left = 0.5 * s
        right = 1.0 + t
        left_derivative = 0.5 * right
        tanh_derivative = 1.0 - t * t
        inner_derivative = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_KAPPA * s_sq)
        right_derivative = left * tanh_derivative * inner_derivative
        dz = g * (left_derivative + right_derivative)
    elif ACTIVATION == ACT_SILU:
        sig = _sigmoid(s)
        dz = g * sig * (1.0 + s * (1.0 - sig))
    elif ACTIVATION == ACT_TANH:
        dz = g * (1.0 - s * s)
    elif ACTIVATION == ACT_SIGMOID:
        dz = g * (1.0 - s) * s
    elif ACTIVATION == ACT_LEAKY_RELU:
        dz = tl.where(s > 0, g, g * negative_slope)
    else:
        dz = g
    return dz
