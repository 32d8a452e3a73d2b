"""The backend setting: MANUALBP_BACKEND (read at import and on set_backend(None)), set_backend
and use_backend."""

from __future__ import annotations

import pytest
import torch

import manualbp
from manualbp._mode import kernels_for


def test_default_is_auto_and_cpu_tensors_take_the_reference_path(monkeypatch):
    monkeypatch.delenv("MANUALBP_BACKEND", raising=False)
    manualbp.set_backend(None)
    assert manualbp.get_backend() == "auto"
    assert not kernels_for(torch.randn(2))


def test_environment_variable_is_read_and_validated(monkeypatch):
    monkeypatch.setenv("MANUALBP_BACKEND", "reference")
    manualbp.set_backend(None)  # what import does
    assert manualbp.get_backend() == "reference"
    monkeypatch.setenv("MANUALBP_BACKEND", "cudnn")
    expected = "unknown manualbp backend 'cudnn'.*auto, reference, triton"
    with pytest.raises(ValueError, match=expected):
        manualbp.set_backend(None)


def test_the_environment_is_read_once_not_per_call(monkeypatch):
    monkeypatch.setenv("MANUALBP_BACKEND", "reference")
    manualbp.set_backend(None)
    monkeypatch.setenv("MANUALBP_BACKEND", "triton")  # not read again until set_backend(None)
    assert manualbp.get_backend() == "reference"


def test_an_invalid_variable_at_import_fails_at_first_use():
    import subprocess
    import sys

    code = (
        "import manualbp, torch; manualbp.functional.linear(torch.randn(2, 3), torch.randn(4, 3))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "MANUALBP_BACKEND": "cudnn"})  # fmt: skip
    assert out.returncode != 0 and "unknown manualbp backend 'cudnn'" in out.stderr


def test_context_manager_nests_and_restores(monkeypatch):
    monkeypatch.setenv("MANUALBP_BACKEND", "reference")
    manualbp.set_backend(None)
    with manualbp.use_backend("triton"):
        assert manualbp.get_backend() == "triton"
        with manualbp.use_backend("auto"):
            assert manualbp.get_backend() == "auto"
        assert manualbp.get_backend() == "triton"
    assert manualbp.get_backend() == "reference"
    manualbp.set_backend("triton")
    assert manualbp.get_backend() == "triton"
    manualbp.set_backend(None)
    assert manualbp.get_backend() == "reference"


@pytest.mark.parametrize("bad", ["Triton-GPU", "", 3, None])
def test_unknown_backend_names_are_rejected(bad):
    with pytest.raises(ValueError, match="unknown manualbp backend"), manualbp.use_backend(bad):
        pass
    with pytest.raises(ValueError, match="unknown manualbp backend"):
        manualbp.set_backend(bad) if bad is not None else manualbp.set_backend(0)


def test_triton_on_cpu_without_the_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with manualbp.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        manualbp.functional.linear(torch.randn(2, 3), torch.randn(4, 3))


def test_an_explicit_choice_overrides_the_threads_setting():
    # What a backward on another thread (autograd's CUDA device thread) passes: its forward's.
    x = torch.randn(2)
    with manualbp.use_backend("triton"):
        assert not kernels_for(x, choice="reference")
    assert not kernels_for(x, choice="auto")
