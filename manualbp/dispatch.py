"""The one place that decides which backend runs an op.

``MANUALBP_BACKEND`` (read at each call), :func:`set_backend` (process-wide, takes precedence
over the variable) and :func:`use_backend` (this thread only, takes precedence over both)
choose among:

* ``"auto"`` (default): CUDA tensors go to the Triton kernels, everything else to the
  reference path (plain torch ops);
* ``"reference"``: plain torch ops everywhere;
* ``"triton"``: Triton kernels everywhere. On CPU tensors this needs ``TRITON_INTERPRET=1``
  set before anything imports triton (that is how CI runs the kernels).

:func:`backend_for` turns that setting and the call's tensors into a
:class:`~manualbp.backends.Backend`; every autograd Function, the fused head and the
optimizer ask it, and only it, which backend to call.

Threads. :func:`use_backend` is per thread, as ``torch.no_grad`` is: a block in one thread
changes nothing in the others, overlapping blocks in several threads each restore their own
previous choice, and a new thread starts without one (it sees :func:`set_backend` /
``MANUALBP_BACKEND``). Work that torch runs on threads of its own does not see the block
either: the backward of CUDA tensors runs on autograd's device threads, and
``nn.DataParallel`` runs its replicas on worker threads. A Function that must run its
backward on the backend its forward saw passes that choice on (``backend_for(...,
choice=...)``, :func:`get_backend` read in the forward).

``torch.compile``: the choice is made when a graph is traced, and the compiled code is
guarded on the setting it read: the calling thread's override (an attribute of a
``threading.local``, which dynamo reads, and checks on each call, in the calling thread), the
process-wide setting (a module global) and the environment variable. Another setting
re-traces; a compiled function may be called in several threads with different blocks open.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from typing import Literal

import torch

from manualbp.backends import Backend
from manualbp.backends.reference import REFERENCE
from manualbp.backends.triton import TRITON
from manualbp.kernels._host import interpreting

__all__ = [
    "BACKENDS",
    "backend_for",
    "eager_backend_for",
    "get_backend",
    "interpreter_enabled",
    "resolve",
    "set_backend",
    "triton_available",
    "use_backend",
]

BackendName = Literal["reference", "triton"]
BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "MANUALBP_BACKEND"


class _ThreadChoice(threading.local):
    """The innermost :func:`use_backend` choice of the calling thread (``None``: none).

    ``__init__`` runs in every thread that touches the object, so ``name`` always exists as an
    instance attribute: dynamo then guards compiled code on ``_thread_choice.name`` by a
    plain attribute read, evaluated in the calling thread (with a class-level default it
    guards on the thread-local ``__dict__`` instead, which it does not re-read per thread).
    """

    def __init__(self) -> None:
        self.name: str | None = None


_thread_choice = _ThreadChoice()

# Set by set_backend(), for every thread; None means "read the environment variable". A module
# global, which torch.compile guards on.
_process_choice: str | None = None


def _check(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(
            f"{source}: unknown manualbp backend {name!r}; expected one of {', '.join(BACKENDS)}"
        )
    return name.lower()


def get_backend() -> str:
    """The backend configured for the calling thread: ``"auto"``, ``"reference"`` or
    ``"triton"`` (its innermost :func:`use_backend`, else :func:`set_backend`'s choice, else
    ``MANUALBP_BACKEND``)."""
    name = _thread_choice.name
    if name is not None:
        return name
    if _process_choice is not None:
        return _process_choice
    return _env_choice(_env_value())


def _env_choice(value: str | None) -> str:
    if value is None or value in BACKENDS:
        return value or "auto"
    return _check(value or "auto", f"{ENV_VAR} environment variable")


# The environment's own mapping, looked up directly: ``os.environ.get`` encodes the key and
# decodes the value in Python on every call, a microsecond small layers feel. ``os.environ``
# keeps ``_data`` in step with every assignment made through it (``monkeypatch.setenv``).
_ENV_KEY = os.environ.encodekey(ENV_VAR) if isinstance(os.environ, os._Environ) else ENV_VAR


def _env_value() -> str | None:
    """``os.environ.get(ENV_VAR)``, without its per-call encoding where ``os.environ`` is the
    standard mapping (not replaced by a test's mock) and torch.compile is not tracing (it
    traces ``os.environ`` itself)."""
    env = os.environ
    if torch.compiler.is_compiling() or type(env) is not os._Environ:
        return env.get(ENV_VAR)
    raw = env._data.get(_ENV_KEY)
    return None if raw is None else env.decodevalue(raw)


def set_backend(name: str | None) -> None:
    """Choose the backend for the whole process (every thread); ``None`` goes back to
    ``MANUALBP_BACKEND``. A :func:`use_backend` block open in a thread still takes precedence
    there."""
    global _process_choice
    _process_choice = None if name is None else _check(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed calls of this thread on backend ``name``, then restore the thread's
    previous choice. Other threads are not affected (see the module docstring).

    Example::

        with manualbp.use_backend("reference"):
            y = model(x)
    """
    choice = _check(name, "use_backend")
    state = _thread_choice
    previous = state.name
    state.name = choice
    try:
        yield
    finally:
        state.name = previous


interpreter_enabled = interpreting  # whether Triton's CPU interpreter is on


# Whether triton is installed, looked up once without importing it (importing triton reads
# TRITON_INTERPRET, which must be set first). A constant, so torch.compile can fold it.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def resolve(*tensors: torch.Tensor | None, choice: str | None = None) -> BackendName:
    """The name of the backend that runs an op on ``tensors`` under ``choice`` (default: the
    calling thread's setting, :func:`get_backend`)."""
    if choice is None:
        choice = get_backend()
    elif choice not in BACKENDS:
        choice = _check(choice, "resolve")
    if choice == "reference":
        return "reference"
    on_cuda = True
    for t in tensors:
        if t is not None and not t.is_cuda:
            on_cuda = False
            break
    if choice == "auto":
        return "triton" if on_cuda and _TRITON_INSTALLED else "reference"
    # choice == "triton": honour it, or say exactly why it cannot be honoured.
    if not _TRITON_INSTALLED:
        raise RuntimeError("manualbp backend 'triton' was requested but triton is not installed")
    if not on_cuda and not interpreter_enabled():
        devices = sorted({str(t.device) for t in tensors if t is not None and not t.is_cuda})
        raise RuntimeError(
            f"manualbp backend 'triton' got tensors on {', '.join(devices)}; Triton runs them "
            "only under its interpreter: set TRITON_INTERPRET=1 before importing triton, or "
            "use the 'reference' or 'auto' backend"
        )
    return "triton"


def backend_for(
    *tensors: torch.Tensor | None, differentiable: bool = False, choice: str | None = None
) -> Backend:
    """The backend for one call on ``tensors``.

    ``differentiable``: the result must carry a graph (a backward recorded for double
    backward), which only plain torch ops give. Inside ``torch.func`` transforms (vmap, grad,
    jvp) the reference path runs too: the kernels have no batching or forward-mode rules.
    ``choice``: the setting to resolve instead of the calling thread's (a backward running on
    autograd's CUDA device thread passes the :func:`get_backend` its forward read).
    """
    if differentiable or torch._C._are_functorch_transforms_active():
        return REFERENCE
    if choice is None:
        choice = get_backend()
    if choice == "auto":  # resolve()'s rule, inline: this runs for every op of every call
        for t in tensors:
            if t is not None and not t.is_cuda:
                return REFERENCE
        return TRITON if _TRITON_INSTALLED else REFERENCE
    return TRITON if resolve(*tensors, choice=choice) == "triton" else REFERENCE


def eager_backend_for(*tensors: torch.Tensor | None) -> Backend:
    """:func:`backend_for` for the autograd Functions' eager forms, which run only where no
    ``torch.func`` transform is active and torch.compile is not tracing: :func:`get_backend`
    inline, the environment read directly (torch.compile traces ``os.environ`` itself), for
    the per-call cost of small layers."""
    choice = _thread_choice.name
    if choice is None:
        choice = _process_choice
        if choice is None:
            env = os.environ
            if type(env) is not os._Environ:  # replaced (a test's mock): read it as it asks
                choice = _env_choice(env.get(ENV_VAR))
            else:
                raw = env._data.get(_ENV_KEY)
                choice = "auto" if raw is None else _env_choice(env.decodevalue(raw))
    if choice == "auto":
        for t in tensors:
            if t is not None and not t.is_cuda:
                return REFERENCE
        return TRITON if _TRITON_INSTALLED else REFERENCE
    return TRITON if resolve(*tensors, choice=choice) == "triton" else REFERENCE
