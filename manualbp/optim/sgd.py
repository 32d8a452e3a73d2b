"""Stochastic gradient descent, a drop-in for :class:`torch.optim.SGD` (the update: :class:`SGD`).

With no momentum and no weight decay this is the plain ``w = w - η·∂L/∂w`` of the seed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from manualbp import _mode
from manualbp.kernels import library

__all__ = ["SGD"]


class SGD(torch.optim.SGD):
    r"""Stochastic gradient descent (optionally with momentum, Nesterov, weight decay).

    Same constructor, defaults, validation, ``param_groups`` and ``state_dict`` layout (state key
    ``"momentum_buffer"``) as :class:`torch.optim.SGD`; a state dict saved by either loads into
    the other. Only :meth:`step` differs: each (device, dtype) split of a group's params with a
    dense gradient is updated by one multi-tensor Triton launch (``triton_kernels/sgd.py``) or,
    on the reference backend and where the kernel cannot (non-contiguous tensors), by plain
    torch ops (:func:`reference_step`).

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
        foreach, fused: accepted and stored (with torch's validation); the backend chooses the
            implementation. Unlike torch's fused SGD this one does not consume ``GradScaler``'s
            scale itself: the scaler unscales the gradients before :meth:`step`.
        differentiable: must be False (``NotImplementedError``).

    Why a subclass of :class:`torch.optim.SGD` (rather than of ``Optimizer``): the constructor,
    its defaults and error messages, ``__setstate__`` (defaults for old state dicts) and the
    state layout are then exactly torch's for the installed version, and ``isinstance(opt,
    torch.optim.SGD)`` holds. None of torch's functional SGD code runs.

    Sparse (COO) gradients, e.g. from ``nn.Embedding(sparse=True)``, take the ops of torch's
    single-tensor SGD (the same values, and a sparse ``momentum_buffer``); what torch rejects
    with them (``weight_decay != 0``, ``fused=True``, a dense gradient after a sparse momentum
    buffer) raises ``RuntimeError`` as torch does. A step captured in a CUDA graph runs the
    reference ops (graph-safe).

    A step is all or nothing: every group is checked (gradients, momentum buffers, backends)
    before the first parameter is written, so a step that raises leaves parameters, gradients
    and state as they were (torch's own SGD may raise after updating earlier groups).
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
        """One optimization step (all or nothing); returns ``closure()``'s loss, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        plans = [self._plan(group) for group in self.param_groups]  # raises before any write
        for group, plan in zip(self.param_groups, plans, strict=True):
            self._apply(group, plan)
        return loss

    def _buffer(self, p: Tensor) -> Tensor | None:
        # Read without creating an entry: self.state is a defaultdict.
        state = self.state.get(p)
        return None if state is None else state.get("momentum_buffer")

    def _plan(self, group: dict[str, Any]) -> list[tuple[bool, list[Tensor]]]:
        """The group's params with a gradient as ``(on the kernels?, params)`` splits: one per
        (device, dtype) of those with a dense gradient, then those with a sparse gradient (on
        the reference ops); raising (before any write) for everything the update would fail on."""
        momentum = group["momentum"]
        dense: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        sparse: list[Tensor] = []
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            buf = self._buffer(p) if momentum != 0 else None
            if buf is not None:
                _check_buffer(p, buf)
            if g.layout == torch.strided:
                if buf is not None and buf.layout != torch.strided:
                    # torch: buf.mul_(momentum).add_(grad) on a sparse buffer fails.
                    raise RuntimeError(
                        "manualbp.optim.SGD: a dense gradient for a parameter whose momentum "
                        "buffer is sparse (an earlier step had a sparse gradient); "
                        "torch.optim.SGD fails on this too: add(sparse, dense) is not supported"
                    )
                dense.setdefault((p.device, p.dtype), []).append(p)
                continue
            if group["fused"]:
                raise RuntimeError("`_fused_sgd` does not support sparse gradients")  # torch's
            if group["weight_decay"] != 0:
                # torch: grad.add(param, alpha=weight_decay) with a sparse grad fails.
                raise RuntimeError(
                    "manualbp.optim.SGD: weight_decay != 0 with a sparse gradient; torch.optim.SGD "
                    "fails on this too: add(sparse, dense) is not supported"
                )
            lr = group["lr"]
            if isinstance(lr, Tensor) and lr.requires_grad:
                # torch: param.addcmul_(sparse grad, lr) has no sparse kernel.
                raise NotImplementedError(
                    "manualbp.optim.SGD: a sparse gradient with an lr tensor that requires grad "
                    "(torch.optim.SGD fails on this too: addcmul_ has no sparse kernel)"
                )
            sparse.append(p)
        # Resolve every split's backend now: resolving can raise (e.g. 'triton' on CPU tensors
        # without the interpreter), and that must happen before the first write too.
        splits = [(_mode.kernels_for(ps[0]), ps) for ps in dense.values()]
        return [*splits, (False, sparse)] if sparse else splits

    def _apply(self, group: dict[str, Any], plan: list[tuple[bool, list[Tensor]]]) -> None:
        use_momentum = group["momentum"] != 0
        names = ("lr", "weight_decay", "momentum", "dampening", "nesterov", "maximize")
        hyper = {name: group[name] for name in names}
        for kernels, params in plan:
            grads = [p.grad for p in params]
            bufs: list[Tensor | None] = [self._buffer(p) for p in params] if use_momentum else []
            (kernel_step if kernels else reference_step)(params, grads, bufs, **hyper)
            if use_momentum:
                for p, buf in zip(params, bufs, strict=True):
                    self.state[p]["momentum_buffer"] = buf


def _check_buffer(p: Tensor, buf: Tensor) -> None:
    """A momentum buffer the update can use: the parameter's shape, dtype and device (torch's
    SGD fails on any other, possibly after updating other parameters)."""
    if buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
        raise RuntimeError(
            f"manualbp.optim.SGD: momentum_buffer of shape {tuple(buf.shape)}, {buf.dtype} on "
            f"{buf.device} does not match its parameter ({tuple(p.shape)}, {p.dtype} on "
            f"{p.device})"
        )


def reference_step(params: list[Tensor], grads: list[Tensor],
                   momentum_buffers: list[Tensor | None], *, lr: float | Tensor,
                   weight_decay: float | Tensor, momentum: float, dampening: float,
                   nesterov: bool, maximize: bool) -> None:  # fmt: skip
    """The SGD update in plain torch ops, one param at a time (:class:`SGD`); ``None`` momentum
    buffers are replaced in the list by new ones. A tensor ``lr`` is used as a tensor
    (``addcmul_``: no host sync). Sparse (COO) gradients take the ops of torch's single-tensor
    SGD, so values and the (sparse) momentum buffers are torch's (``weight_decay`` is 0 for
    them: :meth:`SGD._plan` rejects it, as torch fails)."""
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
        if lr_t is not None and g.layout != torch.strided:
            p.add_(d_p, alpha=-lr_t)  # torch's sparse path: the lr as a scalar (addcmul_ has
            # no sparse kernel)
        elif lr_t is not None:
            # A 0-dim CPU tensor combines with tensors on any device; others must move.
            same = lr_t.device == p.device or lr_t.device.type == "cpu"
            p.addcmul_(d_p, lr_t if same else lr_t.to(p.device), value=-1)
        else:
            p.add_(d_p, alpha=-lr)


def kernel_step(params: list[Tensor], grads: list[Tensor], momentum_buffers: list, **hyper) -> None:
    """The SGD update by the multi-tensor kernel (``triton_kernels/sgd.py``): one launch for the
    split; on DTensors the same step on each rank's local shards; the reference ops for what the
    kernel does not take and inside CUDA-graph capture (its table of addresses is uploaded from
    the host and cached, which a capture cannot make safe)."""
    if library.any_dtensor(*params):
        _sharded_step(params, grads, momentum_buffers, **hyper)
        return
    sgd = library.load("sgd")
    capturing = params[0].is_cuda and torch.cuda.is_current_stream_capturing()
    if capturing or not sgd.supports(params, grads, momentum_buffers):
        reference_step(params, grads, momentum_buffers, **hyper)
        return
    sgd.sgd_step_(params, grads, momentum_buffers, **hyper)


def _sharded_step(params, grads, momentum_buffers, **hyper) -> None:
    """:func:`kernel_step` on the local shards of DTensor ``params``. The update is elementwise,
    so updating each rank's shard of a param with the same shard of its gradient and momentum
    buffer is the sharded update (a replicated param: the same update on every rank, as
    natively). A gradient or buffer placed otherwise than its param (a partial gradient) is
    redistributed to the param's placements first. New momentum buffers are wrapped as
    DTensors placed like their params, as native SGD keeps them."""
    local_params, local_grads, local_bufs = [], [], []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        buf = momentum_buffers[i] if i < len(momentum_buffers) else None
        if library.any_dtensor(p):
            if not library.any_dtensor(g) or (buf is not None and not library.any_dtensor(buf)):
                raise TypeError(
                    "manualbp.optim.SGD: a DTensor parameter needs a DTensor gradient and "
                    f"momentum buffer, got {type(g).__name__} and {type(buf).__name__}"
                )
            g = _placed_like(g, p)
            if buf is not None:
                buf = momentum_buffers[i] = _placed_like(buf, p)  # SGD keeps the list's
                buf = buf.to_local()
            p, g = p.to_local(), g.to_local()
        local_params.append(p)
        local_grads.append(g)
        local_bufs.append(buf)
    if not momentum_buffers:
        local_bufs = []
    kernel_step(local_params, local_grads, local_bufs, **hyper)
    for i, p in enumerate(params):
        if i < len(momentum_buffers) and momentum_buffers[i] is None and local_bufs[i] is not None:
            buf = local_bufs[i]
            if library.any_dtensor(p):
                buf = type(p).from_local(
                    buf, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                    stride=p.stride(),
                )  # fmt: skip
            momentum_buffers[i] = buf


def _placed_like(t: Any, param: Any) -> Any:
    if t.device_mesh == param.device_mesh and t.placements == param.placements:
        return t
    return t.redistribute(param.device_mesh, param.placements)
