r"""Stochastic gradient descent, a drop-in for :class:`torch.optim.SGD`.

The update of each parameter :math:`w` with gradient :math:`g = \partial L / \partial w`, learning
rate :math:`\eta`, weight decay :math:`\lambda`, momentum :math:`\mu`, dampening :math:`\tau`:

.. math::

    g &\leftarrow -g \quad\text{if maximize} \\
    g &\leftarrow g + \lambda w \\
    b &\leftarrow g \ \text{(first step)}, \qquad
        b \leftarrow \mu b + (1 - \tau) g \ \text{(later steps)} \qquad (\mu \neq 0) \\
    g &\leftarrow g + \mu b \ \text{(nesterov)}, \qquad g \leftarrow b \ \text{(otherwise)}
        \qquad (\mu \neq 0) \\
    w &\leftarrow w - \eta g

With no momentum and no weight decay this is the plain ``w = w - η·∂L/∂w``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from manualbp.dispatch import backend_for

__all__ = ["SGD"]


class SGD(torch.optim.SGD):
    r"""Stochastic gradient descent (optionally with momentum, Nesterov, weight decay).

    Same constructor, defaults, validation, ``param_groups`` and ``state_dict`` layout (state key
    ``"momentum_buffer"``) as :class:`torch.optim.SGD`; a state dict saved by either loads into
    the other. Only :meth:`step` differs: for each param group, the params with a gradient are
    split by (device, dtype) and each split is updated by the backend that
    :func:`manualbp.dispatch.backend_for` picks: Triton runs one multi-tensor kernel launch
    per split (``triton_kernels/sgd.py``), the reference backend plain torch ops. Splits the
    kernel cannot take (non-contiguous params, grads or buffers) use the reference ops.

    Update, per parameter :math:`w` with gradient :math:`g = \partial L / \partial w`:

    .. math::

        g &\leftarrow -g \quad\text{if maximize} \\
        g &\leftarrow g + \lambda w \quad(\lambda = \text{weight\_decay}) \\
        b_t &= g \ (t = 1), \qquad b_t = \mu b_{t-1} + (1 - \tau) g \ (t > 1)
            \qquad(\mu = \text{momentum} \neq 0,\ \tau = \text{dampening}) \\
        g &\leftarrow g + \mu b_t \ \text{(nesterov)}, \qquad g \leftarrow b_t
            \ \text{(otherwise)} \\
        w &\leftarrow w - \eta g \quad(\eta = \text{lr})

    which is ``w = w - lr * dL/dw`` when momentum and weight decay are 0.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate, a float or a 1-element tensor (read on the device by the Triton
            kernel: no host sync). Default ``1e-3``.
        momentum: momentum factor :math:`\mu`. Default 0.
        dampening: dampening :math:`\tau` of the momentum. Default 0.
        weight_decay: L2 penalty :math:`\lambda`. Default 0.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0). Default False.
        maximize: maximize the objective instead of minimizing it. Default False.
        foreach: accepted for compatibility and stored in the groups; the backend, not this flag,
            chooses the implementation.
        differentiable: must be False: differentiating through the update is not supported
            (``NotImplementedError``).
        fused: accepted for compatibility (same validation as torch) and stored; the backend
            chooses the implementation. Unlike torch's fused SGD this optimizer does not consume
            ``GradScaler``'s scale itself: the scaler unscales the gradients before :meth:`step`.

    Why a subclass of :class:`torch.optim.SGD` (rather than of ``Optimizer``): the constructor,
    its defaults and error messages, ``__setstate__`` (defaults for old state dicts) and the
    state layout are then exactly torch's for the installed torch version, and code that checks
    ``isinstance(opt, torch.optim.SGD)`` keeps working. Only :meth:`step` is replaced; none of
    torch's functional SGD code runs.

    Sparse gradients raise ``RuntimeError``. A step captured in a CUDA graph runs the
    reference ops (graph-safe) instead of the multi-tensor kernel.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
            fused=fused,
        )  # fmt: skip
        if differentiable:
            raise NotImplementedError("manualbp.optim.SGD does not support differentiable=True")
        # torch's fused SGD consumes GradScaler's grad_scale/found_inf itself; this step does
        # not, so let the scaler unscale gradients (and skip steps on inf) as for foreach SGD.
        self._step_supports_amp_scaling = False

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            momentum = group["momentum"]
            use_momentum = momentum != 0
            splits: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "manualbp.optim.SGD does not support sparse gradients; use "
                        "torch.optim.SGD or torch.optim.SparseAdam for sparse parameters"
                    )
                splits.setdefault((p.device, p.dtype), []).append(p)

            for params in splits.values():
                grads = [p.grad for p in params]
                bufs: list[Tensor | None] = (
                    [self.state[p].get("momentum_buffer") for p in params] if use_momentum else []
                )
                kwargs = dict(
                    lr=group["lr"], weight_decay=group["weight_decay"], momentum=momentum,
                    dampening=group["dampening"], nesterov=group["nesterov"],
                    maximize=group["maximize"],
                )  # fmt: skip
                backend_for(params[0]).sgd_step(params, grads, bufs, **kwargs)
                if use_momentum:
                    for p, buf in zip(params, bufs, strict=True):
                        self.state[p]["momentum_buffer"] = buf

        return loss
