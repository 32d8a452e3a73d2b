"""The reference backend: the hand-derived math in plain torch ops, on any device.

It runs CPU tensors, ``torch.func`` transforms and double backward (every op here is itself
differentiable), and is the formula the Triton kernels implement. The tests' oracle is native
autograd or float64 math, never this file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from manualbp.activations import Activation, in_place_ok
from manualbp.backends.sharding import any_dtensor, reduce_partial, sharded

__all__ = ["ReferenceBackend", "REFERENCE"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}  # aten's at::Reduction
_ZEROS: dict[object, Tensor] = {}  # by dtype (CPU) or (dtype, device)
# Up to this many elements the MSE gradient takes one op fewer (addcmul with two 0-dim
# operands); above, the in-place passes, which vectorise (addcmul does not, with two such).
_FEW = 2048


def _zero(like: Tensor) -> Tensor:
    """A 0-dim zero of ``like``'s dtype and device: for plain tensors one made once per pair
    (kept only when made in plain eager mode: not while torch.compile traces, nor under a
    dispatch mode such as FakeTensorMode); tensor subclasses and fake tensors get a fresh one."""
    if type(like) is not Tensor:
        return like.new_zeros(())
    key = like.dtype if like.is_cpu else (like.dtype, like.device)
    zero = _ZEROS.get(key)
    if zero is None:
        if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
            return like.new_zeros(())
        with torch.inference_mode(False):  # usable outside an inference_mode block too
            zero = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return zero


class ReferenceBackend:
    """Plain torch ops behind the :class:`~manualbp.backends.Backend` interface."""

    name = "reference"

    @staticmethod
    def linear_forward(
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        act: Activation | None,
        negative_slope: float,
        *,
        store_preact: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """``(y, z)``: ``z = x W^T + b``, ``y = act(z)``; ``z`` only when ``store_preact``."""
        z = F.linear(x, weight, bias)
        if act is None:
            return z, None
        if any_dtensor(z):  # row-parallel: z is a partial sum; act needs the whole sum first
            z = reduce_partial(z)
        return act.forward(z, negative_slope), (z if store_preact else None)

    @staticmethod
    def linear_backward(
        grad_y: Tensor,
        x: Tensor | None,
        weight: Tensor | None,
        saved: Tensor | None,
        act: Activation | None,
        negative_slope: float,
        needs_grad: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(dx, dW, db)`` for 2-D ``x`` (M, K) and ``grad_y`` (M, N), by the chain rule.

        dZ = dY * act'(Z)    (``saved`` is Y or Z, whichever ``act`` derives from)
        dX = dZ W,   dW = dZ^T X,   db = sum_rows dZ
        """
        if act is None:
            grad_z = grad_y
        elif grad_y.dtype in _LOW_PRECISION:
            # Evaluate act' in float32 and round once, as aten's kernels do.
            grad_z = act.grad(grad_y.float(), saved.float(), negative_slope).to(grad_y.dtype)
        else:
            grad_z = act.grad(grad_y, saved, negative_slope)
        dx = torch.mm(grad_z, weight) if needs_grad[0] else None
        dw = torch.mm(grad_z.t(), x) if needs_grad[1] else None
        db = grad_z.sum(0) if needs_grad[2] else None
        return dx, dw, db

    @staticmethod
    def linear_chain_backward(
        grad_y: Tensor,
        x: Tensor,
        weight: Tensor,
        saved: Tensor | None,
        act: Activation | None,
        negative_slope: float,
        prev_saved: Tensor | None,
        prev_act: Activation | None,
        prev_negative_slope: float,
        needs_grad: tuple[bool, bool, bool, bool],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``(dZ_p, dW, db, db_p)`` of the upper layer of Linear -> act_p -> Linear, by the
        chain rule twice (:meth:`linear_backward` of each layer):

        dZ = dY * act'(.),  dW = dZ^T H,  db = sum_rows dZ,  dH = dZ W     (upper layer)
        dZ_p = dH * act_p'(.),  db_p = sum_rows dZ_p                         (lower layer)
        """
        need_dzp, need_dw, need_db, need_dbp = needs_grad
        need_chain = need_dzp or need_dbp
        dh, dw, db = ReferenceBackend.linear_backward(
            grad_y, x, weight, saved, act, negative_slope, (need_chain, need_dw, need_db)
        )
        if not need_chain:
            return None, dw, db, None
        if prev_act is None:
            dzp = dh
        elif dh.dtype in _LOW_PRECISION:  # act' in float32, rounded once, as aten's kernels
            dzp = prev_act.grad(dh.float(), prev_saved.float(), prev_negative_slope)
            dzp = dzp.to(dh.dtype)
        else:
            dzp = prev_act.grad(dh, prev_saved, prev_negative_slope)
        return (dzp if need_dzp else None), dw, db, (dzp.sum(0) if need_dbp else None)

    @staticmethod
    def linear_grad_accumulate(
        grad_y: Tensor,
        x: Tensor,
        weight: Tensor,
        dx_out: Tensor | None,
        dw_acc: Tensor | None,
        db_acc: Tensor | None,
    ) -> None:
        """``dx_out = dY W``, ``dw_acc += dY^T X``, ``db_acc += sum_rows dY`` in place, with no
        W-sized temporary: low-precision chunks are widened (chunk-sized) and multiplied into
        the fp32 accumulator."""
        if dx_out is not None:
            torch.mm(grad_y, weight, out=dx_out)
        if dw_acc is not None:
            acc = dw_acc.dtype
            dw_acc.addmm_(grad_y.mT.to(acc), x.to(acc))
        if db_acc is not None:
            db_acc += grad_y.sum(0, dtype=db_acc.dtype)

    @staticmethod
    def mse_forward(
        input: Tensor, target: Tensor, reduction: str, *, compute_grad: bool = False
    ) -> tuple[Tensor, None]:
        """``L = reduce((input - target)^2)`` (the forward is aten's own, so the loss is
        bitwise native's); the gradient is left to :meth:`mse_backward`."""
        code = _REDUCTION_ENUM.get(reduction)
        if code is None or (
            (type(input) is not Tensor or type(target) is not Tensor) and any_dtensor(input, target)
        ):
            if reduction == "mean" and sharded(input, target):
                # DTensor's mean averages the shards' means, which is off for uneven shards.
                return F.mse_loss(input, target, reduction="sum") / input.numel(), None
            return F.mse_loss(input, target, reduction=reduction), None
        # aten's op itself, without F.mse_loss's Python checks: input and target come
        # broadcast and promoted (so also no size warning to give).
        return torch._C._nn.mse_loss(input, target, code), None

    @staticmethod
    def mse_backward(grad_output: Tensor, input: Tensor, target: Tensor, reduction: str) -> Tensor:
        """``dL/d input``, scaled by the upstream gradient ``g``:

        L = (1/N) sum (x - y)^2  =>  dL/dx = g * 2 (x - y) / N    (mean)
        L = sum (x - y)^2        =>  dL/dx = g * 2 (x - y)        (sum)
        L_i = (x_i - y_i)^2      =>  dL/dx_i = g_i * 2 (x_i - y_i) (none)
        and dL/dy = -dL/dx in every case.
        """
        # max(., 1): an empty mean has an empty gradient, whatever the factor.
        n = input.numel()
        norm = 2.0 / max(n, 1) if reduction == "mean" else 2.0
        plain = type(input) is Tensor and type(target) is Tensor and type(grad_output) is Tensor
        if not plain and any_dtensor(input, target, grad_output):
            return norm * (input - target) * grad_output
        residual = torch.sub(input, target)
        if n <= _FEW:
            # Latency-bound: the fewest ops. (norm * (x - y)) * g, aten's order, as
            # 0 + norm * (x - y) * g: addcmul takes the factor as a plain scalar (a Python
            # float operand costs a tensor per call); differentiable, as double backward and
            # torch.func need.
            zero = _ZEROS.get(residual.dtype) if residual.is_cpu else None  # _zero's hit
            if zero is None or not plain:
                zero = _zero(residual)
            return torch.addcmul(zero, residual, grad_output, value=norm)
        if not in_place_ok(grad_output, input):  # recorded for double backward, or batched
            return norm * residual * grad_output
        if grad_output.dim() == 0:  # one pass over the residual: scale by g * norm at once
            return residual.mul_(grad_output * norm)
        return residual.mul_(norm).mul_(grad_output)

    @staticmethod
    def mse_grad_scale(grad: Tensor, grad_output: Tensor) -> Tensor:
        return grad * grad_output

    @staticmethod
    def sgd_step(
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor | None],
        *,
        lr: float | Tensor,
        weight_decay: float | Tensor,
        momentum: float,
        dampening: float,
        nesterov: bool,
        maximize: bool,
    ) -> None:
        """The SGD update one param at a time (see :class:`manualbp.optim.SGD`).

        A tensor ``lr`` is used as a tensor (``addcmul_``), so no host sync is forced.
        """
        lr_t = lr.detach().reshape(()) if isinstance(lr, Tensor) else None
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            d_p = -g if maximize else g
            if weight_decay != 0:
                d_p = d_p.add(p, alpha=weight_decay)
            if momentum != 0:
                buf = momentum_buffers[i]
                if buf is None:
                    buf = torch.clone(d_p).detach()
                    momentum_buffers[i] = buf
                else:
                    buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
                d_p = d_p.add(buf, alpha=momentum) if nesterov else buf
            if lr_t is not None:
                # A 0-dim CPU tensor combines with tensors on any device; others must move.
                same = lr_t.device == p.device or lr_t.device.type == "cpu"
                p.addcmul_(d_p, lr_t if same else lr_t.to(p.device), value=-1)
            else:
                p.add_(d_p, alpha=-lr)

    @staticmethod
    def mlp_forward(
        x: Tensor,
        weights: list[Tensor],
        biases: list[Tensor | None],
        acts: tuple[Activation | None, Activation | None],
        slopes: tuple[float, float],
        *,
        store: bool,
    ) -> tuple[Tensor, list[Tensor | None]]:
        """The MLP layer by layer, ``H_l = act_l(H_{l-1} W_l^T + b_l)``, ``H_{-1} = x``; keeps
        per layer what its derivative reads (see :meth:`Backend.mlp_forward`)."""
        h, saved, last = x, [], len(weights) - 1
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            act, slope = (acts[1], slopes[1]) if i == last else (acts[0], slopes[0])
            preact = act is not None and act.saved_for(slope) == "preact"
            h, z = ReferenceBackend.linear_forward(
                h, w, b, act, slope, store_preact=store and preact
            )
            if store:
                saved.append(z if preact else (None if i == last else h))
        return h, saved

    @staticmethod
    def mlp_backward(
        grad_y: Tensor,
        x: Tensor,
        weights: list[Tensor],
        y: Tensor | None,
        saved: list[Tensor | None],
        acts: tuple[Activation | None, Activation | None],
        slopes: tuple[float, float],
        has_bias: tuple[bool, ...],
        needs_grad: tuple[bool, bool],
    ) -> tuple[Tensor | None, list[Tensor] | None, list[Tensor | None] | None]:
        """Layers in reverse, each one :meth:`linear_backward` at its input ``H_{l-1}`` (x, the
        saved y, or the activation of the saved z recomputed) and saved ``s_l``:

        dZ_l = dY_l * act'(s_l),  dW_l = dZ_l^T H_{l-1},  db_l = sum dZ_l,  dY_{l-1} = dZ_l W_l
        """
        need_dx, need_params = needs_grad
        last = len(weights) - 1
        hidden_preact = acts[0] is not None and acts[0].saved_for(slopes[0]) == "preact"
        dws: list = [None] * len(weights)
        dbs: list = [None] * len(weights)
        g = grad_y
        for i in range(last, -1, -1):
            act, slope = (acts[1], slopes[1]) if i == last else (acts[0], slopes[0])
            s = (
                saved[i]
                if i < last or (act is not None and act.saved_for(slope) == "preact")
                else y
            )
            h = x if i == 0 else saved[i - 1]
            if i > 0 and hidden_preact:
                h = acts[0].forward(h, slopes[0])
            needs = (i > 0 or need_dx, need_params, need_params and has_bias[i])
            g, dws[i], dbs[i] = ReferenceBackend.linear_backward(
                g, h, weights[i], s, act, slope, needs
            )
        return (
            (g if need_dx else None),
            (dws if need_params else None),
            (dbs if need_params else None),
        )

    @staticmethod
    def mlp_mse_forward(
        x: Tensor,
        target: Tensor,
        weights: list[Tensor],
        biases: list[Tensor | None],
        acts: tuple[Activation | None, Activation | None],
        slopes: tuple[float, float],
        reduction: str,
        loss_dtype: torch.dtype,
        *,
        store: bool,
    ) -> tuple[Tensor, Tensor | None, list[Tensor | None]]:
        """``mse(y, t)`` of the MLP's ``y``; with ``store``, in float32/float64, ``head`` is
        ``dZ_{L-1} = act_o'(norm (y - t))`` (``norm`` = 2/numel or 2), else y (see
        :meth:`Backend.mlp_mse_forward`)."""
        y, saved = ReferenceBackend.mlp_forward(x, weights, biases, acts, slopes, store=store)
        d = y.to(loss_dtype) - target.to(loss_dtype)
        loss = F.mse_loss(y.to(loss_dtype), target.to(loss_dtype), reduction=reduction)
        if not store:
            return loss, None, []
        if x.dtype in _LOW_PRECISION:
            return loss, y, saved
        head = d * _mse_norm(reduction, d.numel())
        act, slope = acts[1], slopes[1]
        if act is not None:
            head = act.grad(head, saved[-1] if act.saved_for(slope) == "preact" else y, slope)
        return loss, head, [*saved[:-1], None]

    @staticmethod
    def mlp_mse_backward(
        grad_loss: Tensor,
        x: Tensor,
        target: Tensor,
        weights: list[Tensor],
        head: Tensor,
        saved: list[Tensor | None],
        acts: tuple[Activation | None, Activation | None],
        slopes: tuple[float, float],
        reduction: str,
        has_bias: tuple[bool, ...],
        needs_grad: tuple[bool, bool],
    ) -> tuple[Tensor | None, list[Tensor] | None, list[Tensor | None] | None]:
        """With ``D = y - t`` and upstream ``g``: ``dY = g * norm * D``, then
        :meth:`mlp_backward`; in float32/float64 ``head`` already is ``dZ_{L-1}`` for g = 1,
        and ``dZ_{L-1} = g * head`` (every gradient is linear in g)."""
        if x.dtype not in _LOW_PRECISION:
            return ReferenceBackend.mlp_backward(
                head * grad_loss, x, weights, None, [*saved[:-1], None], (acts[0], None),
                slopes, has_bias, needs_grad,
            )  # fmt: skip
        # In float32 (float64 for a float64 loss), rounded once to the MLP's dtype.
        dtype = torch.promote_types(grad_loss.dtype, torch.float32)
        d = head.to(dtype) - target.to(dtype)
        grad_y = (d * _mse_norm(reduction, d.numel()) * grad_loss.to(dtype)).to(head.dtype)
        return ReferenceBackend.mlp_backward(
            grad_y, x, weights, head, saved, acts, slopes, has_bias, needs_grad
        )


def _mse_norm(reduction: str, numel: int) -> float:
    """``dL/dD = norm * D``: 2/numel for the mean (2 with no elements: zero gradients), 2 for
    the sum."""
    return 2.0 / max(numel, 1) if reduction == "mean" else 2.0


REFERENCE = ReferenceBackend()
