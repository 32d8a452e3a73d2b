"""The backend choice and threads: ``use_backend`` is per thread (as ``torch.no_grad`` is),
``set_backend`` process-wide, and compiled code follows the calling thread's choice.

The threads meet at barriers inside their ``use_backend`` blocks, so the blocks really
overlap; which backend ran is counted per thread at the Triton launchers (eager and compiled:
the compiled graph calls the same launcher through its custom op).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable

import pytest
import torch
from manualbp.kernels import library
from torch.testing import assert_close

import manualbp

TIMEOUT = 120  # seconds a barrier waits (compiling under the interpreter is slow)
_TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_triton = pytest.mark.skipif(not _TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run_threads(*targets: Callable[[], None]) -> None:
    """Run each target in its own thread; re-raise the first failure here."""
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # re-raised in the main thread
                errors.append(e)

        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(4 * TIMEOUT)
        assert not t.is_alive(), "a thread did not finish"
    if errors:
        raise errors[0]


@pytest.fixture
def launches(monkeypatch):
    """Thread ident -> number of Triton Linear forward launches made on that thread."""
    counts: collections.Counter[int] = collections.Counter()
    kernels = library.load("linear")
    real = kernels.forward

    def counting(*args, **kwargs):
        counts[threading.get_ident()] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "forward", counting)
    return counts


# ------------------------------------------------------------------------------------------
# The setting itself
# ------------------------------------------------------------------------------------------
def test_overlapping_blocks_in_two_threads_restore_their_own_choice(monkeypatch):
    # A enters, B enters, A leaves while B is still inside, then B leaves. With one global
    # setting B would see "triton" (A's) inside its block after A left... and restore it.
    monkeypatch.delenv("MANUALBP_BACKEND", raising=False)
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    a_left = threading.Event()
    seen: dict[str, list[str]] = {"a": [], "b": []}

    def a():
        with manualbp.use_backend("triton"):
            barrier.wait()  # both blocks open
            seen["a"].append(manualbp.get_backend())
            barrier.wait()
        seen["a"].append(manualbp.get_backend())
        a_left.set()

    def b():
        with manualbp.use_backend("reference"):
            barrier.wait()
            seen["b"].append(manualbp.get_backend())
            barrier.wait()
            assert a_left.wait(TIMEOUT)
            seen["b"].append(manualbp.get_backend())
        seen["b"].append(manualbp.get_backend())

    with manualbp.use_backend("reference"):  # the main thread's block is its own too
        _run_threads(a, b)
        assert manualbp.get_backend() == "reference"
    assert seen == {"a": ["triton", "auto"], "b": ["reference", "reference", "auto"]}
    assert manualbp.get_backend() == "auto"


def test_a_block_does_not_leak_into_other_threads(monkeypatch):
    monkeypatch.delenv("MANUALBP_BACKEND", raising=False)
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    seen = []

    def other():
        barrier.wait()  # the main thread's block is open now
        seen.append(manualbp.get_backend())
        barrier.wait()

    t = threading.Thread(target=other)
    t.start()
    with manualbp.use_backend("triton"):
        barrier.wait()
        barrier.wait()
    t.join(TIMEOUT)
    assert seen == ["auto"]


def test_set_backend_is_process_wide_and_a_block_wins_in_its_thread(monkeypatch):
    monkeypatch.setenv("MANUALBP_BACKEND", "auto")
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    seen = {}

    def inside():
        with manualbp.use_backend("triton"):
            barrier.wait()  # set_backend happens between the two waits
            barrier.wait()
            seen["inside"] = manualbp.get_backend()
        seen["after"] = manualbp.get_backend()

    def outside():
        barrier.wait()
        manualbp.set_backend("reference")
        barrier.wait()
        seen["outside"] = manualbp.get_backend()

    _run_threads(inside, outside)
    assert seen == {"inside": "triton", "after": "reference", "outside": "reference"}
    assert manualbp.get_backend() == "reference"  # process-wide: the main thread too
    manualbp.set_backend(None)
    assert manualbp.get_backend() == "auto"


# ------------------------------------------------------------------------------------------
# Ops in threads, eager and compiled
# ------------------------------------------------------------------------------------------
def _inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64).to(DEVICE)
    w = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(DEVICE)
    return x, w


def _linear(x, w):
    return manualbp.functional.linear(x, w, None, "relu")


@needs_triton
def test_eager_ops_in_overlapping_blocks_use_their_threads_backend(launches):
    x, w = _inputs()
    expected = torch.relu(x @ w.T)
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    idents = {}

    def worker(name):
        def run():
            idents[name] = threading.get_ident()
            with manualbp.use_backend(name):
                barrier.wait()
                for _ in range(3):
                    assert_close(_linear(x, w), expected)
                    barrier.wait()

        return run

    _run_threads(worker("triton"), worker("reference"))
    assert launches[idents["triton"]] == 3
    assert launches[idents["reference"]] == 0


@needs_triton
def test_backward_in_the_calling_thread_uses_its_block(monkeypatch):
    # On CPU autograd runs the backward on the thread that calls .backward().
    if torch.cuda.is_available():
        pytest.skip("CUDA backward runs on autograd's device thread (see the CUDA test)")
    kernels = library.load("linear")
    calls = []
    real = kernels.backward

    def counting(*args, **kwargs):
        calls.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "backward", counting)
    x, w = _inputs()
    w.requires_grad_(True)
    idents = {}

    def run():
        idents["t"] = threading.get_ident()
        with manualbp.use_backend("triton"):
            _linear(x, w).sum().backward()

    _run_threads(run)
    assert calls == [idents["t"]]
    w_ref = w.detach().clone().requires_grad_(True)
    torch.relu(x @ w_ref.T).sum().backward()
    assert_close(w.grad, w_ref.grad)


@pytest.mark.cuda
def test_cuda_backward_uses_the_block_of_the_forward(monkeypatch):
    kernels = library.load("linear")
    calls = []
    real = kernels.backward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "backward", counting)
    x, w = _inputs()
    w.requires_grad_(True)
    with manualbp.use_backend("reference"):  # CUDA would take Triton under "auto"
        _linear(x, w).sum().backward()
    assert calls == []


@needs_triton
@pytest.mark.slow
def test_compiled_function_follows_the_backend_in_sequence(launches):
    torch._dynamo.reset()
    f = torch.compile(_linear, fullgraph=True)
    x, w = _inputs()
    expected = torch.relu(x @ w.T)
    me = threading.get_ident()
    for name in ["reference", "triton", "reference", "triton", "auto"]:
        before = launches[me]
        with manualbp.use_backend(name):
            assert_close(f(x, w), expected)
        triton_ran = name == "triton" or (name == "auto" and DEVICE == "cuda")
        assert launches[me] - before == int(triton_ran), name
    # set_backend is guarded on too.
    manualbp.set_backend("triton")
    before = launches[me]
    assert_close(f(x, w), expected)
    assert launches[me] - before == 1
    with manualbp.use_backend("reference"):  # the thread's block wins over set_backend
        assert_close(f(x, w), expected)
    assert launches[me] - before == 1
    torch._dynamo.reset()


@needs_triton
@pytest.mark.slow
def test_compiled_function_in_two_threads_with_overlapping_blocks(launches):
    torch._dynamo.reset()
    f = torch.compile(_linear, fullgraph=True)
    x, w = _inputs()
    expected = torch.relu(x @ w.T)
    # Trace both specialisations first (one at a time), then call concurrently.
    for name in ("reference", "triton"):
        with manualbp.use_backend(name):
            f(x, w)
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    idents = {}
    steps = 4

    def worker(name):
        def run():
            idents[name] = threading.get_ident()
            with manualbp.use_backend(name):
                for _ in range(steps):
                    barrier.wait()
                    assert_close(f(x, w), expected)

        return run

    _run_threads(worker("triton"), worker("reference"))
    assert launches[idents["triton"]] == steps
    assert launches[idents["reference"]] == 0
    torch._dynamo.reset()
