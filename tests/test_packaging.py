"""What an install puts in site-packages, and running from a checkout that was not installed."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_installs_only_names_under_manualbp(tmp_path):
    # triton_kernels/ ships as manualbp.kernels (another distribution owns a top-level
    # "triton_kernels"); benchmarks/ is not installed at all.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("manualbp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"manualbp"}, top
    assert "manualbp/kernels/linear.py" in names
    assert "manualbp/kernels/audit.py" in names
    assert not any(n.startswith(("triton_kernels/", "benchmarks/")) for n in names)


def test_a_checkout_that_was_not_installed_imports_the_kernels():
    # As on a machine where nothing can be installed: the repository on PYTHONPATH, and no
    # editable-install finder (dropped here from sys.meta_path).
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "import manualbp.kernels.linear as lf\n"
        "import manualbp\n"
        "print(lf.__file__, manualbp.kernels.__name__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    path, name = proc.stdout.split()
    assert Path(path) == ROOT / "triton_kernels" / "linear.py"
    assert name == "manualbp.kernels"
