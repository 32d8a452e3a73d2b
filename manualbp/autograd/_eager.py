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

from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd import Function

__all__ = ["Forms", "eager_twin", "without_jvp"]


def eager_twin(cls: type[Function]) -> type[Function]:
    """A ``forward(ctx, *args)`` Function running ``cls``'s forward, setup_context,
    backward and jvp."""

    def forward(ctx: Any, *args: Any) -> Any:
        output = cls.forward(*args)
        cls.setup_context(ctx, args, output)
        return output

    namespace = {
        "forward": staticmethod(forward),
        "backward": staticmethod(cls.backward),
        "__doc__": f"Eager twin of :class:`{cls.__qualname__}` (see manualbp.autograd._eager).",
        "__module__": cls.__module__,
    }
    if "jvp" in vars(cls):
        namespace["jvp"] = staticmethod(cls.jvp)
    return type(cls.__name__, (Function,), namespace)


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

    @classmethod
    def of(cls, fn: type[Function]) -> Forms:
        return cls(fn, eager_twin(fn), without_jvp(fn))

    def pick(self) -> type[Function]:
        if torch.compiler.is_compiling():
            return self.traced
        if torch._C._are_functorch_transforms_active():
            return self.canonical
        return self.eager
