"""The ``manualbp`` command line: ``demo`` and ``check``, their exit codes and argument errors.

The end-to-end runs use subprocesses (``python -m manualbp ...``), as a user would; they inherit
``TRITON_INTERPRET=1`` from ``tests/conftest.py`` on a machine without a GPU, so ``check``
covers the Triton kernels under the interpreter as well. Argument errors and failure paths run
in-process through :func:`manualbp.cli.main`.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from manualbp import _check, _demo, cli

ROOT = Path(__file__).resolve().parents[1]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
needs_sklearn = pytest.mark.skipif(not HAS_SKLEARN, reason="the demo's datasets need scikit-learn")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "manualbp", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------
def test_help_explains_both_commands():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    for word in ("demo", "check", "exit status"):
        assert word in proc.stdout


@needs_sklearn
def test_demo_quick_runs_and_reports_agreement():
    proc = _run("demo", "--quick", "--no-plot")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "loss curves AGREE" in out
    assert "held-out accuracy" in out
    assert "time per step" in out
    assert "manualbp backend 'reference'" in out or "manualbp backend 'triton'" in out


@needs_sklearn
@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="the plot needs matplotlib")
def test_demo_writes_a_png_plot(tmp_path):
    path = tmp_path / "curves.png"
    proc = _run("demo", "--quick", "--dataset", "diabetes", "--plot", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "loss curves AGREE" in proc.stdout and "held-out R²" in proc.stdout
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_quick_passes():
    proc = _run("check", "--quick")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert " 0 failed" in out and "all checks passed" in out
    # Every op and check kind appears in the table.
    for word in ("linear", "mse_loss", "forward", "backward", "gradcheck", "gradgradcheck"):
        assert word in out
    assert "FAIL" not in out


# --------------------------------------------------------------------------------------------
# The demo's two curves, compared directly
# --------------------------------------------------------------------------------------------
@needs_sklearn
@pytest.mark.parametrize("dataset", ["digits", "diabetes"])
def test_demo_curves_agree(dataset):
    cfg = _demo.DemoConfig(dataset=dataset, steps=40, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI's --threads default: steadier on shared cores
    try:
        result = _demo.run_demo(cfg, out=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    manual, native = result.manual_losses, result.native_losses
    assert manual.shape == native.shape == (40,)
    assert bool(torch.isfinite(native).all())
    # Same tolerance as the demo's own verdict (see _demo.CURVE_TOL): both runs compute the same
    # math in float32 from the same weights, so their curves differ at most by rounding drift,
    # measured below 1e-5 of the curve's scale; a wrong gradient moves them by > 1e-2 of it.
    scale = native.abs().max().item()
    assert_close(manual, native, rtol=0, atol=_demo.CURVE_TOL * scale)
    assert result.agree
    # Trained, not just run: the loss went down.
    assert native[-10:].mean() < native[:3].mean()


def test_curve_agreement_flags_a_drift():
    native = torch.linspace(1.0, 0.1, 50, dtype=torch.float64)
    assert _demo.curve_agreement(native.clone(), native)[3]
    tiny = native * (1 + 1e-6)  # rounding-sized
    assert _demo.curve_agreement(tiny, native)[3]
    drifted = native.clone()
    drifted[20:] += 5e-3  # 0.5% of the scale: a bug-sized change
    max_abs, _, worst, agree = _demo.curve_agreement(drifted, native)
    assert not agree and worst >= 20 and max_abs == pytest.approx(5e-3)
    nan = native.clone()
    nan[-1] = float("nan")
    assert not _demo.curve_agreement(nan, native)[3]


@needs_sklearn
def test_demo_exits_1_when_curves_disagree(monkeypatch, capsys):
    real = _demo.curve_agreement
    monkeypatch.setattr(
        _demo, "curve_agreement", lambda m, n, *a, **k: (*real(m + 1.0, n)[:3], False)
    )
    code = cli.main(["demo", "--steps", "3", "--no-plot", "--no-progress", "--threads", "0"])
    captured = capsys.readouterr()
    assert code == 1
    assert "DISAGREE" in captured.out and "FAILED" in captured.err


def test_check_reports_a_broken_op(monkeypatch, capsys):
    """The check must be able to fail: perturb manualbp's linear by more than rounding."""
    real = _check.functional.linear

    def broken(*args, **kwargs):
        return real(*args, **kwargs) * (1 + 1e-3)

    monkeypatch.setattr(_check.functional, "linear", broken)
    code = cli.main(["check", "--quick", "--backend", "reference", "--dtype", "float32"])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAIL" in captured.out and "FAILED" in captured.err
    rows = [line for line in captured.out.splitlines() if line.startswith("linear")]
    assert rows and all("FAIL" in line for line in rows if "forward" in line)
    assert any("pass" in line for line in captured.out.splitlines() if line.startswith("mse"))


# --------------------------------------------------------------------------------------------
# Bad arguments: exit status 2 and a message that names the problem
# --------------------------------------------------------------------------------------------
BAD_ARGS = [
    (["demo", "--steps", "-5"], "argument --steps: must be a positive integer, got -5"),
    (["demo", "--steps", "many"], "argument --steps"),
    (["demo", "--dataset", "mnist"], "argument --dataset: invalid choice"),
    (["demo", "--lr", "0"], "argument --lr: must be > 0"),
    (["demo", "--lr", "nan"], "argument --lr: must be finite"),
    (["demo", "--momentum", "-0.1"], "argument --momentum: must be >= 0"),
    (["demo", "--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    (["demo", "--device", "meta"], "argument --device: unsupported device 'meta'"),
    (["demo", "--device", "gpu0"], "argument --device: unknown device 'gpu0'"),
    (["demo", "--plot", "/nonexistent-dir/curves.png"], "argument --plot: directory"),
    (["check", "--dtype", "int8"], "argument --dtype: invalid choice"),
    (["frobnicate"], "invalid choice"),
    ([], "the following arguments are required"),
]


@pytest.mark.parametrize("argv,message", BAD_ARGS, ids=[" ".join(a) or "none" for a, _ in BAD_ARGS])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "usage: manualbp" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU")
@pytest.mark.parametrize("command", ["demo", "check"])
def test_cuda_without_a_gpu_exits_2(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--device", "cuda"])
    assert exc.value.code == 2
    assert (
        "argument --device: 'cuda' requested but CUDA is not available" in capsys.readouterr().err
    )


def test_bad_argument_in_a_subprocess_exits_2():
    proc = _run("demo", "--steps", "-1")
    assert proc.returncode == 2
    assert "argument --steps: must be a positive integer, got -1" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the triton backend is available")
def test_check_triton_backend_unavailable_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(_check, "interpreter_enabled", lambda: False)
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "--device", "cpu", "--backend", "triton"])
    assert exc.value.code == 2
    assert "argument --backend: 'triton' is not available on cpu" in capsys.readouterr().err
