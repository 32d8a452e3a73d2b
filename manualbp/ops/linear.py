"""Linear with a fused activation, ``y = act(x W^T + b)``: its reference math, its autograd
Function (the hand-written backward) and the validated entry point :func:`linear`.

Where dX, dW and db are computed: :func:`reference_backward` (plain torch ops, any device,
differentiable) and, on the Triton path, ``manualbp.kernels.linear.backward``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from manualbp import _mode
from manualbp.activations import ACTIVATIONS, Act, bind, resolve_param
from manualbp.kernels import library
from manualbp.ops._checks import (
    PLAIN,
    check_linear_args,
    check_linear_dtypes,
    check_slope,
    linear_applies,
    native_linear,
    overrides_torch_function,
    require_tensor,
)

__all__ = ["LinearFunction", "act_grad", "as_rows", "linear", "reference_backward",
           "reference_forward", "sum_present"]  # fmt: skip

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def as_rows(t: Tensor) -> Tensor:
    """``t`` (*, F) as a matrix (rows, F), a view where possible. ``reshape(-1, F)`` cannot
    infer the row count when F == 0, so the rows are counted explicitly."""
    return t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def sum_present(*terms: Tensor | None) -> Tensor | None:
    """The sum of the ``terms`` that are not ``None``, left to right (``None`` if all are)."""
    total = None
    for term in terms:
        if term is not None:
            total = term if total is None else total + term
    return total


# --------------------------------------------------------------------------------------------
# The reference math
# --------------------------------------------------------------------------------------------
def reference_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, act: Act | None, *, store_preact: bool
) -> tuple[Tensor, Tensor | None]:
    """``(y, z)``: ``z = x W^T + b``, ``y = act(z)``; ``z`` only when ``store_preact``."""
    z = F.linear(x, weight, bias)
    if act is None:
        return z, None
    z = library.reduce_partial(z)  # row-parallel DTensors: act needs the whole sum first
    return act.forward(z), (z if store_preact else None)


def act_grad(grad_y: Tensor, saved: Tensor | None, act: Act | None) -> Tensor:
    """``dZ = dY * act'(.)`` read off ``saved``; in float16/bfloat16 evaluated in float32 and
    rounded once, as aten's kernels do."""
    if act is None:
        return grad_y
    if grad_y.dtype in _LOW_PRECISION:
        return act.grad(grad_y.float(), saved.float()).to(grad_y.dtype)
    return act.grad(grad_y, saved)


def reference_backward(
    grad_y: Tensor,
    x: Tensor | None,
    weight: Tensor | None,
    saved: Tensor | None,
    act: Act | None,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dW, db)`` for 2-D ``x`` (M, K) and ``grad_y`` (M, N), by the chain rule:

    dZ = dY * act'(Z)    (read off ``saved``, Y or Z, whichever ``act`` derives from)
    dX = dZ W,   dW = dZ^T X,   db = sum_rows dZ
    """
    grad_z = grad_y if act is None else act_grad(grad_y, saved, act)
    dx = torch.mm(grad_z, weight) if needs_grad[0] else None
    dw = torch.mm(grad_z.t(), x) if needs_grad[1] else None
    db = grad_z.sum(0) if needs_grad[2] else None
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# The autograd Function
# --------------------------------------------------------------------------------------------
class LinearFunction(Function):
    """Fused linear layer ``Y = act(X W^T + b)`` as a ``torch.autograd.Function``.

    ``LinearFunction.apply(input, weight, bias, activation, negative_slope, None)`` returns
    ``(output, preact)``: ``preact`` is the pre-activation ``Z = X W^T + b`` when the
    activation's derivative reads it (GELU, SiLU, leaky ReLU with a negative slope), else
    ``None``; it is differentiable (a double backward differentiates act'(Z) through it, as
    native autograd does through its saved Z). Inputs are not validated here: use
    :func:`linear`, which checks them and returns ``output`` alone.

    Shapes: ``input`` (*, K) with rank >= 1, ``weight`` (N, K), ``bias`` (N,) or None,
    ``output`` (*, N). What it saves is what native ``F.linear`` + the activation module save:
    X (for dW), W (for dX), and Y or Z (for act').
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        activation: str | None,
        negative_slope: float,
        store_preact: bool | None,
    ) -> tuple[Tensor, Tensor | None]:
        """``(y, z)`` on the path the call takes: fresh tensors, never views (a view would make
        in-place ops on the output an error). ``store_preact``: keep z or not (``None``: where
        the activation's derivative reads it, as a backward needs)."""
        act = None if activation is None else bind(activation, negative_slope)
        store = act is not None and act.reads_preact if store_preact is None else store_preact
        if _mode.transforms_active() or not _mode.kernels_for(input, weight, bias):
            return reference_forward(input, weight, bias, act, store_preact=store)
        name, slope = (None, 0.0) if act is None else (act.name, act.slope)
        if library.routed(input, weight, bias):  # DTensor operands: the custom op's strategies
            if act is not None and (library.shards(weight, 1) or library.shards(input, -1)):
                # Row-parallel: the activation needs the whole sum: reduce, then apply it.
                z, _ = library.linear_forward(input, weight, bias, None, 0.0, store_preact=False)
                z = library.reduce_partial(z)
                return act.forward(z), (z if store else None)
        elif not _mode.compiling():
            kernels = library.load("linear")
            return kernels.forward(input, weight, bias, name, slope, store_preact=store)
        return library.linear_forward(input, weight, bias, name, slope, store_preact=store)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, weight, _, activation, negative_slope, _ = inputs
        y, z = output
        ctx.act = act = None if activation is None else bind(activation, negative_slope)
        saved = None if act is None else (z if act.reads_preact else y)
        needs_x, needs_w = ctx.needs_input_grad[:2]
        ctx.save_for_backward(input if needs_w else None, weight if needs_x else None, saved)
        if _mode.setup(ctx, z):
            ctx.save_for_forward(input, weight, saved)

    @staticmethod
    def jvp(ctx: Any, input_t, weight_t, bias_t, *_: None) -> tuple:
        """Forward mode, the chain rule with tangents flowing forward:

        Ż = Ẋ W^T + X Ẇ^T + ḃ,    Ẏ = act'(Z) ⊙ Ż
        (act'(Z) ⊙ · is the elementwise map the backward uses for dZ = act'(Z) ⊙ dY).
        """
        input, weight, saved = ctx.saved_tensors
        x_t = None if input_t is None else F.linear(input_t, weight)
        z_t = sum_present(x_t, None if weight_t is None else F.linear(input, weight_t), bias_t)
        if z_t is None or ctx.act is None:
            return z_t, None
        return ctx.act.grad(z_t, saved), (z_t if ctx.act.reads_preact else None)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor | None, grad_preact: Tensor | None = None) -> tuple:
        """Chain rule through ``Z = X W^T + b`` and ``Y = act(Z)``, given ``dY = dL/dY``:

        dZ = dY * act'(Z)            (elementwise; act' read off Y or Z, see activations.py)
        dX = dZ W                    (dL/dX_mk = sum_n dZ_mn W_nk)
        dW = dZ^T X,  db = sum_m dZ  (summed over every leading batch index m)

        A gradient reaching the pre-activation output (a double backward differentiating
        act'(Z)) adds to dZ. Recorded itself (``create_graph=True``), it runs in
        differentiable torch ops. Full derivation: docs/derivations.md.
        """
        if grad_preact is not None:
            (grad_preact,) = _mode.internal_grads(grad_preact)
        if grad_output is None and grad_preact is None:
            return None, None, None, None, None, None
        x, weight, saved = ctx.saved_tensors
        act, needs = ctx.act, ctx.needs_input_grad[:3]
        lead = (grad_output if grad_output is not None else grad_preact).shape[:-1]
        if grad_preact is not None:  # dZ = dY * act'(Z) + dL/dZ, then no activation left
            grad_z = grad_preact if grad_output is None else act.grad(grad_output, saved)
            grad_output, act = (grad_z if grad_output is None else grad_z + grad_preact), None
        if grad_output.dim() == 2:  # as_rows of each, inline: the common case
            grad_y = grad_output
        else:
            grad_y = as_rows(grad_output)
            x = None if x is None else as_rows(x)
            saved = None if saved is None or act is None else as_rows(saved)
        if not _mode.backward_kernels(grad_y, x, weight, choice=ctx.choice):
            dx, dw, db = reference_backward(grad_y, x, weight, saved, act, needs)
        else:
            name, slope = (None, 0.0) if act is None else (act.name, act.slope)
            routed = _mode.compiling() or library.routed(grad_y, x, weight, saved)
            backward = library.linear_backward if routed else library.load("linear").backward
            dx, dw, db = backward(grad_y, x, weight, saved, name, slope, needs_grad=needs)
        if dx is not None and len(lead) != 1:
            dx = dx.view(*lead, weight.shape[1])
        return dx, dw, db, None, None, None


LINEAR = _mode.Applier(LinearFunction)


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------
def linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    *,
    negative_slope: float | None = None,
) -> Tensor:
    r"""``act(input @ weight.T + bias)`` with a hand-written backward.

    Args:
        input: ``(*, in_features)``, rank >= 1 (a 1-D input gives a 1-D output).
        weight: ``(out_features, in_features)``, the ``nn.Linear`` layout.
        bias: ``(out_features,)`` or ``None``; also ``()``, ``(1,)`` and ``(1, out_features)``
            (the gradient is summed to the bias's shape, as natively). A bias of any other
            shape that ``F.linear`` broadcasts (``(rows, out_features)`` for 2-D input, say)
            runs through ``F.linear`` itself, with native autograd, or fails as it does.
        activation: ``None``, ``"relu"``, ``"gelu"`` (exact erf form, as ``nn.GELU()``),
            ``"gelu_tanh"`` (as ``nn.GELU(approximate="tanh")``), ``"silu"``, ``"tanh"``,
            ``"sigmoid"``, ``"leaky_relu"``, ``"softplus"`` (as ``nn.Softplus``) or ``"sin"``
            (as :class:`manualbp.Sine`).
        negative_slope: the activation's parameter: ``"leaky_relu"``'s slope for negative
            inputs, ``"softplus"``'s ``beta``, ``"sin"``'s ``omega``; ``None``: its default
            (0.01, 1, 1).

    Returns:
        ``(*, out_features)``. Under autocast it computes in the autocast dtype, as
        ``F.linear`` does.

    Where the hand-derived path does not apply, native's op (``F.linear`` and the
    activation's native function) runs, with native's result or native's error: tensor
    subclasses with a ``__torch_function__`` (which then sees ``linear`` as natively), a 1-D
    weight, integer or complex tensors, mixed dtypes or devices.

    Raises:
        ShapeError: (a ``ValueError`` and a ``RuntimeError``) on shapes that do not fit.
    """
    if (
        type(input) in PLAIN  # no __torch_function__ of their own (and cheaper than isinstance)
        and type(weight) in PLAIN
        and (bias is None or type(bias) in PLAIN)
        and _mode.plain_eager(input, weight, bias)  # first: under jit.trace, no size compared
        and (activation is None or (type(activation) is str and activation in ACTIVATIONS))
        and (negative_slope is None or type(negative_slope) is float)
        and (dtype := input.dtype).is_floating_point
        and weight.dtype is dtype
        and weight.dim() == 2
        and input.dim() != 0
        and input.shape[-1] == (w_shape := weight.shape)[1]
        and (device := input.device) == weight.device
        and (
            bias is None
            or (bias.dtype is dtype and bias.shape == w_shape[:1] and bias.device == device)
        )
    ):
        # The fast path: valid arguments, a vector bias, plain eager autograd.
        unwrap = _mode.unwrap_dead
        return LINEAR.eager(
            unwrap(input), unwrap(weight), None if bias is None else unwrap(bias), activation,
            negative_slope, None,
        )[0]  # fmt: skip
    return _linear_checked(input, weight, bias, activation, negative_slope)


@_mode.entry_point
def _linear_checked(input, weight, bias, activation, negative_slope) -> Tensor:
    """:func:`linear`, every argument checked, every path; native's op where the hand-derived
    path does not apply."""
    check_slope(negative_slope)
    bind(activation)  # an unknown name raises here
    negative_slope = resolve_param(activation, negative_slope)
    if not (type(input) in PLAIN and type(weight) in PLAIN
            and (bias is None or type(bias) in PLAIN)):  # fmt: skip
        if overrides_torch_function(input, weight, bias):  # the subclass's __torch_function__
            return native_linear(input, weight, bias, activation, negative_slope)
        require_tensor("input", input, "linear")
        require_tensor("weight", weight, "linear")
        require_tensor("bias", bias, "linear", optional=True)
    cast = _mode.autocast_dtype(input)
    if not linear_applies(input, weight, bias, cast):  # native's result, or native's error
        return native_linear(input, weight, bias, activation, negative_slope)
    check_linear_args(input, weight, bias)  # shapes (dtypes and devices: linear_applies)
    if cast is None:  # the common case
        return linear_unchecked(input, weight, bias, activation, negative_slope)
    input, weight, bias = _mode.cast(cast, input, weight, bias)
    check_linear_dtypes(input, weight, bias)
    with _mode.autocast_off(input):
        return linear_unchecked(input, weight, bias, activation, negative_slope)


def is_vector_bias(bias: Tensor | None, out_features: int) -> bool:
    """Whether ``bias`` is ``nn.Linear``'s bias as ``F.linear`` broadcasts it for every input:
    shape (), (1,), (N,) or (1, N). Any other shape goes to ``F.linear`` itself."""
    if bias is None:
        return True
    if bias.dim() <= 1:
        return bias.numel() in (1, out_features)
    return bias.shape == (1, out_features)


def linear_unchecked(
    input: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None, slope: float
) -> Tensor:
    """:func:`linear` on arguments already checked (and cast for autocast)."""
    out_features = weight.shape[0]
    route = _mode.route(input, weight, bias)
    if route == "plain" or not is_vector_bias(bias, out_features):
        # Plain ops (F.linear, then the activation) for native autograd to record.
        act = bind(activation, slope)
        return reference_forward(input, weight, bias, act, store_preact=False)[0]
    if bias is not None and bias.shape != (out_features,):
        bias = bias.reshape(-1).expand(out_features)  # its gradient sums back to its shape
    if route == "nograd":  # nothing records: the forward alone, keeping nothing
        return LinearFunction.forward(input, weight, bias, activation, slope, False)[0]
    return LINEAR(input, weight, bias, activation, slope, None)[0]
