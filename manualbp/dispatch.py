"""The one place that decides which backend runs an op.

``MANUALBP_BACKEND`` (read at each call) or :func:`use_backend` / :func:`set_backend` (which
take precedence) choose among:

* ``"auto"`` (default): CUDA tensors go to the Triton kernels, everything else to the
  reference path (plain torch ops);
* ``"reference"``: plain torch ops everywhere;
* ``"triton"``: Triton kernels everywhere. On CPU tensors this needs ``TRITON_INTERPRET=1``
  set before anything imports triton (that is how CI runs the kernels).

:func:`backend_for` turns that setting and the call's tensors into a
:class:`~manualbp.backends.Backend`; every autograd Function, the fused head and the
optimizer ask it, and only it, which backend to call.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Literal

import torch

from manualbp.backends import Backend
from manualbp.backends.reference import REFERENCE
from manualbp.backends.triton import TRITON

__all__ = [
    "BACKENDS",
    "backend_for",
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

# Set by set_backend()/use_backend(); None means "read the environment variable".
# A plain module global (not thread-local) so that torch.compile can guard on it.
_override: str | None = None


def _check(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(
            f"{source}: unknown manualbp backend {name!r}; expected one of {', '.join(BACKENDS)}"
        )
    return name.lower()


def get_backend() -> str:
    """The configured backend: ``"auto"``, ``"reference"`` or ``"triton"``."""
    if _override is not None:
        return _override
    value = os.environ.get(ENV_VAR)
    if value is None or value in BACKENDS:
        return value or "auto"
    return _check(value or "auto", f"{ENV_VAR} environment variable")


def set_backend(name: str | None) -> None:
    """Choose the backend for this process; ``None`` goes back to ``MANUALBP_BACKEND``."""
    global _override
    _override = None if name is None else _check(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed calls on backend ``name``, then restore the previous choice.

    Example::

        with manualbp.use_backend("reference"):
            y = model(x)
    """
    global _override
    previous = _override
    _override = _check(name, "use_backend")
    try:
        yield
    finally:
        _override = previous


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is on (it is read when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Whether triton is installed, looked up once without importing it (importing triton reads
# TRITON_INTERPRET, which must be set first). A constant, so torch.compile can fold it.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def resolve(*tensors: torch.Tensor | None) -> BackendName:
    """The name of the backend that runs an op on ``tensors`` under the current setting."""
    choice = get_backend()
    if choice == "reference":
        return "reference"
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
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


def backend_for(*tensors: torch.Tensor | None, differentiable: bool = False) -> Backend:
    """The backend for one call on ``tensors``.

    ``differentiable``: the result must carry a graph (a backward recorded for double
    backward), which only plain torch ops give. Inside ``torch.func`` transforms (vmap, grad,
    jvp) the reference path runs too: the kernels have no batching or forward-mode rules.
    """
    if differentiable or torch._C._are_functorch_transforms_active():
        return REFERENCE
    return TRITON if resolve(*tensors) == "triton" else REFERENCE
