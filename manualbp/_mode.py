"""The one place that reads torch's mode state, and manualbp's own settings that ride on it.

Every entry point asks this module, once per call, which path runs:

* ``"eager"``: autograd records the call in plain eager mode: the op's ``autograd.Function``
  runs through autograd's C++ ``apply`` (no Python argument binding);
* ``"compile"``: ``torch.compile`` traces: the Function less its ``jvp`` (which Dynamo
  refuses), the kernels reached through their ``torch.library`` custom ops;
* ``"transform"``: ``torch.func`` transforms are active: the Function through
  ``Function.apply`` (its ``setup_context`` form, what ``vmap`` / ``grad`` / ``jvp`` need),
  computing with the differentiable reference ops;
* ``"plain"``: ``torch.export`` or ``torch.jit.trace`` records: neither can keep a Python
  Function, so the same math runs as plain differentiable torch ops (native aten ops in the
  captured graph);
* ``"nograd"``: nothing records the call: the forward alone, keeping nothing.

It also holds what depends on that state: autocast as ``F.linear`` meets it, whether a backward
may compute in place, ``manualbp.enable()``'s routing pause, and the backend setting
(``MANUALBP_BACKEND``, :func:`set_backend`, :func:`use_backend`: read at import and when set,
never from the environment per call). No other module of manualbp reads torch's private mode
flags.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.autograd import Function

__all__ = ["BACKENDS", "Applier", "autocast_dtype", "autocast_off", "cast", "compiling",
           "entry_point", "forward_ad_on", "get_backend", "in_place_ok", "setup", "kernels_for",
           "plain_eager", "records", "route", "routing_paused", "set_backend", "transforms_active",
           "untraced", "use_backend"]  # fmt: skip

# torch's mode reads, bound once: no attribute look-ups on the per-call paths.
grad_enabled = torch.is_grad_enabled
_will_execute = torch._C._will_engine_execute_node
transforms_active = torch._C._are_functorch_transforms_active
compiling = torch.compiler.is_compiling
_function_mode_on = torch._C._is_torch_function_mode_enabled
_autocast_on = torch._C._is_any_autocast_enabled
_jit_trace_state = torch._C._is_tracing
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def forward_ad_on() -> bool:
    """Inside ``torch.autograd.forward_ad.dual_level()``: a Function's ``jvp`` may run."""
    return fwAD._current_level >= 0


def jit_tracing() -> bool:
    """``torch.jit.is_tracing()`` (never true under torch.compile, which cannot trace the read)."""
    return not compiling() and _jit_trace_state()


def captured() -> bool:
    """Whether ``torch.export`` or ``torch.jit.trace`` records this call: neither keeps a Python
    autograd.Function (export records its forward under no_grad; jit.trace an opaque op)."""
    return torch.compiler.is_exporting() or jit_tracing()


def records(*tensors: Tensor | None) -> bool:
    """Whether autograd records a call on ``tensors`` (or forward-mode AD is on)."""
    if grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return fwAD._current_level >= 0


def plain_eager(a: Tensor, b: Tensor, c: Tensor | None = None) -> bool:
    """The fast question: plain eager autograd records a call on ``a``, ``b`` (``c``) and nothing
    else is on (torch.compile, export, jit.trace, torch.func, forward AD, autocast, a
    TorchFunctionMode). Entry points then apply their Function at once. (torch.export sets
    torch.compile's flag too.)"""
    if (
        not grad_enabled()
        or _function_mode_on()
        or _autocast_on()
        or transforms_active()
        or fwAD._current_level >= 0
        or compiling()
        or _jit_trace_state()  # read only outside torch.compile, which cannot trace it
    ):
        return False
    return a.requires_grad or b.requires_grad or (c is not None and c.requires_grad)


def route(*tensors: Tensor | None) -> str:
    """Which path a call on ``tensors`` takes (module docstring): ``"plain"``, ``"compile"``,
    ``"transform"``, ``"eager"`` or ``"nograd"``."""
    if captured():
        return "plain"
    if not records(*tensors):
        return "nograd"
    if compiling():
        return "compile"
    return "transform" if transforms_active() else "eager"


def in_place_ok(*tensors: Tensor) -> bool:
    """Whether a backward may compute in place on fresh temporaries: not while autograd records
    it (double backward), and not on batched gradients (``torch.func`` transforms, or the legacy
    vmap of ``jacobian(..., vectorize=True)`` / ``is_grads_batched=True``)."""
    if grad_enabled() or transforms_active():
        return False
    return compiling() or not any(_legacy_batched(t) for t in tensors)


def second_order_op() -> bool:
    """Whether a backward is recorded for a double backward (``create_graph=True``) in plain
    eager mode: where an op may run its backward as an op of its own, whose backward is
    hand-derived (not while torch.compile traces or under torch.func transforms: there the
    differentiable reference ops run)."""
    return grad_enabled() and not compiling() and not transforms_active()


def reached(ctx: Any, tensor_args: Sequence[bool]) -> tuple[bool, ...]:
    """``ctx.needs_input_grad`` less the inputs this backward pass does not reach:
    ``torch.autograd.grad(outputs, inputs)`` runs only the edges towards its ``inputs`` (the
    input gradient of an eikonal loss needs no weight gradients), as aten's backward formulas
    skip what the engine will not use. ``tensor_args``: which of the Function's inputs were
    tensors (only those have edges). While torch.compile traces: ``needs_input_grad``."""
    needs = ctx.needs_input_grad
    if compiling():
        return needs
    try:
        edges = iter(ctx.next_functions)
        nodes = [next(edges)[0] if is_tensor else None for is_tensor in tensor_args]
    except (AttributeError, RuntimeError, StopIteration):  # not a node the engine runs
        return needs
    return tuple(bool(need and node is not None and _executes(node))
                 for need, node in zip(needs, nodes, strict=True))  # fmt: skip


def _executes(node: Any) -> bool:
    try:
        return _will_execute(node)
    except RuntimeError:  # a leaf that autograd.grad asks for: torch will not say; it does
        return True


def internal_grads(*grads: Tensor | None) -> tuple:
    """The gradients a backward takes for its internal outputs (:func:`setup`): as handed,
    except while torch.compile traces: none."""
    if all(g is None for g in grads) or not compiling():
        return grads
    return (None,) * len(grads)


def setup(ctx: Any, *internal: Tensor | None) -> bool:
    """What every Function's ``setup_context`` records of the mode, in one call: the backend
    setting of the forward's thread (``ctx.choice``: a backward may run on another thread, as
    CUDA's autograd threads), and its ``internal`` outputs (what its backward reads: a
    pre-activation, a hidden layer's saved tensor): differentiable, so that a double backward
    differentiates through them as native autograd does through what it saves (their gradients
    come as ``None`` when unused), except while torch.compile traces (which has no double
    backward): non-differentiable, and the backward then ignores what it is handed for them
    (Dynamo's speculation hands it placeholders: :func:`internal_grads`). Returns whether a
    ``jvp`` may run (forward AD, torch.func): only then may a Function keep tensors for it (its
    output among them would make a reference cycle otherwise)."""
    choice = _thread_choice.name
    ctx.choice = _process_choice if choice is None else choice
    for t in internal:
        if t is not None:  # (no comprehension: a call each, and small layers feel calls)
            if compiling():
                ctx.mark_non_differentiable(*(t for t in internal if t is not None))
            ctx.set_materialize_grads(False)  # their gradients: None, not zeros
            break
    return fwAD._current_level >= 0 or transforms_active()


class Applier:
    """How one autograd Function is applied, per call (module docstring): through autograd's C++
    ``apply`` in eager mode, its jvp-less twin while torch.compile traces (Dynamo refuses a
    Function that defines ``jvp``), ``Function.apply`` under torch.func transforms."""

    def __init__(self, fn: type[Function]) -> None:
        self.fn = fn
        self.eager = super(Function, fn).apply  # autograd's C++ apply, bound to ``fn``
        # The engine calls the backward node's ``apply``, which by default looks up backward
        # (and checks that no vjp is defined too) on every call: call it directly.
        fn._backward_cls.apply = fn.backward  # type: ignore[attr-defined]
        namespace = {"jvp": staticmethod(Function.jvp), "__module__": fn.__module__}
        self.traced = type(fn.__name__, (fn,), namespace)  # same name: grad_fn reads the same

    def __call__(self, *args: Any) -> Any:
        if compiling():
            return self.traced.apply(*args)
        if transforms_active():
            return self.fn.apply(*args)
        # What Function.apply does before the C++ apply, with no transform active: unwrap the
        # tensor wrappers of finished torch.func transforms (a vjp_fn called later).
        return self.eager(*[_unwrap_if_dead(a) if isinstance(a, Tensor) else a for a in args])


unwrap_dead = _unwrap_if_dead  # for a fast path that applies with ``Applier.eager`` itself


# --------------------------------------------------------------------------------------------
# Autocast, as F.linear meets it
# --------------------------------------------------------------------------------------------
def autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The autocast dtype of ``t``'s device (CUDA and CPU have one), or ``None`` where off."""
    if not _autocast_on():  # the common case, in one call
        return None
    device_type = "cuda" if t.is_cuda else ("cpu" if t.is_cpu else None)
    if device_type is None or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast(dtype: torch.dtype | None, *tensors: Tensor | None) -> tuple:
    """``tensors`` as autocast casts them for a lower-precision op (``F.linear``): every
    floating tensor but float64 goes to ``dtype`` (no-op when ``dtype`` is None)."""
    if dtype is None:
        return tensors
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def autocast_off(t: Tensor) -> torch.autocast:
    """Autocast switched off for ``t``'s device while manualbp computes in the dtypes it chose
    (entered only where autocast is on: not every device type has one)."""
    return torch.autocast(t.device.type, enabled=False)


# --------------------------------------------------------------------------------------------
# manualbp.enable(): the TorchFunctionMode stack and the routing pause
# --------------------------------------------------------------------------------------------
def function_modes() -> list:
    """The calling thread's TorchFunctionMode stack, innermost last."""
    return torch.overrides._get_current_function_mode_stack()


# Set while a manualbp entry point runs with a TorchFunctionMode on: manualbp.enable()'s mode
# then leaves the F.linear / F.mse_loss calls manualbp makes itself to PyTorch. A plain module
# global (torch.compile can trace it); shared by threads: while one thread runs a manualbp op
# under a mode, a call another thread routes meanwhile runs natively, with the same result.
_paused = False


def routing_paused() -> bool:
    return _paused


def untraced(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` without the TracerWarnings torch.jit.trace gives manualbp's own
    checks and plans (they compare traced sizes, which is no data flow, and native emits no
    such warning). Only for manualbp's code: a user's module called inside would lose the
    warnings it gets natively. Call it where :func:`jit_tracing`; elsewhere it costs a
    ``warnings.catch_warnings``."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return fn(*args, **kwargs)


def entry_point(fn: Callable) -> Callable:
    """``fn`` (a checked entry point) with manualbp.enable()'s routing paused while a mode is
    on, and without the TracerWarnings of its argument checks under torch.jit.trace
    (:func:`untraced`)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _paused
        if _paused or not _function_mode_on():
            return untraced(fn, *args, **kwargs) if jit_tracing() else fn(*args, **kwargs)
        _paused = True
        try:
            return untraced(fn, *args, **kwargs) if jit_tracing() else fn(*args, **kwargs)
        finally:
            _paused = False

    return functools.update_wrapper(wrapper, fn)


# --------------------------------------------------------------------------------------------
# The backend setting
# --------------------------------------------------------------------------------------------
BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "MANUALBP_BACKEND"
# Whether triton is installed, looked up without importing it (importing triton reads
# TRITON_INTERPRET, which must be set first). A constant, so torch.compile can fold it.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _check(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(
            f"{source}: unknown manualbp backend {name!r}; expected one of {', '.join(BACKENDS)}"
        )
    return name.lower()


def _from_environment() -> str:
    value = os.environ.get(ENV_VAR)
    return "auto" if value is None else _check(value, f"{ENV_VAR} environment variable")


class _ThreadChoice(threading.local):
    """The innermost :func:`use_backend` of the calling thread (``None``: none). ``name`` is an
    instance attribute in every thread, so torch.compile guards on a plain attribute read,
    evaluated in the calling thread."""

    def __init__(self) -> None:
        self.name: str | None = None


_thread_choice = _ThreadChoice()
# The process-wide setting: set_backend's, or the environment variable's read at import (a
# module global, which torch.compile guards on). An invalid variable fails at first use.
try:
    _process_choice = _from_environment()
except ValueError as _error:
    _process_choice = _error  # type: ignore[assignment]


def get_backend() -> str:
    """The calling thread's backend: ``"auto"``, ``"reference"`` or ``"triton"`` (its innermost
    :func:`use_backend`, else :func:`set_backend`'s, else ``MANUALBP_BACKEND`` as read at import
    or at the last ``set_backend(None)``)."""
    name = _thread_choice.name
    if name is not None:
        return name
    if isinstance(_process_choice, ValueError):
        raise _process_choice
    return _process_choice


def set_backend(name: str | None) -> None:
    """Choose the backend for the whole process (every thread); ``None`` reads
    ``MANUALBP_BACKEND`` again. A :func:`use_backend` block open in a thread still wins there."""
    global _process_choice
    _process_choice = _from_environment() if name is None else _check(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed calls of this thread on backend ``name``, then restore the thread's
    previous choice; other threads are not affected. Work torch runs on threads of its own does
    not see the block (the backward of CUDA tensors runs on autograd's device threads): a
    Function passes its forward's choice on to its backward.

    Example::

        with manualbp.use_backend("reference"):
            y = model(x)
    """
    previous = _thread_choice.name
    _thread_choice.name = _check(name, "use_backend")
    try:
        yield
    finally:
        _thread_choice.name = previous


def backward_kernels(*tensors: Tensor | None, choice: str) -> bool:
    """Whether a backward runs the kernels: not while autograd records it (double backward:
    the differentiable reference ops) or under torch.func transforms (batched tensors), and
    only where its forward's ``choice`` puts ``tensors`` on them."""
    if grad_enabled() or transforms_active() or choice == "reference":
        return False
    if choice == "auto":  # kernels_for's rule, inline: every backward asks
        for t in tensors:
            if t is not None and not t.is_cuda:
                return False
        return TRITON_INSTALLED
    return kernels_for(*tensors, choice=choice)


def kernels_for(*tensors: Tensor | None, choice: str | None = None) -> bool:
    """Whether the Triton kernels (``True``) or the reference torch ops run an op on
    ``tensors`` under ``choice`` (default: the calling thread's setting). ``"auto"``: the
    kernels for CUDA tensors (when triton is installed); ``"triton"``: the kernels, which need
    CUDA tensors or Triton's CPU interpreter (a ``RuntimeError`` says why not)."""
    if choice is None:
        choice = _thread_choice.name or _process_choice
        if choice.__class__ is ValueError:  # an invalid MANUALBP_BACKEND, read at import
            raise choice  # type: ignore[misc]
    if choice == "reference":
        return False
    if choice == "auto":
        for t in tensors:
            if t is not None and not t.is_cuda:
                return False
        return TRITON_INSTALLED
    if not TRITON_INSTALLED:
        raise RuntimeError("manualbp backend 'triton' was requested but triton is not installed")
    from manualbp.kernels import _host

    others = sorted({str(t.device) for t in tensors if t is not None and not t.is_cuda})
    if others and not all(_host.runs_on(torch.device(d)) for d in others):
        raise RuntimeError(
            f"manualbp backend 'triton' got tensors on {', '.join(others)}; Triton runs them "
            "only under its interpreter: set TRITON_INTERPRET=1 before importing triton, or "
            "use the 'reference' or 'auto' backend"
        )
    return True
