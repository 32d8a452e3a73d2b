"""``manualbp.convert``: swap the built-in layers of an existing model for manualbp's, in place."""

from __future__ import annotations

import itertools
from collections import Counter

from torch import nn

from manualbp.modules.linear import Linear
from manualbp.modules.loss import MSELoss

__all__ = ["convert"]


def _fusable_activation(module: nn.Module) -> tuple[str, float] | None:
    """``(activation, negative_slope)`` for an activation module Linear can absorb."""
    kind = type(module)
    if kind is nn.ReLU:
        return "relu", 0.01
    if kind is nn.GELU:
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), 0.01
    if kind is nn.SiLU:
        return "silu", 0.01
    if kind is nn.Tanh:
        return "tanh", 0.01
    if kind is nn.Sigmoid:
        return "sigmoid", 0.01
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    return None


def _has_hooks(module: nn.Module) -> bool:
    return any(
        getattr(module, name, None)
        for name in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        )
    )


def _swap(module: nn.Module) -> None:
    # Re-class the very object: its Parameters, buffers, hooks and identity stay, so an
    # optimizer built before the swap, and modules that read .weight directly, keep working.
    if type(module) is nn.Linear:
        module.__class__ = Linear
        module.activation = None
        module.negative_slope = 0.01
    elif type(module) is nn.MSELoss:
        module.__class__ = MSELoss


def _fuse(seq: nn.Sequential, shared: set[int]) -> None:
    names = list(seq._modules)
    for name, next_name in itertools.pairwise(names):
        linear, act_module = seq._modules[name], seq._modules[next_name]
        if type(linear) is not Linear or linear.activation is not None:
            continue
        if id(linear) in shared:
            continue  # used elsewhere too: the activation would apply at every use
        fused = _fusable_activation(act_module)
        if fused is None or _has_hooks(linear) or _has_hooks(act_module):
            continue
        linear.activation, linear.negative_slope = fused
        seq._modules[next_name] = nn.Identity()


def convert(model: nn.Module, fuse_activations: bool = True) -> nn.Module:
    """Swap every ``nn.Linear`` and ``nn.MSELoss`` in ``model`` for manualbp's, in place.

    Only modules whose type is exactly ``nn.Linear`` / ``nn.MSELoss`` are swapped
    (subclasses may override behaviour manualbp cannot know of; e.g.
    ``nn.MultiheadAttention.out_proj`` stays as it is, and keeps working). Each swapped
    module keeps its very Parameter objects and hooks, so an optimizer built before the
    call keeps working.

    With ``fuse_activations``, where an ``nn.Sequential`` has a Linear followed by an
    ``nn.ReLU``, ``nn.GELU``, ``nn.SiLU``, ``nn.Tanh``, ``nn.Sigmoid`` or ``nn.LeakyReLU``
    (and neither has hooks, and the Linear is not registered anywhere else in ``model``),
    the activation is folded into the Linear and an
    ``nn.Identity`` is left in its slot, so indices and ``state_dict`` keys are unchanged.

    Returns ``model`` itself.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
        >>> manualbp.convert(model)
        Sequential(
          (0): Linear(in_features=8, out_features=16, bias=True, activation='gelu')
          (1): Identity()
          (2): Linear(in_features=16, out_features=1, bias=True)
        )
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        _swap(module)
    if fuse_activations:
        # A Linear registered in more than one place (tied, or reused) is never fused.
        uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        shared = {key for key, count in uses.items() if count > 1}
        for module in model.modules():
            if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
                _fuse(module, shared)
    return model
