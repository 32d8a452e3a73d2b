"""Eager twins of the autograd Functions: the same forward, backward and jvp, without the
per-call cost of ``setup_context``.

``Function.apply`` on a Function that defines ``setup_context`` binds its arguments with
``inspect.signature(...).bind`` on every call (about a third of ``apply``), a cost small layers
feel. ``torch.func`` transforms need that form, so each Function keeps it, and
:func:`eager_twin` makes a class of the classic ``forward(ctx, ...)`` form that calls the very
same static methods; :class:`Forms` holds it beside the Function and a jvp-less copy for
torch.compile, and picks one per call. All share a name, so ``grad_fn`` reads the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

__all__ = ["Forms", "eager_twin", "without_jvp"]

_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
# Mode reads the eager paths make on every call, bound once (no attribute look-ups per call).
grad_enabled = torch.is_grad_enabled
transforms_active = torch._C._are_functorch_transforms_active


def eager_twin(cls: type[Function]) -> type[Function]:
    """A ``forward(ctx, *args)`` Function running ``cls``'s forward and setup_context, backward
    and jvp.

    A Function may define the two in one, ``forward_with_ctx(ctx, *args)``, to share work
    between them and to return its first output alone: what it would return beside it (a
    pre-activation, a gradient computed in the forward pass) it keeps on ``ctx``, so the twin
    has one output, the cheaper for autograd to wrap, and its ``backward`` is called with one
    gradient (the Function's backward takes the others as optional).
    """
    fused = getattr(cls, "forward_with_ctx", None)
    if fused is None:

        def forward(ctx: Any, *args: Any) -> Any:
            output = cls.forward(*args)
            cls.setup_context(ctx, args, output)
            return output

    else:
        forward = fused

    namespace = {
        "forward": staticmethod(forward),
        "backward": staticmethod(cls.backward),
        "__doc__": f"Eager twin of :class:`{cls.__qualname__}` (see manualbp.autograd._eager).",
        "__module__": cls.__module__,
    }
    if "jvp" in vars(cls):
        jvp = cls.jvp
        if fused is not None:  # one output: its tangent alone

            def jvp(ctx: Any, *tangents: Any, _jvp: Callable = cls.jvp) -> Any:
                return _jvp(ctx, *tangents)[0]

        namespace["jvp"] = staticmethod(jvp)
    twin = type(cls.__name__, (Function,), namespace)
    # The engine calls the backward node's ``apply``, which by default looks up backward (and
    # checks that no vjp is defined too) on every call; the twin's node calls it directly.
    twin._backward_cls.apply = cls.backward  # type: ignore[attr-defined]
    return twin


def without_jvp(cls: type[Function]) -> type[Function]:
    """``cls`` less its ``jvp`` (same name, so ``grad_fn`` reads the same), for torch.compile:
    Dynamo refuses to trace an ``autograd.Function`` that defines one."""
    namespace = {"jvp": staticmethod(Function.jvp), "__module__": cls.__module__}
    return type(cls.__name__, (cls,), namespace)


@dataclass(frozen=True)
class Forms:
    """The forms of one autograd Function and the choice among them for a call: ``traced``
    (no jvp) while torch.compile traces, ``canonical`` (``setup_context``) under ``torch.func``
    transforms, else ``eager`` (no per-call signature binding)."""

    canonical: type[Function]
    eager: type[Function]
    traced: type[Function]
    # ``eager.apply`` as autograd's C++ ``_FunctionBase.apply`` bound to ``eager``: what
    # ``Function.apply`` calls once it has checked for torch.func transforms and unwrapped
    # the dead ones' tensor wrappers, which :meth:`first` does itself.
    eager_apply: Callable[..., Any]
    # Whether the eager form returns the first output alone (``forward_with_ctx``).
    eager_returns_first: bool

    @classmethod
    def of(cls, fn: type[Function]) -> Forms:
        eager = eager_twin(fn)
        single = hasattr(fn, "forward_with_ctx")
        return cls(fn, eager, without_jvp(fn), super(Function, eager).apply, single)

    def pick(self) -> type[Function]:
        if torch.compiler.is_compiling():
            return self.traced
        if transforms_active():
            return self.canonical
        return self.eager

    def first(self, *args: Any) -> Any:
        """The first output of ``self.pick().apply(*args)``, the eager form's Python wrapper
        skipped."""
        if torch.compiler.is_compiling():
            return self.traced.apply(*args)[0]
        if transforms_active():
            return self.canonical.apply(*args)[0]
        out = self.eager_apply(*unwrap_dead(args))
        return out if self.eager_returns_first else out[0]


def unwrap_dead(args: tuple) -> list:
    """``args`` with the tensor wrappers of finished torch.func transforms unwrapped, as
    ``Function.apply`` does: a tensor saved inside a transform that has since returned (a
    vjp_fn called later) is a dead wrapper. See PyTorch's NOTE [functorch vjp and autograd
    interaction]. For callers that have checked that no transform is active."""
    return [_unwrap_if_dead(a) if isinstance(a, Tensor) else a for a in args]
