"""manualbp's exception classes."""

from __future__ import annotations

__all__ = ["ShapeError", "not_scriptable"]


class ShapeError(ValueError, RuntimeError):
    """Tensor shapes that do not fit an op (a width mismatch, shapes that do not broadcast).

    ``F.linear`` and ``F.mse_loss`` raise ``RuntimeError`` for these, and manualbp has always
    raised ``ValueError``: this class is both, so ``except RuntimeError`` written for native
    PyTorch and ``except ValueError`` written for manualbp both catch it.
    """


def not_scriptable(module: object) -> RuntimeError:
    """The error ``torch.jit.script`` gets for a manualbp module (raised from its
    ``__prepare_scriptable__``, which ``torch.jit.script`` calls on every submodule first)."""
    name = f"manualbp.{type(module).__name__}"
    return RuntimeError(
        f"torch.jit.script cannot compile {name}: its forward runs manualbp's Python "
        "autograd.Functions (the hand-written backward), which TorchScript cannot compile. "
        "Use torch.compile(model), which keeps the hand-written backward, or "
        "torch.jit.trace(model, example_inputs) / torch.export.export(model, args), which "
        "record the same math as native aten ops (trained with native autograd)."
    )
