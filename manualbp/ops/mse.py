"""The mean squared error, ``L = reduce((input - target)^2)``: its reference math, its autograd
Function (the hand-written backward) and the validated entry point :func:`mse_loss`, with the
semantics of ``F.mse_loss`` (broadcasting with its warning, dtype promotion, a target
gradient)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from manualbp import _mode
from manualbp.kernels import library
from manualbp.ops._checks import (
    PLAIN,
    REDUCTIONS,
    broadcast,
    mse_applies,
    overrides_torch_function,
    require_tensor,
    warn_if_sizes_differ,
)

__all__ = ["MSELossFunction", "mse_loss", "reference_backward", "reference_forward"]

_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}  # aten's at::Reduction
_ZEROS: dict[object, Tensor] = {}  # by dtype (CPU) or (dtype, device)
# Up to this many elements the gradient takes one op fewer (addcmul with two 0-dim operands);
# above, the in-place passes, which vectorise (addcmul does not, with two such).
_FEW = 2048


def broadcast_promoted(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``input`` and ``target`` as same-shape views (stride 0 where broadcast) in their
    promoted dtype, as ``F.mse_loss`` computes them."""
    if input.shape == target.shape and input.dtype == target.dtype:
        return input, target
    dtype = torch.promote_types(input.dtype, target.dtype)
    input, target = torch.broadcast_tensors(input, target)
    return input.to(dtype), target.to(dtype)


def norm_of(reduction: str, numel: int) -> float:
    """``dL/dD = norm * D`` with ``D = input - target``: 2/numel for the mean (2 with no
    elements: zero gradients, whatever the factor), 2 for the sum and elementwise."""
    return 2.0 / max(numel, 1) if reduction == "mean" else 2.0


def _zero(like: Tensor) -> Tensor:
    """A 0-dim zero of ``like``'s dtype and device: for plain tensors one made once per pair
    (kept only when made in plain eager mode); tensor subclasses and fake tensors get a fresh
    one."""
    if type(like) is not Tensor:
        return like.new_zeros(())
    key = like.dtype if like.is_cpu else (like.dtype, like.device)
    zero = _ZEROS.get(key)
    if zero is None:
        if _mode.compiling() or torch._C._len_torch_dispatch_stack():
            return like.new_zeros(())
        with torch.inference_mode(False):  # usable outside an inference_mode block too
            zero = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return zero


# --------------------------------------------------------------------------------------------
# The reference math
# --------------------------------------------------------------------------------------------
def reference_forward(input: Tensor, target: Tensor, reduction: str) -> Tensor:
    """``L = reduce((input - target)^2)`` for same-shape, same-dtype operands: aten's own op
    (so the loss is bitwise native's); on sharded DTensors the mean is the sum over the global
    count (exact for uneven shards, where DTensor's mean averages the shards' means)."""
    if type(input) is Tensor and type(target) is Tensor:
        return torch._C._nn.mse_loss(input, target, _REDUCTION_ENUM[reduction])
    if reduction == "mean" and library.sharded(input, target):
        return F.mse_loss(input, target, reduction="sum") / input.numel()
    return F.mse_loss(input, target, reduction=reduction)


def reference_backward(grad_output: Tensor, input: Tensor, target: Tensor, reduction: str):
    """``dL/d input``, scaled by the upstream gradient ``g``:

    L = (1/N) sum (x - y)^2  =>  dL/dx = g * 2 (x - y) / N    (mean)
    L = sum (x - y)^2        =>  dL/dx = g * 2 (x - y)        (sum)
    L_i = (x_i - y_i)^2      =>  dL/dx_i = g_i * 2 (x_i - y_i) (none)
    and dL/dy = -dL/dx in every case.
    """
    n = input.numel()
    norm = 2.0 / max(n, 1) if reduction == "mean" else 2.0  # norm_of, inline
    plain = type(input) is Tensor and type(target) is Tensor and type(grad_output) is Tensor
    if not plain and library.any_dtensor(input, target, grad_output):
        return norm * (input - target) * grad_output
    residual = torch.sub(input, target)
    if n <= _FEW:
        # Latency-bound: the fewest ops. (norm * (x - y)) * g, aten's order, as 0 + norm *
        # (x - y) * g: addcmul takes the factor as a plain scalar; differentiable.
        zero = _ZEROS.get(residual.dtype) if residual.is_cpu else None  # _zero's hit, inline
        if zero is None or not plain:
            zero = _zero(residual)
        return torch.addcmul(zero, residual, grad_output, value=norm)
    if not _mode.in_place_ok(grad_output, input):  # recorded for double backward, or batched
        return norm * residual * grad_output
    if grad_output.dim() == 0:  # one pass over the residual: scale by g * norm at once
        return residual.mul_(grad_output * norm)
    return residual.mul_(norm).mul_(grad_output)


def _forward(x: Tensor, t: Tensor, reduction: str, compute_grad: bool) -> tuple:
    """``(loss, grad)`` of same-shape operands on the path the call takes; ``grad`` (for an
    upstream gradient of 1) where the kernels make it in the same pass, else ``None``."""
    if not _mode.kernels_for(x, t) or _mode.transforms_active():
        return reference_forward(x, t, reduction), None
    if reduction == "mean" and library.sharded(x, t):
        # The sum of squares over all shards, over the global count; the gradient is left to
        # backward (a precomputed 2D/N would need N at the shard).
        return library.mse_forward(x, t, "sum", compute_grad=False)[0] / x.numel(), None
    return _kernels(x, t).mse_forward(x, t, reduction, compute_grad=compute_grad)


def _kernels(*tensors: Tensor | None) -> Any:
    """The kernels' MSE launchers, or their custom ops (torch.compile, DTensor operands)."""
    return library if _mode.compiling() or library.routed(*tensors) else library.load("mse")


# --------------------------------------------------------------------------------------------
# The autograd Function
# --------------------------------------------------------------------------------------------
class MSELossFunction(Function):
    """``L = reduce((input - target)^2)`` as a ``torch.autograd.Function``.

    ``apply(input, target, reduction)`` returns ``(loss, grad)``; the operands broadcast and
    promote as in ``F.mse_loss``. ``grad`` (not differentiable) is ``dL/d input`` for an
    upstream gradient of 1 where the Triton kernel's loss pass wrote it (a scalar reduction),
    so backward only scales it; else ``None``. Inputs are not validated: :func:`mse_loss` does.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor, target: Tensor, reduction: str) -> tuple[Tensor, Tensor | None]:
        if input.shape == target.shape and input.dtype == target.dtype:
            x, t = input, target  # broadcast_promoted's common case, inline
        else:
            x, t = broadcast_promoted(input, target)
        if not _mode.kernels_for(x, t):  # the reference path, inline: small losses feel a call
            return reference_forward(x, t, reduction), None
        return _forward(x, t, reduction, input.requires_grad or target.requires_grad)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, target, reduction = inputs
        grad = output[1]
        if grad is not None:
            ctx.mark_non_differentiable(grad)
            ctx.set_materialize_grads(False)  # backward gets None, not zeros, for ``grad``
        # Backward reads input and target (the gradient's formula; a second backward or a
        # double backward), and the gradient the forward pass made, if any.
        ctx.save_for_backward(input, target, grad)
        if _mode.setup(ctx):
            ctx.save_for_forward(input, target)
        # reduction, nothing broadcast or promoted, and whether the precomputed gradient is
        # still unscaled (it is scaled in place, once).
        same = input.shape == target.shape and input.dtype == target.dtype
        ctx.spec = [reduction, same, grad is not None]

    @staticmethod
    def jvp(ctx: Any, input_t: Tensor | None, target_t: Tensor | None, _reduction_t: None):
        """Forward mode, with ``D = input - target`` (broadcast, promoted) and tangents ẋ, ṫ:

        Ḋ = ẋ - ṫ,   L̇ = mean(2 D ⊙ Ḋ)  (sum: sum(2 D ⊙ Ḋ); none: 2 D ⊙ Ḋ elementwise)
        """
        input, target = ctx.saved_tensors
        if input_t is None and target_t is None:
            return None, None
        x, t = broadcast_promoted(input, target)
        zeros = torch.zeros((), dtype=x.dtype, device=x.device)
        d_t = (zeros if input_t is None else input_t.to(x.dtype)) - (
            zeros if target_t is None else target_t.to(x.dtype)
        )
        loss_t = 2 * (x - t) * d_t
        reduction = ctx.spec[0]
        return (loss_t if reduction == "none" else getattr(loss_t, reduction)()), None

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor | None, _grad_grad: None = None) -> tuple:
        """With ``D = input - target`` over the N broadcast elements and ``g = dL_out``:

        L = (1/N) sum D^2  =>  dL/d input = g * 2D/N     (mean; g * 2D for sum;
                                                          g_i * 2D_i elementwise for none)
        dL/d target = -dL/d input; where an operand was broadcast, its gradient is summed
        over the broadcast dimensions (the chain rule through the expand).
        """
        if grad_output is None:
            return None, None, None
        input, target, precomputed = ctx.saved_tensors
        reduction, same, unscaled = ctx.spec
        if unscaled and _mode.in_place_ok(grad_output):
            # 2D/N (or 2D) from the forward pass, times g.
            if _mode.compiling() or library.routed(precomputed, grad_output):
                grad = precomputed * grad_output  # one elementwise node (DTensor: pointwise)
            else:
                # In place (the kernel bumps no version counter), so used once: a second
                # backward (retain_graph) recomputes.
                ctx.spec[2] = False
                grad = library.load("mse").mse_grad_scale_(precomputed, grad_output)
        else:
            x, t = (input, target) if same else broadcast_promoted(input, target)
            if not _mode.backward_kernels(grad_output, x, t, choice=ctx.choice):
                grad = reference_backward(grad_output, x, t, reduction)
            elif reduction == "mean" and library.sharded(x, t):
                grad = library.mse_backward(grad_output / max(x.numel(), 1), x, t, "sum")
            else:
                grad = _kernels(grad_output, x, t).mse_backward(grad_output, x, t, reduction)
        needs_input, needs_target, _ = ctx.needs_input_grad
        if same:  # no broadcast dimension to sum over, no promotion to undo
            return (grad if needs_input else None), (-grad if needs_target else None), None
        grad_input = None if not needs_input else _reduce_to(grad, input)
        grad_target = None if not needs_target else _reduce_to(-grad, target)
        return grad_input, grad_target, None


def _reduce_to(grad: Tensor, operand: Tensor) -> Tensor:
    """``grad`` summed over the dimensions ``operand`` was broadcast along, in its dtype."""
    if grad.shape != operand.shape:
        grad = grad.sum_to_size(operand.shape)
    return grad if grad.dtype == operand.dtype else grad.to(operand.dtype)


MSE = _mode.Applier(MSELossFunction)


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------
def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    r"""Mean squared error with a hand-written backward; the semantics of ``F.mse_loss``.

    ``reduction``: ``"mean"`` (default), ``"sum"`` or ``"none"``. ``input`` and
    ``target`` broadcast against each other (with the same ``UserWarning`` as
    ``F.mse_loss`` when their sizes differ; :class:`ShapeError` when they cannot) and
    promote to a common dtype; a target that requires grad gets a gradient. Under autocast
    it computes in float32.

    Where the hand-derived path does not apply, ``F.mse_loss`` itself runs, with native's
    result or native's error: tensor subclasses with a ``__torch_function__`` (which then sees
    ``mse_loss`` as natively and returns its own type), ``reduction="elementwise_mean"``
    (native warns and takes the mean) or an unknown reduction, integer, boolean or complex
    operands, operands on two devices.
    """
    if (
        type(input) in PLAIN  # no __torch_function__ of their own (and cheaper than isinstance)
        and type(target) in PLAIN
        and _mode.plain_eager(input, target)  # first: under jit.trace, no size compared
        and reduction in REDUCTIONS
        and input.dtype is target.dtype
        and input.dtype.is_floating_point
        and input.shape == target.shape
        # Devices: a CPU input with a target elsewhere runs aten's op, which refuses as
        # F.mse_loss does; on the GPU the kernels need them equal.
        and (not input.is_cuda or input.device == target.device)
    ):
        # The fast path: valid arguments of one shape and dtype, plain eager autograd.
        unwrap = _mode.unwrap_dead
        return MSE.eager(unwrap(input), unwrap(target), reduction)[0]
    return _mse_loss_checked(input, target, reduction)


@_mode.entry_point
def _mse_loss_checked(input: Tensor, target: Tensor, reduction: str) -> Tensor:
    """:func:`mse_loss`, every argument checked, every path; ``F.mse_loss`` itself where the
    hand-derived path does not apply."""
    if not (type(input) in PLAIN and type(target) in PLAIN):
        if overrides_torch_function(input, target):  # the subclass's __torch_function__
            return F.mse_loss(input, target, reduction=reduction)
        require_tensor("input", input, "mse_loss")
        require_tensor("target", target, "mse_loss")
    if not mse_applies(input, target, reduction):  # native's result, or native's error
        return F.mse_loss(input, target, reduction=reduction)
    if input.shape != target.shape:
        warn_if_sizes_differ(input.size(), target.size(), stacklevel=4)
        broadcast("mse_loss", "input", input.shape, target.shape)
    if _mode.autocast_dtype(input) is not None:
        # Autocast runs mse_loss in float32, widening lower-precision floats.
        input, target = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
                         for t in (input, target))  # fmt: skip
    return mse_loss_unchecked(input, target, reduction)


def mse_loss_unchecked(input: Tensor, target: Tensor, reduction: str) -> Tensor:
    """:func:`mse_loss` on arguments already checked."""
    route = _mode.route(input, target)
    if route == "plain":
        return reference_forward(*broadcast_promoted(input, target), reduction)
    if route == "nograd":
        return _forward(*broadcast_promoted(input, target), reduction, False)[0]
    return MSE(input, target, reduction)[0]
