"""``manualbp.enable``: run any model's ``F.linear`` and ``F.mse_loss`` calls on manualbp.

Inside it, every call of ``torch.nn.functional.linear`` and ``torch.nn.functional.mse_loss``
-- so every ``nn.Linear`` and ``nn.MSELoss``, those a ``forward`` creates on the fly, and
direct calls with a model's own weights -- goes to :func:`manualbp.functional.linear` /
:func:`manualbp.functional.mse_loss`, with their hand-written backward, for a model left as
it is. It is a :class:`torch.overrides.TorchFunctionMode`, so:

* it holds for the current thread, like grad mode (a new thread starts without it);
* every torch call made inside it passes through one Python function, which costs eager
  time on models of many small ops; :func:`manualbp.convert` has no such cost;
* ``torch.compile`` traces through it (``fullgraph=True`` included), recompiling when it is
  switched; enable it around the call of the compiled function, not inside it.

A call manualbp does not take is left to PyTorch unchanged (native result, native error):
arguments that are not plain tensors (tensor subclasses), ``F.linear`` on a weight that is
not 2-D or on integer or mixed dtypes, ``F.mse_loss`` with the legacy ``size_average``/
``reduce`` or a ``weight``, and whatever PyTorch itself would reject. The F.linear and
F.mse_loss calls manualbp makes itself (its reference backend runs on them) stay native:
the mode is off while a manualbp op runs. It composes with :func:`manualbp.convert`
(converted modules call manualbp directly), with :class:`manualbp.Sequential`'s fusion and
with autocast (manualbp casts as the native ops do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from manualbp import _mode
from manualbp.ops._checks import PLAIN, REDUCTIONS
from manualbp.ops.linear import linear
from manualbp.ops.mse import mse_loss

__all__ = ["enable", "is_enabled"]


def _plain(*tensors: object) -> bool:  # each a Tensor or Parameter, no subclass
    return all(type(t) in PLAIN for t in tensors)


def _one_device(*tensors: Tensor) -> bool:
    return len({t.device for t in tensors}) == 1


def _broadcastable(a: torch.Size, b: torch.Size) -> bool:
    pairs = zip(reversed(a), reversed(b), strict=False)  # the trailing dimensions
    return all(x == y or x == 1 or y == 1 for x, y in pairs)


def _takes_linear(input: object, weight: object, bias: object) -> bool:
    """Whether manualbp runs ``F.linear(input, weight, bias)`` (else PyTorch does)."""
    tensors = (input, weight) if bias is None else (input, weight, bias)
    if not _plain(*tensors) or not _one_device(*tensors):
        return False
    if weight.dim() != 2 or input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        return False
    # The dtypes the op computes in: autocast's, as functional.linear casts them.
    dtypes = {t.dtype for t in _mode.cast(_mode.autocast_dtype(input), *tensors)}
    return len(dtypes) == 1 and input.dtype.is_floating_point


def _linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    # Under torch.jit.trace the question compares traced sizes: no TracerWarning for that.
    args = (input, weight, bias)
    if _mode.untraced(_takes_linear, *args) if _mode.jit_tracing() else _takes_linear(*args):
        return linear(input, weight, bias)
    return F.linear(input, weight, bias)


def _takes_mse(input, target, size_average, reduce, reduction, weight) -> bool:
    """Whether manualbp runs ``F.mse_loss`` with these arguments (else PyTorch does)."""
    if size_average is not None or reduce is not None or weight is not None:
        return False  # legacy reduction arguments, or a weighted loss: native's
    if not _plain(input, target) or not _one_device(input, target):
        return False
    return (
        reduction in REDUCTIONS
        and _broadcastable(input.shape, target.shape)
        and torch.promote_types(input.dtype, target.dtype).is_floating_point
    )


def _mse_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    args = (input, target, size_average, reduce, reduction, weight)
    if _mode.untraced(_takes_mse, *args) if _mode.jit_tracing() else _takes_mse(*args):
        return mse_loss(input, target, reduction)
    kwargs = {} if weight is None else {"weight": weight}
    return F.mse_loss(input, target, size_average, reduce, reduction, **kwargs)


class _Routing(TorchFunctionMode):
    """The mode behind :func:`enable`. PyTorch switches a mode off while its handler runs,
    so the calls made in ``_linear``/``_mse_loss`` (PyTorch's or manualbp's) are not seen
    again; manualbp's entry points pause it when called directly (``_mode.entry_point``).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _mode.routing_paused():
            if func is F.linear:
                return _linear(*args, **kwargs)
            if func is F.mse_loss:
                return _mse_loss(*args, **kwargs)
        return func(*args, **kwargs)


def is_enabled() -> bool:
    """Whether :func:`enable` routes ``F.linear``/``F.mse_loss`` to manualbp in this thread."""
    return any(isinstance(mode, _Routing) for mode in _mode.function_modes())


def _set_enabled(on: bool) -> None:
    if on == is_enabled():
        return
    if on:
        _Routing().__enter__()
        return
    # Off: take manualbp's mode out of the stack wherever it is, whatever was entered after it
    # (and not left yet) staying as it is, in its order: leaving a ``with manualbp.enable()``
    # block leaves manualbp off, even when the block entered another mode and kept it.
    above = []
    while not isinstance(top := torch.overrides._pop_mode(), _Routing):
        above.append(top)
    for mode in reversed(above):
        torch.overrides._push_mode(mode)


class enable:  # noqa: N801 -- a function-like context manager, as torch.set_grad_enabled
    """Route ``F.linear`` and ``F.mse_loss`` (``nn.Linear``, ``nn.MSELoss``) to manualbp.

    Like ``torch.set_grad_enabled``, it takes effect when called and, used as a context
    manager, restores the previous state on exit::

        with manualbp.enable():          # on for this block
            loss = nn.MSELoss()(model(x), y)
        loss.backward()                  # manualbp's backward (grad_fn recorded above)

        manualbp.enable()                # on from here on, in this thread
        manualbp.enable(False)           # off again
        with manualbp.enable(False):     # off for a block, then back to what it was
            ...

    ``manualbp.overrides.is_enabled()`` says whether it is on. Switching it off leaves a mode
    entered after it (and not left yet) on. :mod:`manualbp.overrides` says what is routed.
    """

    def __init__(self, mode: bool = True) -> None:
        if not isinstance(mode, bool):
            raise TypeError(f"manualbp.enable: mode must be a bool, got {type(mode).__name__}")
        self.previous = is_enabled()
        self.mode = mode
        _set_enabled(mode)

    def __enter__(self) -> enable:
        return self

    def __exit__(self, *exc: object) -> None:
        _set_enabled(self.previous)

    def __repr__(self) -> str:
        return f"manualbp.enable({self.mode})"
