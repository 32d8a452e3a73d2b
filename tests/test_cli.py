"""The ``manualbp`` command line: ``demo`` and ``check``, their exit codes and argument errors.

The end-to-end runs use subprocesses (``python -m manualbp ...``, and the ``manualbp`` console
script), as a user would; they inherit ``TRITON_INTERPRET=1`` from ``tests/conftest.py`` on a
machine without a GPU, so ``check`` covers the Triton kernels under the interpreter as well.
Argument errors and failure paths run in-process through :func:`manualbp.cli.main`, with the
training replaced by a stub where only the checks before it matter. The last section covers
:mod:`manualbp.testing`, the tolerances and oracle that ``check`` shares with the test suite.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import inspect
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import manualbp
from manualbp import cli, testing
from manualbp.cli import check as check_cmd
from manualbp.cli import demo as demo_cmd
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
needs_sklearn = pytest.mark.skipif(not HAS_SKLEARN, reason="the demo's datasets need scikit-learn")


def _run(*args: str, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "manualbp", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
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
    cfg = demo_cmd.DemoConfig(dataset=dataset, steps=40, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI's --threads default: steadier on shared cores
    try:
        result = demo_cmd.run_demo(cfg, out=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    manual, native = result.manual_losses, result.native_losses
    assert manual.shape == native.shape == (40,)
    assert bool(torch.isfinite(native).all())
    # Same tolerance as the demo's own verdict (see demo_cmd.CURVE_TOL): both runs compute the same
    # math in float32 from the same weights, so their curves differ at most by rounding drift,
    # measured below 1e-5 of the curve's scale; a wrong gradient moves them by > 1e-2 of it.
    scale = native.abs().max().item()
    assert_close(manual, native, rtol=0, atol=demo_cmd.CURVE_TOL * scale)
    assert result.agree
    # Trained, not just run: the loss went down.
    assert native[-10:].mean() < native[:3].mean()


def test_compare_curves_flags_a_drift():
    native = torch.linspace(1.0, 0.1, 50, dtype=torch.float64)
    assert demo_cmd.compare_curves(native.clone(), native).verdict == "agree"
    tiny = native * (1 + 1e-6)  # rounding-sized
    assert demo_cmd.compare_curves(tiny, native).agree
    drifted = native.clone()
    drifted[20:] += 5e-3  # 0.5% of the scale: a bug-sized change
    c = demo_cmd.compare_curves(drifted, native)
    assert c.verdict == "disagree" and c.worst_step >= 20
    assert c.max_abs_diff == pytest.approx(5e-3)


def _blown_up(curve: torch.Tensor, step: int, value: float = float("nan")) -> torch.Tensor:
    out = curve.clone()
    out[step:] = value
    return out


def test_compare_curves_tells_divergence_from_mismatch():
    native = torch.linspace(1.0, 0.1, 50, dtype=torch.float64)
    # Both blow up (a learning rate too large): diverged, not a mismatch, whatever NaN/Inf.
    c = demo_cmd.compare_curves(_blown_up(native, 30, float("inf")), _blown_up(native, 30))
    assert c.verdict == "diverged" and not c.agree
    assert (c.native_diverged_at, c.manual_diverged_at, c.steps_compared) == (30, 30, 30)
    assert c.max_abs_diff == 0.0
    # A step apart (rounding near overflow): still both diverged.
    c = demo_cmd.compare_curves(_blown_up(native, 31), _blown_up(native, 30))
    assert c.verdict == "diverged" and c.steps_compared == 30
    # NaN from the very first step in both: nothing to compare, still diverged.
    assert demo_cmd.compare_curves(_blown_up(native, 0), _blown_up(native, 0)).verdict == "diverged"
    # Only one of them blows up: a real mismatch.
    c = demo_cmd.compare_curves(_blown_up(native, 49), native)
    assert c.verdict == "disagree" and c.manual_diverged_at == 49 and c.native_diverged_at is None
    assert demo_cmd.compare_curves(native, _blown_up(native, 10)).verdict == "disagree"
    # Both blow up, but the curves already differed before: a mismatch too.
    drifted = native.clone()
    drifted[5:] += 0.05
    c = demo_cmd.compare_curves(_blown_up(drifted, 30), _blown_up(native, 30))
    assert c.verdict == "disagree"


def _result(native: list[float], manual: list[float]) -> demo_cmd.DemoResult:
    """A demo result as run_demo would make it, for the handler's own logic."""
    curves = demo_cmd.compare_curves(
        torch.tensor(manual, dtype=torch.float64), torch.tensor(native, dtype=torch.float64)
    )
    return demo_cmd.DemoResult(
        config=demo_cmd.DemoConfig(lr=0.5).resolved(),
        backend="reference",
        metric_name="accuracy",
        native=demo_cmd.RunStats(native, [1e-3] * len(native), 0.9),
        manual=demo_cmd.RunStats(manual, [1e-3] * len(manual), 0.9),
        curves=curves,
    )


@pytest.fixture
def fake_run(monkeypatch):
    """Replace the training by a stub returning ``fake_run.result`` (set by the test)."""

    class Stub:
        result: demo_cmd.DemoResult | None = None
        calls = 0

        def __call__(self, config, **kwargs):
            self.calls += 1
            assert self.result is not None, "training started"
            return self.result

    stub = Stub()
    monkeypatch.setattr(demo_cmd, "run_demo", stub)
    return stub


@needs_sklearn
def test_demo_exits_1_when_curves_disagree(monkeypatch, capsys):
    real = demo_cmd.compare_curves
    monkeypatch.setattr(demo_cmd, "compare_curves", lambda m, n, *a, **k: real(m + 1.0, n))
    code = cli.main(["demo", "--steps", "3", "--no-plot", "--no-progress", "--threads", "0"])
    captured = capsys.readouterr()
    assert code == 1
    assert "DISAGREE" in captured.out and "FAILED" in captured.err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@needs_sklearn
@pytest.mark.parametrize(
    "terminal,flags,bar", [(True, [], True), (True, ["--no-progress"], False), (False, [], False)]
)
def test_demo_progress_bar_only_on_a_terminal(terminal, flags, bar, monkeypatch, capsys):
    """tqdm's bar with both losses on a terminal; nothing with --no-progress or in a log file."""
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert cli.main(["demo", "--steps", "20", "--no-plot", "--threads", "0", *flags]) == 0
    shown = stderr.getvalue()
    if bar:  # the last step's losses, as the report prints them, on the finished bar
        native, _, manual = capsys.readouterr().out.split("last step:  native ")[1].split()[:3]
        assert "training: 100%" in shown and "| 20/20 [" in shown
        assert f"manualbp={float(manual):.4g}, native={float(native):.4g}]" in shown
    else:
        assert shown == ""


@needs_sklearn
def test_demo_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    """Ctrl-C in the middle of training: one line on stderr and the shell's status for SIGINT."""
    real_step, steps = demo_cmd._Trainer.step, []

    def step(self, x, y):
        if len(steps) == 7:
            raise KeyboardInterrupt
        steps.append(1)
        return real_step(self, x, y)

    monkeypatch.setattr(demo_cmd._Trainer, "step", step)
    try:
        code = _demo_main("--steps", "50", "--no-plot")
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped manualbp demo")
    captured = capsys.readouterr()
    assert code == 130 and len(steps) == 7
    assert captured.err == "manualbp demo: interrupted\n"
    assert "loss curves" not in captured.out  # stopped: no report of a half-done run


def test_check_reports_a_broken_op(monkeypatch, capsys):
    """The check must be able to fail: perturb manualbp's linear by more than rounding."""
    real = manualbp.functional.linear

    def broken(*args, **kwargs):
        return real(*args, **kwargs) * (1 + 1e-3)

    monkeypatch.setattr(manualbp.functional, "linear", broken)
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
    monkeypatch.setattr(check_cmd, "interpreter_enabled", lambda: False)
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "--device", "cpu", "--backend", "triton"])
    assert exc.value.code == 2
    assert "argument --backend: 'triton' is not available on cpu" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The package: one module per command, the console script, short functions
# --------------------------------------------------------------------------------------------
def test_console_script_runs_cli_main():
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="manualbp")
    assert entry.value == "manualbp.cli:main" and entry.load() is cli.main
    script = Path(sys.executable).with_name("manualbp")
    if not script.exists():
        pytest.skip("the manualbp console script is not installed next to this python")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"manualbp {manualbp.__version__}"


def test_commands_live_in_the_cli_package():
    for old in ("manualbp._demo", "manualbp._check"):
        assert importlib.util.find_spec(old) is None, f"{old} should have moved into manualbp.cli"
    parser = cli.build_parser()
    for argv, handler in ((["demo"], demo_cmd.command), (["check"], check_cmd.command)):
        assert parser.parse_args(argv).handler is handler


def test_cli_functions_stay_short():
    """Every function of manualbp.cli fits on a screen (the parser builder included)."""
    long = []
    for path in Path(cli.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{path.name}:{node.name} ({length} lines)")
    assert not long, long


# --------------------------------------------------------------------------------------------
# demo --plot: checked before training
# --------------------------------------------------------------------------------------------
def _demo_main(*args: str) -> int:
    # --threads 0: leave this process's torch thread count alone.
    return cli.main(["demo", "--no-progress", "--threads", "0", *args])


PLOT_ERRORS = {
    "unknown extension": (lambda d: d / "curves.txt", "has extension '.txt': expected"),
    "no extension": (lambda d: d / "curves", "has no extension: expected a file name ending"),
    "missing directory": (lambda d: d / "missing" / "curves.png", "does not exist"),
    "file as directory": (lambda d: d / "file.png" / "curves.png", "is not a directory"),
}


@pytest.mark.parametrize("case", PLOT_ERRORS)
def test_bad_plot_path_exits_2_before_training(case, tmp_path, fake_run, capsys):
    (tmp_path / "file.png").write_bytes(b"")
    make, message = PLOT_ERRORS[case]
    with pytest.raises(SystemExit) as exc:
        _demo_main("--plot", str(make(tmp_path)))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: manualbp demo" in err and "argument --plot: " in err and message in err, err
    assert fake_run.calls == 0


def test_unwritable_plot_directory_exits_2_before_training(tmp_path, fake_run, monkeypatch, capsys):
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode)
    )
    with pytest.raises(SystemExit) as exc:
        _demo_main("--plot", str(tmp_path / "curves.png"))
    assert exc.value.code == 2
    assert "argument --plot: cannot write" in capsys.readouterr().err
    assert fake_run.calls == 0


def test_plot_path_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert demo_cmd.plot_path("curves.PNG") == str(tmp_path / "curves.PNG")
    assert demo_cmd.plot_path(".") == str(tmp_path / demo_cmd.DEFAULT_PLOT)
    (tmp_path / "out").mkdir()
    assert demo_cmd.plot_path("out") == str(tmp_path / "out" / demo_cmd.DEFAULT_PLOT)
    assert demo_cmd.plot_path("out/") == str(tmp_path / "out" / demo_cmd.DEFAULT_PLOT)
    for ext in demo_cmd.PLOT_EXTENSIONS:
        assert demo_cmd.plot_path(f"out/c{ext}").endswith(ext)


def test_bad_plot_path_fails_fast_in_a_subprocess(tmp_path):
    proc = _run("demo", "--plot", str(tmp_path / "curves.txt"))
    assert proc.returncode == 2
    assert "argument --plot: " in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""  # nothing trained, nothing reported


def test_explicit_plot_without_matplotlib_exits_2(tmp_path, fake_run, monkeypatch, capsys):
    monkeypatch.setattr(demo_cmd, "_have_matplotlib", lambda: False)
    with pytest.raises(SystemExit) as exc:
        _demo_main("--plot", str(tmp_path / "curves.png"))
    assert exc.value.code == 2
    assert "argument --plot: needs matplotlib" in capsys.readouterr().err
    assert fake_run.calls == 0
    # The default plot is skipped with a note instead: the bare command still runs.
    fake_run.result = _result([1.0, 0.5], [1.0, 0.5])
    monkeypatch.chdir(tmp_path)
    assert _demo_main() == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert fake_run.calls == 1 and not list(tmp_path.iterdir())


@needs_sklearn
@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="the plot needs matplotlib")
def test_plot_into_a_directory_prints_the_real_path(tmp_path):
    args = ("demo", "--steps", "5", "--dataset", "diabetes", "--no-progress", "--plot", ".")
    proc = _run(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = tmp_path / demo_cmd.DEFAULT_PLOT
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot of both loss curves: {written}\n" in proc.stdout


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="the plot needs matplotlib")
@pytest.mark.parametrize(
    "ext,magic", [(".svg", b"<?xml"), (".pdf", b"%PDF"), (".jpg", b"\xff\xd8")]
)
def test_plot_type_follows_the_extension(ext, magic, tmp_path, fake_run, capsys):
    fake_run.result = _result([1.0, 0.5, 0.25], [1.0, 0.5, 0.25])
    path = tmp_path / f"curves{ext}"
    assert _demo_main("--plot", str(path)) == 0
    assert path.read_bytes().startswith(magic)
    assert f"plot of both loss curves: {path}" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# demo: a diverged run is not a mismatch
# --------------------------------------------------------------------------------------------
@needs_sklearn
def test_demo_diverged_run_says_so():
    proc = _run("demo", "--lr", "1e6", "--steps", "20", "--no-plot", "--no-progress")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "loss curves DIVERGED, both alike" in proc.stdout
    assert "not a manualbp-vs-native mismatch" in proc.stderr and "--lr" in proc.stderr
    assert "FAILED" not in proc.stderr and "differ" not in proc.stderr


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="the plot needs matplotlib")
def test_diverged_run_exits_3_and_still_plots(tmp_path, fake_run, capsys):
    nan, inf = float("nan"), float("inf")
    fake_run.result = _result([1.0, 1e30, inf, nan], [1.0, 1e30, nan, nan])
    path = tmp_path / "curves.png"
    assert _demo_main("--plot", str(path)) == 3
    err = capsys.readouterr().err
    assert "DIVERGED" in err and "at step 3" in err and "FAILED" not in err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_sided_divergence_is_a_mismatch(fake_run, capsys):
    fake_run.result = _result([1.0, 0.5, 0.25], [1.0, 0.5, float("nan")])
    assert _demo_main("--no-plot") == 1
    assert "FAILED: the manualbp and native loss curves differ" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# manualbp.testing: the tolerances and the oracle, shared by `manualbp check` and the tests
# --------------------------------------------------------------------------------------------
def test_check_and_tests_share_one_testing_module():
    for name in ("assert_close_through_sum", "native_activation", "native_linear"):
        assert getattr(helpers, name) is getattr(testing, name)
    assert helpers.DEFAULT_TOLERANCES is testing.DEFAULT_TOLERANCES
    assert helpers.ACTIVATION_NAMES is testing.ACTIVATION_NAMES
    assert helpers.LINEAR_CASES is testing.LINEAR_CASES and helpers.MSE_CASES is testing.MSE_CASES
    # check judges with testing's compare and oracle (the cases' native), on testing's cases.
    assert check_cmd.testing is testing
    assert check_cmd.cases_to_check(quick=False) == list(testing.CASES)
    assert (*testing.LINEAR_CASES, *testing.MSE_CASES) == testing.CASES


def test_parity_and_gradcheck_tests_run_the_check_tables():
    """Adding a case to manualbp.testing's tables adds it to these tests and to the check."""
    from tests import test_linear_gradcheck, test_linear_parity, test_mse

    for test, table in [
        (test_linear_parity.test_matches_native_autograd, testing.LINEAR_CASES),
        (test_linear_parity.test_every_dtype_within_the_checks_tolerance, testing.LINEAR_CASES),
        (test_linear_parity.test_no_grad_forward_matches_native, testing.LINEAR_CASES),
        (test_linear_gradcheck.test_gradcheck_and_gradgradcheck, testing.LINEAR_CASES),
        (test_mse.test_matches_native, testing.MSE_CASES),
        (test_mse.test_every_dtype_within_the_checks_tolerance, testing.MSE_CASES),
        (test_mse.test_gradcheck_and_gradgradcheck, testing.MSE_CASES),
    ]:
        params = {m.args[0]: m.args[1] for m in test.pytestmark if m.name == "parametrize"}
        assert params["case"] is table, test.__name__


def test_activation_lists_follow_the_registry():
    assert [None, *manualbp.ACTIVATIONS] == testing.ACTIVATION_NAMES
    cases = testing.ACTIVATION_CASES
    default = [(a, testing.default_param(a)) for a in testing.ACTIVATION_NAMES]
    assert default == cases[: len(cases) - 1]
    assert cases[-1][0] == "leaky_relu" and cases[-1][1] < 0
    linear = [c for c in check_cmd.cases_to_check(quick=False) if c.op == "linear"]
    assert {(c.activation, c.negative_slope) for c in linear} == set(cases)
    assert {c.bias for c in linear} == {True, False}
    mse = {(c.reduction, c.target) for c in testing.MSE_CASES}
    assert mse == {(r, t) for r in testing.REDUCTIONS for t in testing.MSE_TARGETS}


def test_oracle_is_native_pytorch_only(monkeypatch):
    tree = ast.parse(inspect.getsource(testing))
    imported = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m.split(".")[0] in ("manualbp", "tests")} == {
        "manualbp.activations"
    }
    # manualbp's ops are imported only where a case names the op under test (``ours``).
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.name != "ours":
            inner = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
            assert not inner, fn.name

    # manualbp's own ops broken: the oracle does not notice.
    def broken(*args, **kwargs):
        raise AssertionError("the oracle called manualbp")

    monkeypatch.setattr(manualbp.functional, "linear", broken)
    monkeypatch.setattr(manualbp.functional, "mse_loss", broken)
    monkeypatch.setattr(manualbp.LinearFunction, "apply", broken)
    gelu_tanh = testing.native_activation("gelu_tanh")
    assert isinstance(gelu_tanh, nn.GELU) and gelu_tanh.approximate == "tanh"
    leaky = testing.native_activation("leaky_relu", -0.5)
    assert isinstance(leaky, nn.LeakyReLU) and leaky.negative_slope == -0.5
    x, w, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64), None
    z = x @ w.T
    want = 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z**3)))
    assert_close(testing.native_linear(x, w, b, "gelu_tanh"), want)
    assert_close(testing.native_linear(x, w), z)
    t = torch.randn(4, 5, dtype=torch.float64)
    assert_close(testing.native_mse_loss(z, t, "sum"), ((z - t) ** 2).sum())
    with pytest.raises(ValueError, match="unknown activation"):
        testing.native_activation("swish")


def test_tolerance_rules():
    want = torch.full((8,), 100.0)
    rtol, _ = testing.DEFAULT_TOLERANCES[torch.float32]
    off = want * (1 + 3 * rtol)  # beyond assert_close's defaults
    assert not testing.compare(off, want).ok
    # ... but within what a sum of |terms| = 1e4 may round to (4 ulps each).
    assert testing.compare(off, want, abs_sum=torch.full((8,), 1e4)).ok
    # ... or within native's own error, measured against float64.
    assert testing.compare(off, want, exact=want.double() + 400 * rtol).ok
    with pytest.raises(AssertionError, match="8 of 8 elements differ beyond"):
        testing.assert_close_through_sum(off, want, torch.zeros(8))
    testing.assert_close_through_sum(off, want, torch.full((8,), 1e4))
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    assert testing.compare(special, special.clone()).ok
    assert not testing.compare(special, torch.tensor([1.0, float("inf"), -float("inf"), 1.0])).ok
    assert not testing.compare(special, special.flip(0)).ok
    assert not testing.compare(want, want.double()).ok  # dtype
    assert not testing.compare(want, want[:4]).ok  # shape
