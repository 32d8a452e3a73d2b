"""The backend interface: every op manualbp runs, implemented twice.

:class:`Backend` lists the ops (the Linear forward and backward, the MSE forward and backward
and its gradient scaling, the SGD step). :mod:`manualbp.backends.reference` implements them
in plain torch ops on any device (the hand-derived math, differentiable for double backward);
:mod:`manualbp.backends.triton` with the Triton kernels of ``triton_kernels/`` (installed as
``manualbp.kernels``). :func:`manualbp.dispatch.backend_for` picks one per call; the autograd
Functions, the fused head and the optimizer call only these methods.

Shapes: ``x`` (M, K), ``weight`` (N, K), ``bias`` (N,) or ``None``, ``grad_y`` (M, N); MSE
operands are same-shape (broadcast beforehand) tensors of one dtype.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from manualbp.activations import Activation

__all__ = ["Backend", "SGDHyper"]

SGDHyper = dict  # lr, weight_decay, momentum, dampening, nesterov, maximize


class Backend(Protocol):
    """The ops each backend implements (see the module docstring for shapes)."""

    name: str

    def linear_forward(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        act: Activation | None,
        negative_slope: float,
        *,
        store_preact: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """``(y, z)``: ``z = x W^T + b``, ``y = act(z)``; ``z`` only when ``store_preact``."""
        ...

    def linear_backward(
        self,
        grad_y: Tensor,
        x: Tensor | None,
        weight: Tensor | None,
        saved: Tensor | None,
        act: Activation | None,
        negative_slope: float,
        needs_grad: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(dx, dW, db)``, ``None`` where not needed; ``saved`` is what
        ``act.saved_for(negative_slope)`` names (y or z)."""
        ...

    def linear_chain_backward(
        self,
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
        """The upper layer of ``Linear -> prev_act -> Linear (-> act)`` through to the lower
        layer's dZ: ``(dZ_prev, dW, db, db_prev)``, ``None`` where not needed (``needs_grad``
        in that order). ``x`` (M, K) is the upper layer's input (the lower layer's output),
        ``prev_saved`` what ``prev_act.saved_for(prev_negative_slope)`` names (its output or
        pre-activation, (M, K)); ``dZ_prev = (dZ W) * prev_act'(.)``, ``db_prev = sum_rows
        dZ_prev``."""
        ...

    def linear_grad_accumulate(
        self,
        grad_y: Tensor,
        x: Tensor,
        weight: Tensor,
        dx_out: Tensor | None,
        dw_acc: Tensor | None,
        db_acc: Tensor | None,
    ) -> None:
        """One row chunk of a Linear backward without activation, in place: ``dx_out = dY W``,
        ``dw_acc += dY^T X``, ``db_acc += sum_rows dY`` (accumulators in fp32/fp64; each
        ``None`` where not needed). The fused head sums its chunks this way."""
        ...

    def mse_forward(
        self, input: Tensor, target: Tensor, reduction: str, *, compute_grad: bool
    ) -> tuple[Tensor, Tensor | None]:
        """``(loss, grad)``: ``grad`` is dloss/dinput for an upstream gradient of 1 when this
        backend makes it in the same pass (a scalar reduction and ``compute_grad``), else
        ``None``."""
        ...

    def mse_backward(
        self, grad_output: Tensor, input: Tensor, target: Tensor, reduction: str
    ) -> Tensor:
        """dloss/dinput for the upstream gradient ``grad_output``."""
        ...

    def mse_grad_scale(self, grad: Tensor, grad_output: Tensor) -> Tensor:
        """``grad * grad_output`` for the gradient ``mse_forward`` made (may reuse ``grad``)."""
        ...

    def sgd_step(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor | None],
        **hyper: float | bool | Tensor,
    ) -> None:
        """One SGD update in place (see :class:`manualbp.optim.SGD`); ``None`` buffers are
        replaced in the list by new ones when momentum is used."""
        ...

    def mlp_forward(
        self,
        x: Tensor,
        weights: list[Tensor],
        biases: list[Tensor | None],
        acts: tuple[Activation | None, Activation | None],
        slopes: tuple[float, float],
        *,
        store: bool,
    ) -> tuple[Tensor, list[Tensor | None]]:
        """The MLP ``act_o(... act_h(x W_0^T + b_0) ... W_{L-1}^T + b_{L-1})`` for ``x``
        (*, k_0), ``weights[l]`` (n_l, k_l), ``biases[l]`` (n_l,) or ``None``; ``acts`` /
        ``slopes``: the hidden layers' activation and the last layer's.

        Returns ``(y, saved)``, ``y`` (*, n_{L-1}) a new tensor. With ``store``, ``saved`` has
        one entry per layer: for a hidden layer what its activation's derivative reads
        (``saved_for``: z or y; y when it has none), for the last layer its z if the output
        activation reads z, else ``None``. Without ``store`` it is empty."""
        ...

    def mlp_backward(
        self,
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
        """``(dx, [dW_l], [db_l])`` of :meth:`mlp_forward` for 2-D ``grad_y`` (M, n_{L-1}), ``x``
        (M, k_0), the output ``y`` (M, n_{L-1}; read when the output activation derives from
        y) and ``saved`` as ``mlp_forward`` made it (2-D). ``needs_grad``: ``(dx, params)``;
        ``db_l`` is ``None`` where ``has_bias[l]`` is False."""
        ...

    def mlp_mse_forward(
        self,
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
        """``(loss, head, saved)``: ``loss = mse(y, target)`` (``reduction`` ``"mean"`` or
        ``"sum"``, in ``loss_dtype``) for the MLP ``y`` of :meth:`mlp_forward` on 2-D ``x``
        (M, k_0) and a same-shape (M, n_{L-1}) ``target`` of any float dtype. With ``store``:
        ``head`` is ``dZ_{L-1}`` for an upstream gradient of 1 (``act_o'`` of ``norm (y - t)``)
        when ``x`` is float32/float64, else y itself; ``saved`` as ``mlp_forward`` keeps it
        (its last entry ``None`` when ``head`` is ``dZ_{L-1}``). Without: ``None`` and ``[]``."""
        ...

    def mlp_mse_backward(
        self,
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
        """:meth:`mlp_backward` of :meth:`mlp_mse_forward` for the loss's 0-dim upstream
        gradient ``grad_loss``: ``dY = grad_loss * head`` (float32/float64 ``x``: ``head`` is
        already ``dZ_{L-1}``), else ``dY = grad_loss * norm (head - target)``, formed in the
        loss dtype and rounded once, as native autograd forms it."""
        ...
