"""The per-shape Linear choice (``manualbp.kernels.linear``, decided by ``_tuning``) on the Triton
backend.

Each candidate is forced on its own and held to native autograd (``F.linear`` + the native
activation) and to float64 gradcheck; the choosing machinery runs with an injected timer
(without a GPU nothing is timed otherwise): one measurement per bucket, decisions persisted to
a JSON file and read back, corrupt or foreign files ignored with a warning, the environment
variable and the API forcing a candidate. Kernels run under Triton's CPU interpreter here.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from manualbp.kernels import _tuning
from manualbp.kernels import linear as lc
from torch.autograd import gradcheck

import manualbp
from manualbp import functional
from manualbp.testing import compare
from tests.helpers import (
    ACTIVATION_NAMES,
    clone_leaf,
    leaf,
    make_layout,
    native_activation,
    native_linear,
)

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the Triton kernels need a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = ["contiguous", "transposed", "noncontig"]


@pytest.fixture(autouse=True)
def _fresh_choice(monkeypatch):
    """The Triton backend, no decisions, no forcing, no timer, no cache file."""
    monkeypatch.delenv(lc.IMPL_ENV, raising=False)
    monkeypatch.delenv(_tuning.CACHE_ENV, raising=False)
    _tuning.clear()
    with manualbp.use_backend("triton"), lc.force(None), _tuning.use_timer(None):
        yield
    _tuning.clear()


def _spy(monkeypatch) -> list[str]:
    """Record which candidate runs each forward / dX / dW (as ``"fwd:cublas"`` etc.)."""
    ran: list[str] = []
    for op, table in (("fwd", lc.FORWARDS), ("dx", lc.GEMMS["dx"]), ("dw", lc.GEMMS["dw"])):
        for impl, fn in list(table.items()):

            def spy(*args, _fn=fn, _tag=f"{op}:{impl}"):
                ran.append(_tag)
                return _fn(*args)

            monkeypatch.setitem(table, impl, spy)
    return ran


def _fwd_bwd(x, w, b, activation, g, fn=functional.linear):
    y = fn(x, w, b, activation)
    y.backward(g)
    return y, x.grad, w.grad, None if b is None else b.grad


def _native(x, w, b, activation, g):
    """Native autograd (``F.linear`` + the native activation) on copies of the leaves."""
    leaves = (None if t is None else clone_leaf(t) for t in (x, w, b))
    return _fwd_bwd(*leaves, activation, g, fn=native_linear)


def _assert_matches_native(x, w, b, activation):
    """Output and gradients against native autograd in the same dtype: the dtype's tolerance,
    plus the rounding a sum in another order may add, plus native's own error (native in
    float64 on the same inputs)."""
    g = torch.randn(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device)
    ours = _fwd_bwd(x, w, b, activation, g)
    want = _native(x, w, b, activation, g)
    as64 = [None if t is None else leaf(t.detach().double()) for t in (x, w, b)]
    exact = _fwd_bwd(*as64, activation, g.double(), fn=native_linear)
    for name, got, w_, e, bound in zip(
        ("y", "dx", "dw", "db"), ours, want, exact, _abs_sums(*as64, activation, g), strict=True
    ):
        if w_ is None:
            assert got is None
            continue
        result = compare(got, w_, abs_sum=bound, exact=e)
        assert result.ok, f"{name}: {result.detail}"


def _abs_sums(x, w, b, activation, g):
    """Float64 sums over absolute values bounding each result's rounding (helpers.py)."""
    x, w = x.detach(), w.detach()
    z = F.linear(x, w, None if b is None else b.detach()).requires_grad_()
    y = native_activation(activation)(z)
    (slope,) = torch.autograd.grad(y.sum(), z, retain_graph=True)
    (dz,) = torch.autograd.grad(y, z, g.double())
    xa, wa, dza = x.abs().reshape(-1, x.shape[-1]), w.abs(), dz.abs().reshape(-1, w.shape[0])
    zsum = F.linear(x.abs(), wa, None if b is None else b.detach().abs())
    return slope.abs() * zsum, (dza @ wa).reshape(x.shape), dza.mT @ xa, dza.sum(0)


# ---------------------------------------------------------------------------------------------
# Each candidate on its own, against native.
# ---------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("impl", lc.IMPLS)
def test_forced_candidate_matches_native(impl, activation, dtype, monkeypatch):
    ran = _spy(monkeypatch)
    # One case each, rotating over the activations so that every (candidate, dtype) sees each
    # input and weight layout, 2-D and 3-D inputs, and a bias and none.
    k = ACTIVATION_NAMES.index(activation) + DTYPES.index(dtype)
    kw = {"dtype": dtype, "device": DEVICE}
    x = leaf(make_layout((2, 7, 19) if k % 2 else (23, 19), LAYOUTS[k % 3], **kw))
    w = leaf(make_layout((13, 19), LAYOUTS[(k + 1) % 3], **kw))
    b = leaf(torch.randn(13, **kw)) if k // 2 % 2 else None
    with lc.force(impl):
        _assert_matches_native(x, w, b, activation)
    assert set(ran) == {f"fwd:{impl}", f"dx:{impl}", f"dw:{impl}"}


@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
@pytest.mark.parametrize("impl", lc.IMPLS)
def test_forced_candidate_zero_rows(impl, activation):
    x, w = leaf(torch.randn(0, 6, device=DEVICE)), leaf(torch.randn(5, 6, device=DEVICE))
    b = leaf(torch.randn(5, device=DEVICE))
    g = torch.randn(0, 5, device=DEVICE)
    with lc.force(impl):
        ours = _fwd_bwd(x, w, b, activation, g)
    for got, want in zip(ours, _native(x, w, b, activation, g), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("activation", ["gelu", "tanh"])
def test_gradcheck_through_cublas_candidate(activation):
    kw = {"dtype": torch.float64, "device": DEVICE}
    x = leaf(make_layout((3, 4), "transposed", **kw))
    w, b = leaf(torch.randn(5, 4, **kw)), leaf(torch.randn(5, **kw))
    with lc.force("cublas"):
        assert gradcheck(
            lambda x, w, b: functional.linear(x, w, b, activation), (x, w, b), fast_mode=True
        )


# ---------------------------------------------------------------------------------------------
# Choosing: once per bucket, deterministic, persisted.
# ---------------------------------------------------------------------------------------------
class CountingTimer:
    """Runs each candidate once and reports a made-up cost (``costs[impl]``)."""

    def __init__(self, **costs: float) -> None:
        self.costs = {"triton": 2.0, "cublas": 1.0, **costs}
        self.calls: list[str] = []

    def __call__(self, run, impl: str) -> float:
        self.calls.append(impl)
        run()
        return self.costs[impl]


def _train_step(rows: int, activation: str | None = "gelu", backward: bool = True):
    x = leaf(torch.randn(rows, 6, device=DEVICE))
    w, b = leaf(torch.randn(5, 6, device=DEVICE)), leaf(torch.randn(5, device=DEVICE))
    y = functional.linear(x, w, b, activation)
    if backward:
        y.sum().backward()
    return y, x.grad, w.grad, b.grad


def test_auto_without_a_timer_runs_triton_and_decides_nothing(monkeypatch):
    ran = _spy(monkeypatch)
    _train_step(5)
    assert set(ran) == {"fwd:triton", "dx:triton", "dw:triton"}
    assert _tuning.decisions() == {}


def test_chooses_once_per_bucket():
    timer = CountingTimer()
    with _tuning.use_timer(timer):
        _train_step(5)  # rows 5 and 7 share the bucket M=8; 9 is in M=16
        assert len(timer.calls) == 3 * len(lc.IMPLS)  # fwd, dx, dw: each candidate once
        _train_step(7)
        _train_step(5)
        assert len(timer.calls) == 3 * len(lc.IMPLS)
        _train_step(9)
        assert len(timer.calls) == 6 * len(lc.IMPLS)
    made = _tuning.decisions()
    assert len(made) == 6 and set(made.values()) == {"cublas"}
    assert {key.split("|")[0] for _, key in made} == {"fwd", "dx", "dw"}
    assert {key.split("|M=")[1].split("|")[0] for _, key in made} == {"8", "16"}


def test_measuring_call_returns_the_chosen_candidates_result():
    torch.manual_seed(1)
    with _tuning.use_timer(CountingTimer()):
        measured = _train_step(7)
    torch.manual_seed(1)
    with lc.force("cublas"):
        forced = _train_step(7)
    for got, want in zip(measured, forced, strict=True):
        assert torch.equal(got, want)


def test_faster_candidate_wins_per_op(monkeypatch):
    ran = _spy(monkeypatch)
    with _tuning.use_timer(CountingTimer(triton=0.5)):
        _train_step(5)
    assert set(_tuning.decisions().values()) == {"triton"}
    # Per op: each candidate timed (in IMPLS order), then the faster one run for the result.
    assert ran == [f"{op}:{impl}" for op in ("fwd", "dx", "dw") for impl in (*lc.IMPLS, "triton")]


def test_candidate_failing_while_timed_is_left_out():
    def timer(run, impl):
        if impl == "triton":
            raise RuntimeError("out of resources")
        run()
        return 1.0

    with _tuning.use_timer(timer), pytest.warns(UserWarning, match="out of resources"):
        _train_step(5, backward=False)
    assert set(_tuning.decisions().values()) == {"cublas"}


def test_cache_file_round_trip(tmp_path, monkeypatch):
    path = tmp_path / "choice.json"
    monkeypatch.setenv(_tuning.CACHE_ENV, str(path))
    with _tuning.use_timer(CountingTimer()):
        _train_step(5)
    data = json.loads(path.read_text())
    assert data["format"] == _tuning.FORMAT and data["schema"] == _tuning.SCHEMA
    assert data["device"] == (torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu")
    assert data["torch"] == torch.__version__ and set(data["choices"].values()) == {"cublas"}
    assert {(data["device"], k): v for k, v in data["choices"].items()} == _tuning.decisions()
    assert not [p for p in tmp_path.iterdir() if p.name != "choice.json"]  # no temp left

    _tuning.clear()  # a new process, as far as the choice knows
    timer = CountingTimer()
    with _tuning.use_timer(timer):
        _train_step(5)  # everything read back: nothing measured
        assert timer.calls == []
        _train_step(20)  # a new bucket: measured and added to the file
    assert len(timer.calls) == 3 * len(lc.IMPLS)
    assert len(json.loads(path.read_text())["choices"]) == 6


VALID_KEY = "fwd|float32-highest|gelu|bias|nopreact|x:r,w:r|M=8|N=5|K=6"


def _valid_file(**changes):
    import triton

    data = {
        "format": _tuning.FORMAT,
        "schema": _tuning.SCHEMA,
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "choices": {VALID_KEY: "triton"},
    }
    return json.dumps({**data, **changes})


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[1, 2]",
        _valid_file(schema=_tuning.SCHEMA + 1),
        _valid_file(device="Another GPU"),
        _valid_file(torch="0.0.1"),
        _valid_file(choices={"fwd|float32-highest|gelu|x": "os.system"}),
        _valid_file(choices={"rm -rf": "triton"}),
        _valid_file(choices=["triton"]),
    ],
    ids=["corrupt", "not-object", "schema", "device", "torch", "impl", "key", "choices"],
)
def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(tmp_path, monkeypatch, text):
    path = tmp_path / "choice.json"
    path.write_text(text)
    monkeypatch.setenv(_tuning.CACHE_ENV, str(path))
    timer = CountingTimer()
    with _tuning.use_timer(timer), pytest.warns(UserWarning, match="ignoring"):
        _train_step(5, backward=False)
    assert timer.calls == list(lc.IMPLS)  # measured: nothing was taken from the file
    made = {k: v for (_, k), v in _tuning.decisions().items()}
    assert json.loads(path.read_text())["choices"] == made


def test_valid_cache_entry_is_used(tmp_path, monkeypatch):
    path = tmp_path / "choice.json"
    path.write_text(_valid_file())
    monkeypatch.setenv(_tuning.CACHE_ENV, str(path))
    ran = _spy(monkeypatch)
    with _tuning.use_timer(CountingTimer()), torch.no_grad():
        x, w, b = torch.randn(6, 6), torch.randn(5, 6), torch.randn(5)
        functional.linear(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), "gelu")
    assert ran == ["fwd:triton"]  # the file's choice, though the timer favours cublas


def test_deeply_nested_json_is_ignored_with_a_warning(tmp_path, monkeypatch):
    # issue 23, finding 7: json.loads raises RecursionError (not ValueError) on deep nesting.
    path = tmp_path / "choice.json"
    depth = 200_000  # far past the interpreter's recursion limit; 400 kB, under the size cap
    path.write_text("[" * depth + "]" * depth)
    monkeypatch.setenv(_tuning.CACHE_ENV, str(path))
    timer = CountingTimer()
    with _tuning.use_timer(timer), pytest.warns(UserWarning, match="ignoring.*not JSON"):
        _train_step(5, backward=False)
    assert timer.calls == list(lc.IMPLS)  # measured, then written over the unusable file
    assert json.loads(path.read_text())["format"] == _tuning.FORMAT


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_fifo_is_neither_read_nor_written(tmp_path, monkeypatch):
    # issue 23, finding 7: opening a FIFO for reading blocks until a writer comes: forever.
    import threading

    path = tmp_path / "choice.fifo"
    os.mkfifo(path)
    monkeypatch.setenv(_tuning.CACHE_ENV, str(path))
    caught: list = []

    def first_call():  # (the backend choice is per thread: set it here too)
        timer = _tuning.use_timer(CountingTimer())
        with manualbp.use_backend("triton"), timer, warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")  # (the main thread only waits meanwhile)
            _train_step(5, backward=False)
        caught.extend(str(w.message) for w in record)

    thread = threading.Thread(target=first_call, daemon=True)
    thread.start()
    thread.join(timeout=60)
    if thread.is_alive():  # unblock the reader (a writer that closes at once), then fail
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
        pytest.fail("the first Linear call hung on a FIFO at MANUALBP_LINEAR_CACHE")
    assert any("ignoring" in m and "not a regular file" in m for m in caught), caught
    assert any("not writing" in m for m in caught), caught
    assert path.is_fifo()  # left as it was
    assert len(_tuning.decisions()) == 1  # decided all the same (forward only)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_a_symlink_stays_a_link_and_its_target_is_rewritten(tmp_path, monkeypatch):
    # issue 23, finding 7: the atomic rewrite must go to the link's target, not replace the link.
    target = tmp_path / "shared" / "choices.json"
    target.parent.mkdir()
    target.write_text(_valid_file())
    link = tmp_path / "choice.json"
    link.symlink_to(target)
    monkeypatch.setenv(_tuning.CACHE_ENV, str(link))
    with _tuning.use_timer(CountingTimer()):
        _train_step(5, backward=False)
    assert link.is_symlink() and link.resolve() == target.resolve()
    choices = json.loads(target.read_text())["choices"]
    assert choices[VALID_KEY] == "triton"  # the file's entry kept, the new decision added
    assert {k: v for (_, k), v in _tuning.decisions().items()}.items() <= choices.items()
    assert len(choices) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["choice.json", "shared"]
    assert [p.name for p in target.parent.iterdir()] == ["choices.json"]  # no temp left


# ---------------------------------------------------------------------------------------------
# Forcing: environment variable and API.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["cublas", "TRITON"])
def test_environment_variable_forces_a_candidate(monkeypatch, value):
    monkeypatch.setenv(lc.IMPL_ENV, value)
    ran = _spy(monkeypatch)
    timer = CountingTimer()
    with _tuning.use_timer(timer):
        _train_step(5)
    impl = value.lower()
    assert set(ran) == {f"fwd:{impl}", f"dx:{impl}", f"dw:{impl}"} and timer.calls == []


def test_api_overrides_the_environment_variable(monkeypatch):
    monkeypatch.setenv(lc.IMPL_ENV, "cublas")
    ran = _spy(monkeypatch)
    with lc.force("triton"):
        _train_step(5)
    assert set(ran) == {"fwd:triton", "dx:triton", "dw:triton"}
    assert lc.mode() == "cublas"  # restored at the end of the block


def test_invalid_environment_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(lc.IMPL_ENV, "cublaslt")
    with pytest.raises(ValueError, match=f"{lc.IMPL_ENV}='cublaslt'.*auto, triton, cublas"):
        _train_step(5)


def test_invalid_forced_value_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown Linear implementation 'fast'"):
        lc.force("fast")
    assert lc.mode() == "auto"


@pytest.mark.cuda
def test_cuda_auto_measures_once_and_matches_native():
    x = leaf(torch.randn(300, 64, device="cuda", dtype=torch.bfloat16))
    w = leaf(torch.randn(96, 64, device="cuda", dtype=torch.bfloat16))
    b = leaf(torch.randn(96, device="cuda", dtype=torch.bfloat16))
    _assert_matches_native(x, w, b, "gelu")
    made = _tuning.decisions()
    assert {key.split("|")[0] for _, key in made} == {"fwd", "dx", "dw"}
    _assert_matches_native(clone_leaf(x), clone_leaf(w), clone_leaf(b), "gelu")
    assert _tuning.decisions() == made
