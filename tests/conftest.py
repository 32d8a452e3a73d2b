"""Test set-up shared by every test file.

Without a GPU, Triton kernels can only run under Triton's CPU interpreter, which
must be switched on before anything imports triton: do it here, first. With a
GPU the kernels run for real and the interpreter stays off.
"""

from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(autouse=True)
def _fresh_seed_and_backend(request):
    """Each test starts from a seed of its own and the default backend choice."""
    import manualbp

    # crc32, not hash(): str hashes change from process to process (PYTHONHASHSEED).
    # MANUALBP_TEST_SEED varies the draw for all tests at once (to probe for flakiness).
    offset = int(os.environ.get("MANUALBP_TEST_SEED", "0"))
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ offset)
    manualbp.set_backend(None)
    yield
    manualbp.set_backend(None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
