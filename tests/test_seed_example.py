"""``examples/seed_linear_regression.py``: the seed tutorial's ``y = w·x + b`` with manualbp."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "seed_linear_regression.py"

TRUE_W, TRUE_B = 2.0, -1.0
# The script's defaults: N = 200 samples, x ~ U(-2, 2) (variance 4/3), noise σ = 0.1. Gradient
# descent reaches the least-squares fit, whose error from the truth is Gaussian with standard
# errors SE(w) = σ / sqrt(N Var x) = 0.1 / sqrt(200 * 4/3) ≈ 0.0061 and SE(b) ≈ σ / sqrt(N)
# ≈ 0.0071. 0.04 is more than five standard errors of either: a correct fit lands inside with
# probability > 1 - 1e-6, while a wrong gradient (sign, factor, missing bias sum) does not
# converge to (2, -1) at all.
TOL = 0.04


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def test_converges_to_true_w_and_b():
    proc = _run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # The first iteration is shown as the tutorial's four steps.
    for step in ("1. forward", "2. loss", "3. backward", "4. update"):
        assert step in out, out
    match = re.search(r"final: w = (\S+), b = (\S+)", out)
    assert match, out
    w, b = float(match[1]), float(match[2])
    assert abs(w - TRUE_W) <= TOL, (w, out)
    assert abs(b - TRUE_B) <= TOL, (b, out)
    assert "converged" in out


def test_exits_nonzero_when_it_does_not_converge():
    # Two steps at a tiny learning rate leave w, b near their random start.
    proc = _run("--steps", "2", "--lr", "1e-4")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "NOT converged" in proc.stderr
