"""``manualbp.convert``: swap the built-in layers of an existing model for manualbp's, in place."""

from __future__ import annotations

from torch import nn

from manualbp.modules.linear import Linear
from manualbp.modules.loss import MSELoss
from manualbp.modules.sequential import Sequential

__all__ = ["convert"]


def _swap(module: nn.Module, fuse_activations: bool, fuse_mlp: bool) -> None:
    # Re-class the very object: its Parameters, buffers, hooks and identity stay, so an
    # optimizer built before the swap, and modules that read .weight directly, keep working.
    if type(module) is nn.Linear:
        module.__class__ = Linear
        module.activation = None
        module.negative_slope = 0.01
    elif type(module) is nn.MSELoss:
        module.__class__ = MSELoss
    elif type(module) is nn.Sequential and fuse_activations:
        module.__class__ = Sequential
    if isinstance(module, Sequential):
        module.fuse_mlp = fuse_mlp


def convert(model: nn.Module, fuse_activations: bool = True, fuse_mlp: bool = True) -> nn.Module:
    """Swap every ``nn.Linear`` and ``nn.MSELoss`` in ``model`` for manualbp's, in place.

    Only modules whose type is exactly ``nn.Linear`` / ``nn.MSELoss`` are swapped
    (subclasses may override behaviour manualbp cannot know of; e.g.
    ``nn.MultiheadAttention.out_proj`` stays as it is, and keeps working). Each swapped
    module keeps its very Parameter objects and hooks, so an optimizer built before the
    call keeps working.

    With ``fuse_activations``, every ``nn.Sequential`` becomes a :class:`manualbp.Sequential`
    (in place: children, indices and ``state_dict`` keys unchanged), which runs a Linear
    followed by an ``nn.ReLU``, ``nn.GELU``, ``nn.SiLU``, ``nn.Tanh``, ``nn.Sigmoid`` or
    ``nn.LeakyReLU`` as one fused call when it iterates them itself and neither has hooks.
    The modules themselves are not changed: ``model[0](x)`` is still the pre-activation.
    With ``fuse_mlp`` (on the Triton backend), runs of two or more Linear (+ activation)
    layers of widths <= 128 run as one fused MLP (:class:`manualbp.FusedMLP`'s kernels);
    ``False`` keeps the pairs.

    Returns ``model`` itself.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
        >>> manualbp.convert(model)
        Sequential(
          fused=[0+1]
          (0): Linear(in_features=8, out_features=16, bias=True)
          (1): GELU(approximate='none')
          (2): Linear(in_features=16, out_features=1, bias=True)
        )
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        _swap(module, fuse_activations, fuse_mlp)
    return model
