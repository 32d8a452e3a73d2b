"""Eager twins of the autograd Functions: the same forward, backward and jvp, without the
per-call cost of ``setup_context``.

``Function.apply`` on a Function that defines ``setup_context`` binds its arguments with
``inspect.signature(...).bind`` on every call (about a third of ``apply``), a cost small layers
feel. ``torch.func`` transforms need that form, so each Function keeps it, and
:func:`eager_twin` makes a class of the classic ``forward(ctx, ...)`` form that calls the very
same static methods. :func:`function_for` picks the twin unless a transform or
``torch.compile`` is tracing. Both share a name, so ``grad_fn`` reads the same.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd import Function

__all__ = ["eager_twin", "function_for"]


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


def function_for(cls: type[Function], twin: type[Function]) -> type[Function]:
    """``cls`` while a ``torch.func`` transform or ``torch.compile`` traces, else ``twin``."""
    if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return cls
    return twin
