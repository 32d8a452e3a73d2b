"""``manualbp.Sequential``: an ``nn.Sequential`` that runs Linear + activation pairs as one op.

Fusion happens in the container, at call time, never in the modules: ``seq[0]`` stays a plain
Linear and ``seq[1]`` the activation module, so each returns what it returns natively when
called on its own (feature extractors, forward hooks, slices such as ``seq[:-1]``).
"""

from __future__ import annotations

import itertools

from torch import Tensor, nn
from torch.nn.modules import module as _module

from manualbp import functional
from manualbp.activations import activation_of_module
from manualbp.modules.linear import Linear

__all__ = ["Sequential"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def has_hooks(module: nn.Module) -> bool:
    """Whether a hook would observe ``module``'s call (its own hooks or global module hooks)."""
    if any(getattr(module, name, None) for name in _HOOK_DICTS):
        return True
    return any(getattr(_module, name, None) for name in _GLOBAL_HOOK_DICTS)


def fusable_pair(first: nn.Module, second: nn.Module) -> tuple[str, float] | None:
    """``(activation, negative_slope)`` when ``first`` then ``second`` can run as one fused
    Linear call exactly as they run apart: a manualbp Linear without an activation of its
    own, then a registry activation module, neither observed by hooks."""
    if type(first) is not Linear or first.activation is not None:
        return None
    found = activation_of_module(second)
    if found is None or has_hooks(first) or has_hooks(second):
        return None
    act, slope = found
    return act.name, slope


class Sequential(nn.Sequential):
    r"""``nn.Sequential`` whose Linear + activation pairs run as one fused call.

    When the container's own ``forward`` reaches a :class:`manualbp.Linear` (without an
    activation) followed by an activation module of the registry (``nn.ReLU``, ``nn.GELU``,
    ``nn.SiLU``, ``nn.Tanh``, ``nn.Sigmoid``, ``nn.LeakyReLU``), it computes
    ``act(x W^T + b)`` in one call of :func:`manualbp.functional.linear` — one kernel on the
    Triton path, with the hand-derived fused backward. Everything else runs module by module,
    as in ``nn.Sequential``. A pair is not fused while either module has hooks (checked at
    each call, global module hooks included), so hooks see exactly what they see natively.

    :func:`manualbp.convert` re-classes ``nn.Sequential`` containers into this class in place;
    children, indices, ``state_dict`` keys and Parameters are unchanged.
    """

    def forward(self, input: Tensor) -> Tensor:
        modules = list(self._modules.values())
        i = 0
        while i < len(modules):
            module = modules[i]
            fused = fusable_pair(module, modules[i + 1]) if i + 1 < len(modules) else None
            if fused is None:
                input = module(input)
                i += 1
                continue
            activation, slope = fused
            input = functional.linear(
                input, module.weight, module.bias, activation, negative_slope=slope
            )
            i += 2
        return input

    def fused_pairs(self) -> list[tuple[str, str]]:
        """The (Linear, activation) child names the container fuses when called now."""
        items = list(self._modules.items())
        return [
            (name, next_name)
            for (name, m), (next_name, n) in itertools.pairwise(items)
            if fusable_pair(m, n) is not None
        ]

    def extra_repr(self) -> str:
        pairs = self.fused_pairs()
        return "fused=[" + ", ".join(f"{a}+{b}" for a, b in pairs) + "]" if pairs else ""
