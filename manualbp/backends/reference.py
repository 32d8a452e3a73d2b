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
        dx = grad_z @ weight if needs_grad[0] else None
        dw = grad_z.mT @ x if needs_grad[1] else None
        db = grad_z.sum(0) if needs_grad[2] else None
        return dx, dw, db

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
        if reduction == "mean" and sharded(input, target):
            # DTensor's own mean averages the shards' means, which is off for uneven shards.
            return F.mse_loss(input, target, reduction="sum") / input.numel(), None
        return F.mse_loss(input, target, reduction=reduction), None

    @staticmethod
    def mse_backward(grad_output: Tensor, input: Tensor, target: Tensor, reduction: str) -> Tensor:
        """``dL/d input``, scaled by the upstream gradient ``g``:

        L = (1/N) sum (x - y)^2  =>  dL/dx = g * 2 (x - y) / N    (mean)
        L = sum (x - y)^2        =>  dL/dx = g * 2 (x - y)        (sum)
        L_i = (x_i - y_i)^2      =>  dL/dx_i = g_i * 2 (x_i - y_i) (none)
        and dL/dy = -dL/dx in every case.
        """
        # max(., 1): an empty mean has an empty gradient, whatever the factor.
        norm = 2.0 / max(input.numel(), 1) if reduction == "mean" else 2.0
        if not in_place_ok(grad_output, input):  # recorded for double backward, or batched
            return norm * (input - target) * grad_output
        if grad_output.dim() == 0:  # one pass over the residual: scale by g * norm at once
            return torch.sub(input, target).mul_(grad_output * norm)
        return torch.sub(input, target).mul_(norm).mul_(grad_output)

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


REFERENCE = ReferenceBackend()
