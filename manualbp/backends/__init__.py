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
