"""The activations of manualbp's registry (``manualbp/activations.py``) as ``@triton.jit`` code.

Each activation is two helpers named after its registry entry, ``<name>(z, slope)`` and
``<name>_grad(g, s, slope)``, and kernels select one with a string ``tl.constexpr``
``ACTIVATION`` (``"none"`` or a registry name), as Triton's tutorials do: each specialisation
contains only the branch it needs, and an unknown name fails at compile time. All helpers
compute in the dtype of their input (the kernels pass the fp32 or fp64 accumulator) and use
only core ``tl`` ops (``exp``, ``erf``, ``where``) that both the interpreter and the CUDA
backend support. Derivatives follow PyTorch's own backward formulas, NaN propagation included:
at +-inf, NaN, 0 and huge finite values every helper gives native's value (``gelu(-inf)`` is
NaN, ``gelu(inf)`` inf, as ``0.5 * z * (1 + erf(z / sqrt 2))`` is natively), in fp32 and fp64,
forward and derivative (``tests/kernels/test_linear_kernels.py``). The leaky_relu slope comes
in through :func:`slope_as`.

``s`` in the derivatives is the tensor the registry entry saves: the output y (relu, tanh,
sigmoid, leaky_relu with slope >= 0) or the pre-activation z (gelu, gelu_tanh, silu,
leaky_relu with slope < 0, softplus, sin). ``slope`` is the activation's one parameter, where it
has one: leaky_relu's negative slope, softplus's beta, sin's frequency. ``<name>_grad2(t, s,
slope)`` is ``t * d f'/d s``, for the fused MLP's second-order backward.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The registry's names (manualbp/activations.py: a test holds the two lists equal). Python code
# spells "no activation" None; the kernels' ACTIVATION constexpr spells it "none" (constexpr()).
NAMES = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "leaky_relu", "softplus", "sin")

# 1/sqrt(2), 1/sqrt(2*pi), sqrt(2/pi) and the tanh-GELU cubic coefficient.
SQRT1_2: tl.constexpr = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)
SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)
GELU_KAPPA: tl.constexpr = tl.constexpr(0.044715)
SOFTPLUS_THRESHOLD: tl.constexpr = tl.constexpr(20.0)  # nn.Softplus's default


def constexpr(activation: str | None) -> str:
    """The ``ACTIVATION`` constexpr for a registry name (``None``: no activation)."""
    return "none" if activation is None else activation


@triton.jit
def slope_as(negative_slope, dtype: tl.constexpr):
    """The leaky_relu slope, a kernel argument, in the accumulator's ``dtype``.

    Triton types a Python float argument as fp32 unless the parameter is annotated: the
    kernels declare ``negative_slope: tl.float64``, so compiled code gets the exact double
    (fp64 math then uses it as is, and fp32 math rounds it once, as PyTorch's fp32 and
    fp16/bf16 leaky_relu do). The CPU interpreter ignores the annotation and hands over the
    Python float itself, which ``tl.cast`` would turn into an fp32 constant first;
    ``tl.full`` makes the constant directly in ``dtype`` (and casts a tensor argument).
    """
    return tl.full([], negative_slope, dtype)


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
def _log1p(x):
    # log(1 + x) without the cancellation of the plain formula near 0 (Goldberg's trick: the
    # rounding of u = 1 + x corrected by x / (u - 1)); libdevice's log1p is not available in
    # the interpreter.
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))


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


# --------------------------------------------------------------------------------------------
# One pair of helpers per registry entry.
# --------------------------------------------------------------------------------------------
@triton.jit
def relu(z, slope):
    return tl.where(z < 0, 0.0, z)  # keeps NaN (torch.relu(nan) is nan)


@triton.jit
def relu_grad(g, y, slope):
    return tl.where(y <= 0, 0.0, g)  # aten threshold_backward: a NaN output passes g through


@triton.jit
def gelu(z, slope):
    return 0.5 * z * (1.0 + tl.erf(z * SQRT1_2))


@triton.jit
def gelu_grad(g, z, slope):
    cdf = 0.5 * (1.0 + tl.erf(z * SQRT1_2))
    pdf = tl.exp(-0.5 * z * z) * INV_SQRT_2PI
    return g * (cdf + z * pdf)


@triton.jit
def gelu_tanh(z, slope):
    inner = (z + z * z * z * GELU_KAPPA) * SQRT_2_OVER_PI
    return 0.5 * z * (1.0 + _tanh(inner))


@triton.jit
def gelu_tanh_grad(g, z, slope):
    # aten GeluBackward, tanh branch.
    z_sq = z * z
    t = _tanh((z + z_sq * z * GELU_KAPPA) * SQRT_2_OVER_PI)
    left_derivative = 0.5 * (1.0 + t)
    inner_derivative = (1.0 + z_sq * (3.0 * GELU_KAPPA)) * SQRT_2_OVER_PI
    right_derivative = 0.5 * z * (1.0 - t * t) * inner_derivative
    return g * (left_derivative + right_derivative)


@triton.jit
def silu(z, slope):
    return z * _sigmoid(z)


@triton.jit
def silu_grad(g, z, slope):
    sig = _sigmoid(z)
    return g * sig * (1.0 + z * (1.0 - sig))


@triton.jit
def tanh(z, slope):
    return _tanh(z)


@triton.jit
def tanh_grad(g, y, slope):
    return g * (1.0 - y * y)


@triton.jit
def sigmoid(z, slope):
    return _sigmoid(z)


@triton.jit
def sigmoid_grad(g, y, slope):
    return g * (1.0 - y) * y


@triton.jit
def leaky_relu(z, slope):
    return tl.where(z > 0, z, z * slope)


@triton.jit
def leaky_relu_grad(g, s, slope):
    # sign(y) == sign(z) for slope >= 0, so the formula holds whichever of y, z was saved.
    return tl.where(s > 0, g, g * slope)


@triton.jit
def softplus(z, beta):
    # log(1 + exp(beta z)) / beta, the identity beyond beta z > 20 (nn.Softplus's threshold).
    x = z * beta
    return tl.where(x > SOFTPLUS_THRESHOLD, z, _log1p(tl.exp(x)) / beta)


@triton.jit
def softplus_grad(g, z, beta):
    x = z * beta
    e = tl.exp(x)  # aten: exp(x) / (exp(x) + 1); inf / inf on the identity branch is not taken
    return tl.where(x > SOFTPLUS_THRESHOLD, g, g * e / (e + 1.0))


@triton.jit
def sin(z, omega):
    return tl.sin(omega * z)


@triton.jit
def sin_grad(g, z, omega):
    return g * tl.cos(omega * z) * omega


# Second derivatives: t * d f'/d s, f' read off the saved tensor s as the <name>_grad helpers
# read it (f''(z) where s is z; manualbp/activations.py's grad2).
@triton.jit
def gelu_grad2(t, z, slope):
    return t * (tl.exp(-0.5 * z * z) * INV_SQRT_2PI * (2.0 - z * z))


@triton.jit
def gelu_tanh_grad2(t, z, slope):
    th = _tanh((z + z * z * z * GELU_KAPPA) * SQRT_2_OVER_PI)
    u1 = (1.0 + z * z * (3.0 * GELU_KAPPA)) * SQRT_2_OVER_PI
    u2 = z * (6.0 * GELU_KAPPA) * SQRT_2_OVER_PI
    return t * ((1.0 - th * th) * (u1 + 0.5 * z * (u2 - 2.0 * th * u1 * u1)))


@triton.jit
def silu_grad2(t, z, slope):
    s = _sigmoid(z)
    return t * (s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s)))


@triton.jit
def tanh_grad2(t, y, slope):
    return t * (-2.0 * y)  # d(1 - y^2)/dy


@triton.jit
def sigmoid_grad2(t, y, slope):
    return t * (1.0 - 2.0 * y)  # d(y (1 - y))/dy


@triton.jit
def softplus_grad2(t, z, beta):
    x = z * beta
    s = _sigmoid(x)
    return tl.where(x < SOFTPLUS_THRESHOLD, t * (s * (1.0 - s) * beta), 0.0)


@triton.jit
def sin_grad2(t, z, omega):
    return t * (-(omega * omega) * tl.sin(omega * z))


# --------------------------------------------------------------------------------------------
# Selection by the ACTIVATION constexpr (only the taken branch is compiled).
# --------------------------------------------------------------------------------------------
@triton.jit
def apply_activation(z, slope, ACTIVATION: tl.constexpr):
    """``act(z)`` for the activation named by ``ACTIVATION``."""
    if ACTIVATION == "none":
        y = z
    elif ACTIVATION == "relu":
        y = relu(z, slope)
    elif ACTIVATION == "gelu":
        y = gelu(z, slope)
    elif ACTIVATION == "gelu_tanh":
        y = gelu_tanh(z, slope)
    elif ACTIVATION == "silu":
        y = silu(z, slope)
    elif ACTIVATION == "tanh":
        y = tanh(z, slope)
    elif ACTIVATION == "sigmoid":
        y = sigmoid(z, slope)
    elif ACTIVATION == "leaky_relu":
        y = leaky_relu(z, slope)
    elif ACTIVATION == "softplus":
        y = softplus(z, slope)
    elif ACTIVATION == "sin":
        y = sin(z, slope)
    else:
        tl.static_assert(False, "unknown ACTIVATION")
    return y


@triton.jit
def activation_grad(g, s, slope, ACTIVATION: tl.constexpr):
    """``dZ = g * act'(.)`` given the saved tensor ``s`` (module docstring)."""
    if ACTIVATION == "none":
        dz = g
    elif ACTIVATION == "relu":
        dz = relu_grad(g, s, slope)
    elif ACTIVATION == "gelu":
        dz = gelu_grad(g, s, slope)
    elif ACTIVATION == "gelu_tanh":
        dz = gelu_tanh_grad(g, s, slope)
    elif ACTIVATION == "silu":
        dz = silu_grad(g, s, slope)
    elif ACTIVATION == "tanh":
        dz = tanh_grad(g, s, slope)
    elif ACTIVATION == "sigmoid":
        dz = sigmoid_grad(g, s, slope)
    elif ACTIVATION == "leaky_relu":
        dz = leaky_relu_grad(g, s, slope)
    elif ACTIVATION == "softplus":
        dz = softplus_grad(g, s, slope)
    elif ACTIVATION == "sin":
        dz = sin_grad(g, s, slope)
    else:
        tl.static_assert(False, "unknown ACTIVATION")
    return dz


@triton.jit
def activation_grad2(t, s, slope, ACTIVATION: tl.constexpr):
    """``t * d act'/d s`` given the saved tensor ``s``; 0 for the piecewise-linear ones."""
    if ACTIVATION == "gelu":
        r = gelu_grad2(t, s, slope)
    elif ACTIVATION == "gelu_tanh":
        r = gelu_tanh_grad2(t, s, slope)
    elif ACTIVATION == "silu":
        r = silu_grad2(t, s, slope)
    elif ACTIVATION == "tanh":
        r = tanh_grad2(t, s, slope)
    elif ACTIVATION == "sigmoid":
        r = sigmoid_grad2(t, s, slope)
    elif ACTIVATION == "softplus":
        r = softplus_grad2(t, s, slope)
    elif ACTIVATION == "sin":
        r = sin_grad2(t, s, slope)
    else:  # none, relu, leaky_relu: f'' = 0 almost everywhere
        r = t * 0.0
    return r
