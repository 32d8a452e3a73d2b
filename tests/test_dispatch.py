"""The backend seam: MANUALBP_BACKEND, set_backend and use_backend."""

from __future__ import annotations

import pytest
import torch

import manualbp
from manualbp.dispatch import resolve


def test_default_is_auto_and_cpu_tensors_take_the_reference_path(monkeypatch):
    monkeypatch.delenv("MANUALBP_BACKEND", raising=False)
    assert manualbp.get_backend() == "auto"
    assert resolve(torch.randn(2)) == "reference"


def test_environment_variable_is_read_and_validated(monkeypatch):
    monkeypatch.setenv("MANUALBP_BACKEND", "reference")
    assert manualbp.get_backend() == "reference"
    monkeypatch.setenv("MANUALBP_BACKEND", "cudnn")
    expected = "unknown manualbp backend 'cudnn'.*auto, reference, triton"
    with pytest.raises(ValueError, match=expected):
        manualbp.functional.linear(torch.randn(2, 3), torch.randn(4, 3))


def test_context_manager_nests_and_restores(monkeypatch):
    monkeypatch.setenv("MANUALBP_BACKEND", "reference")
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
    from manualbp.backends.reference import REFERENCE
    from manualbp.dispatch import backend_for

    x = torch.randn(2)
    with manualbp.use_backend("triton"):
        assert resolve(x, choice="reference") == "reference"
        assert backend_for(x, choice="reference") is REFERENCE
    with pytest.raises(ValueError, match="unknown manualbp backend"):
        resolve(x, choice="cudnn")
