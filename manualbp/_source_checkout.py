"""Make ``manualbp.kernels`` importable from a source checkout that was not installed.

Installed (``pip install .`` or ``-e .``), setuptools maps the repository's ``triton_kernels/``
folder to ``manualbp.kernels``. Run from a checkout on ``PYTHONPATH`` instead (as on a machine
where nothing can be installed: ``benchmarks/gpu_run.sh`` does that), the same folder is
loaded here under that name. Imported first by ``manualbp/__init__.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "manualbp.kernels"


def _map_source_kernels() -> None:
    if _NAME in sys.modules or importlib.util.find_spec(_NAME) is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "triton_kernels"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(
        _NAME, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)
    sys.modules["manualbp"].kernels = module


_map_source_kernels()
