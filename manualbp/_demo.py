"""``manualbp demo``: the same MLP trained with manualbp and with native autograd, side by side.

Both runs start from the same initial weights and see the same mini-batches in the same order;
one uses ``manualbp.Linear`` (by :func:`manualbp.convert` of a copy of the native model, which
also fuses each activation into the Linear before it), ``manualbp.MSELoss`` and
``manualbp.optim.SGD``, the other ``nn.Linear``, ``nn.MSELoss`` and ``torch.optim.SGD``. As both
compute the same math, the two loss curves may differ only by floating-point rounding; the demo
measures that difference and fails when it is larger (see :data:`CURVE_TOL`).

The datasets ship inside scikit-learn (no download): ``digits`` (8x8 images of handwritten
digits, 10 classes, trained as regression onto one-hot targets with MSE; reports accuracy) and
``diabetes`` (10 features, one continuous target; reports R²).
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch import Tensor, nn

import manualbp
from manualbp._dispatch import interpreter_enabled, resolve

__all__ = [
    "ACTIVATION_MODULES",
    "CURVE_TOL",
    "DATASETS",
    "DemoConfig",
    "DemoResult",
    "curve_agreement",
    "run_demo",
]

# Per-dataset defaults for the options left unset on the command line. Chosen so that the bare
# command trains to a sensible result in a few seconds on a 2-core laptop CPU.
DATASETS: dict[str, dict[str, Any]] = {
    "digits": {
        "task": "classification",
        "metric": "accuracy",
        "steps": 1000,
        "lr": 0.5,
        "hidden": 128,
    },
    # Small data (332 training rows): fewer steps and a narrower net before it overfits.
    "diabetes": {"task": "regression", "metric": "R²", "steps": 200, "lr": 0.005, "hidden": 64},
}
QUICK_STEPS = 60

# What the native model uses for each fusable activation; manualbp.convert folds these modules
# into the preceding manualbp.Linear (activation=name).
ACTIVATION_MODULES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
}

# Agreement of the two loss curves, step by step: |l_manualbp(t) - l_native(t)| <= CURVE_TOL * S,
# where S = max_t |l_native(t)| is the curve's scale (in practice its first, largest loss).
#
# Why this tolerance. Both runs evaluate the same formulas in float32 from bit-identical
# weights; what may differ is only the order in which sums are rounded (a Triton GEMM's K loop
# against cuBLAS's, the fused bias/activation epilogue, MSE's reduction tree): a few float32 ulps
# (eps = 1.2e-7) of relative change per gradient per step. (On the CPU reference path even that
# is absent: manualbp's curve is bit-identical to native's.) Training carries such differences
# along, and near the end, where the loss is small and noisy, amplifies them relative to the
# loss itself, which is why the scale S and not |l(t)| is the yardstick. Measured with native
# autograd on the default runs: starting from weights moved by one ulp moves the loss curve by
# at most 4e-7 * S (digits, 1000 steps) and 2e-7 * S (diabetes); a relative error of 1e-3 made
# in a weight gradient at *every* step moves it by 1.4e-2 * S, so a persistent ulp-level
# difference (1e-6) stays near 1e-5 * S. A genuine bug is far outside: a bias gradient averaged
# instead of summed over the batch moves the curve by 1.4e-2 * S (diabetes) to 3.7e-2 * S
# (digits) within 20 to 45 steps, a missing factor 2 in MSE's gradient by 0.15 * S to 0.26 * S.
# CURVE_TOL = 1e-3 leaves a margin of 100x to 1000x over rounding drift and still flags those.
CURVE_TOL = 1e-3


@dataclass
class DemoConfig:
    """The demo's options (the CLI flags of ``manualbp demo``); ``None`` = dataset default."""

    dataset: str = "digits"
    steps: int | None = None
    batch_size: int = 64
    lr: float | None = None
    momentum: float = 0.9
    hidden: int | None = None
    activation: str = "relu"
    seed: int = 0
    device: str = "cpu"
    test_fraction: float = 0.25
    progress: bool = True

    def resolved(self) -> DemoConfig:
        """A copy with the dataset defaults filled in."""
        defaults = DATASETS[self.dataset]
        out = copy.copy(self)
        if out.steps is None:
            out.steps = defaults["steps"]
        if out.lr is None:
            out.lr = defaults["lr"]
        if out.hidden is None:
            out.hidden = defaults["hidden"]
        return out


@dataclass
class RunStats:
    """One implementation's run: its loss per step, held-out metric and step times."""

    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    metric: float = math.nan

    @property
    def median_step_ms(self) -> float:
        return 1e3 * statistics.median(self.step_seconds) if self.step_seconds else math.nan


@dataclass
class DemoResult:
    """What :func:`run_demo` measured."""

    config: DemoConfig
    backend: str
    metric_name: str
    native: RunStats
    manual: RunStats
    max_abs_diff: float
    max_rel_diff: float
    worst_step: int
    agree: bool

    @property
    def native_losses(self) -> Tensor:
        return torch.tensor(self.native.losses, dtype=torch.float64)

    @property
    def manual_losses(self) -> Tensor:
        return torch.tensor(self.manual.losses, dtype=torch.float64)


def load_dataset(name: str, seed: int, test_fraction: float) -> dict[str, Tensor]:
    """``x_train, y_train, x_test, y_test`` (float32 tensors) and ``labels_test`` (digits).

    Features are standardised with the training split's statistics. Digits targets are
    one-hot rows; the diabetes target is standardised (R² is unchanged by that affine map).
    """
    try:
        from sklearn import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "manualbp demo loads its datasets from scikit-learn, which is not installed; "
            "install the demo extras: pip install 'manualbp[demo]'"
        ) from e
    if name == "digits":
        x_np, y_np = datasets.load_digits(return_X_y=True)
    elif name == "diabetes":
        x_np, y_np = datasets.load_diabetes(return_X_y=True)
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    x = torch.as_tensor(x_np, dtype=torch.float64)
    y = torch.as_tensor(y_np)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    n_test = max(1, round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))  # constant pixels: std 0
    out = {"x_train": x[train].float(), "x_test": x[test].float()}
    if name == "digits":
        labels = y.long()
        onehot = nn.functional.one_hot(labels, 10).float()
        out.update(y_train=onehot[train], y_test=onehot[test], labels_test=labels[test])
    else:
        t = y.double()
        t = (t - t[train].mean()) / t[train].std()
        out.update(y_train=t[train, None].float(), y_test=t[test, None].float())
    return out


def build_native_model(n_in: int, hidden: int, n_out: int, activation: str) -> nn.Sequential:
    """``Linear -> act -> Linear -> act -> Linear`` from ``torch.nn``."""
    act = ACTIVATION_MODULES[activation]
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        act(),
        nn.Linear(hidden, hidden),
        act(),
        nn.Linear(hidden, n_out),
    )


def _batches(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Mini-batch indices: a fresh shuffle of ``range(n)`` per epoch, forever."""
    gen = torch.Generator().manual_seed(seed + 1)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):  # the last partial batch is dropped
            yield perm[i : i + batch_size]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(
    model: nn.Module, loss_fn: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor
) -> tuple[float, float]:
    """One forward, loss, backward, update; ``(loss, seconds)``. ``.item()`` syncs the device."""
    _sync(x.device)
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    value = loss.item()
    _sync(x.device)
    return value, time.perf_counter() - start


@torch.no_grad()
def _evaluate(model: nn.Module, data: dict[str, Tensor], task: str) -> float:
    pred = model(data["x_test"])
    if task == "classification":
        return (pred.argmax(1) == data["labels_test"]).double().mean().item()
    target = data["y_test"]
    ss_res = ((pred - target) ** 2).sum()
    ss_tot = ((target - target.mean()) ** 2).sum()
    return (1 - ss_res / ss_tot).item()


def curve_agreement(
    manual: Tensor, native: Tensor, tol: float = CURVE_TOL
) -> tuple[float, float, int, bool]:
    """``(max |Δ|, max |Δ|/|native|, worst step, agree)`` for two loss curves (float64).

    ``agree``: every step's ``|Δ| <= tol * max|native|`` (see :data:`CURVE_TOL`) and both
    curves finite. The relative difference is per step, ``|Δ(t)| / |native(t)|``.
    """
    diff = (manual - native).abs()
    if diff.numel() == 0:
        return 0.0, 0.0, -1, True
    rel = diff / native.abs().clamp_min(torch.finfo(torch.float64).tiny)
    scale = native.abs().max()
    worst = int(diff.argmax())
    finite = bool(manual.isfinite().all() and native.isfinite().all())
    ok = finite and bool((diff <= tol * scale).all())
    return diff.max().item(), rel.max().item(), worst, ok


class _Progress:
    """tqdm on a terminal when installed, else a plain line per 10% on ``stream``."""

    def __init__(self, total: int, enabled: bool, stream: TextIO) -> None:
        self.total, self.enabled, self.stream, self.done = total, enabled, stream, 0
        self._bar = None
        if enabled and stream.isatty():  # tqdm's redraws would clutter a log file
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc="training", unit="step", file=stream)

    def update(self, native_loss: float, manual_loss: float) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if self.done % 10 == 0 or self.done == self.total:
                self._bar.set_postfix(
                    native=f"{native_loss:.4g}", manualbp=f"{manual_loss:.4g}", refresh=False
                )
            return
        tenth = max(self.total // 10, 1)
        if self.done % tenth == 0 or self.done == self.total:
            pct = 100 * self.done // self.total
            print(
                f"  step {self.done:>{len(str(self.total))}}/{self.total} ({pct:3d}%)  "
                f"loss native {native_loss:.5g}  manualbp {manual_loss:.5g}",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def describe_backend(device: torch.device) -> tuple[str, str]:
    """``(backend, sentence)`` for what manualbp runs on ``device`` under the current setting."""
    backend = resolve(torch.empty(0, device=device))
    if backend == "triton":
        how = (
            "Triton kernels under Triton's CPU interpreter (TRITON_INTERPRET=1; slow)"
            if device.type != "cuda" and interpreter_enabled()
            else "Triton kernels"
        )
    else:
        how = "reference path (plain torch ops"
        how += ")" if device.type == "cuda" else "; the Triton kernels run on a CUDA GPU)"
    return backend, f"device {device}, manualbp backend '{backend}': {how}"


def run_demo(
    config: DemoConfig,
    *,
    out: Callable[[str], None] = print,
    progress_stream: TextIO | None = None,
) -> DemoResult:
    """Train the native and the manualbp model side by side; report and return the results.

    ``out`` receives the report lines; the progress bar goes to ``progress_stream``
    (default ``sys.stderr``) when ``config.progress``.
    """
    cfg = config.resolved()
    assert cfg.steps is not None and cfg.lr is not None and cfg.hidden is not None
    info = DATASETS[cfg.dataset]
    device = torch.device(cfg.device)
    backend, sentence = describe_backend(device)
    data = {
        k: v.to(device) for k, v in load_dataset(cfg.dataset, cfg.seed, cfg.test_fraction).items()
    }
    n_train, n_in = data["x_train"].shape
    n_out = data["y_train"].shape[1]

    torch.manual_seed(cfg.seed)
    native = build_native_model(n_in, cfg.hidden, n_out, cfg.activation).to(device)
    manual = manualbp.convert(copy.deepcopy(native))  # same weights, manualbp layers
    native_loss, manual_loss = nn.MSELoss(), manualbp.MSELoss()
    native_opt = torch.optim.SGD(native.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    from manualbp.optim import SGD

    manual_opt = SGD(manual.parameters(), lr=cfg.lr, momentum=cfg.momentum)

    batch = min(cfg.batch_size, n_train)
    out(
        f"manualbp demo: {cfg.dataset} ({info['task']}, {n_train} train / "
        f"{len(data['x_test'])} held-out samples, {n_in} features -> {n_out} outputs)"
    )
    out(f"  {sentence}")
    out(
        f"  MLP {n_in}-{cfg.hidden}-{cfg.hidden}-{n_out} ({cfg.activation}), MSE loss, "
        f"SGD lr={cfg.lr:g} momentum={cfg.momentum:g}, batch {batch}, {cfg.steps} steps, "
        f"seed {cfg.seed}"
    )
    out(f"  manualbp model: {_layers(manual)}")

    native_stats, manual_stats = RunStats(), RunStats()
    bar = _Progress(cfg.steps, cfg.progress, progress_stream or sys.stderr)
    native.train()
    manual.train()
    try:
        for _, idx in zip(range(cfg.steps), _batches(n_train, batch, cfg.seed), strict=False):
            idx = idx.to(device)
            x, y = data["x_train"][idx], data["y_train"][idx]
            ln, tn = _train_step(native, native_loss, native_opt, x, y)
            lm, tm = _train_step(manual, manual_loss, manual_opt, x, y)
            native_stats.losses.append(ln)
            native_stats.step_seconds.append(tn)
            manual_stats.losses.append(lm)
            manual_stats.step_seconds.append(tm)
            bar.update(ln, lm)
    finally:
        bar.close()

    native_stats.metric = _evaluate(native.eval(), data, info["task"])
    manual_stats.metric = _evaluate(manual.eval(), data, info["task"])
    max_abs, max_rel, worst, agree = curve_agreement(
        torch.tensor(manual_stats.losses, dtype=torch.float64),
        torch.tensor(native_stats.losses, dtype=torch.float64),
    )
    result = DemoResult(
        config=cfg,
        backend=backend,
        metric_name=info["metric"],
        native=native_stats,
        manual=manual_stats,
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
        worst_step=worst,
        agree=agree,
    )
    _report(result, out)
    return result


def _layers(model: nn.Module) -> str:
    return ", ".join(
        f"{type(m).__module__.split('.')[0]}.Linear({m.in_features}, {m.out_features}"
        + (f", activation={m.activation!r})" if getattr(m, "activation", None) else ")")
        for m in model.modules()
        if isinstance(m, nn.Linear)
    )


def _format_metric(name: str, value: float) -> str:
    return f"{100 * value:.2f}%" if name == "accuracy" else f"{value:.4f}"


def _report(r: DemoResult, out: Callable[[str], None]) -> None:
    n, m = r.native, r.manual
    if not n.losses:
        out("  no training steps run")
    else:
        out(f"  loss, step 1:     native {n.losses[0]:.6g}   manualbp {m.losses[0]:.6g}")
        out(f"  loss, last step:  native {n.losses[-1]:.6g}   manualbp {m.losses[-1]:.6g}")
    out(
        f"  held-out {r.metric_name}:  native {_format_metric(r.metric_name, n.metric)}   "
        f"manualbp {_format_metric(r.metric_name, m.metric)}"
    )
    ratio = m.median_step_ms / n.median_step_ms if n.step_seconds else math.nan
    out(
        f"  time per step (median, forward+backward+update): native {n.median_step_ms:.3f} ms   "
        f"manualbp {m.median_step_ms:.3f} ms   ({ratio:.2f}x)"
    )
    verdict = "AGREE" if r.agree else "DISAGREE"
    where = f", largest at step {r.worst_step + 1}" if r.worst_step >= 0 and r.max_abs_diff else ""
    scale = max((abs(v) for v in n.losses), default=0.0)
    out(
        f"  loss curves {verdict}: max |Δ| per step = {r.max_abs_diff:.3g}, max relative Δ = "
        f"{r.max_rel_diff:.3g} over {len(n.losses)} steps{where} "
        f"(tolerance |Δ| <= {CURVE_TOL:g} x max loss = {CURVE_TOL * scale:.3g})"
    )


def save_plot(result: DemoResult, path: str) -> None:
    """Write both loss curves (and their difference) to a PNG at ``path``.

    Uses matplotlib's object API with the Agg canvas, so no display or global backend state
    is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = range(1, len(result.native.losses) + 1)
    fig = Figure(figsize=(8, 6), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot(
        steps,
        result.native.losses,
        label="native autograd (nn.Linear, nn.MSELoss, torch.optim.SGD)",
        lw=2.5,
        alpha=0.6,
    )
    top.plot(
        steps, result.manual.losses, "--", label="manualbp (Linear, MSELoss, optim.SGD)", lw=1.2
    )
    top.set_yscale("log")
    top.set_ylabel("training loss (MSE)")
    cfg = result.config
    top.set_title(
        f"{cfg.dataset}: held-out {result.metric_name} native "
        f"{_format_metric(result.metric_name, result.native.metric)}, manualbp "
        f"{_format_metric(result.metric_name, result.manual.metric)} "
        f"(backend {result.backend}, {cfg.device})"
    )
    top.legend()
    diff = (result.manual_losses - result.native_losses).abs()
    bottom.plot(steps, diff.tolist(), color="C2", lw=1)
    bottom.set_ylabel("|Δ loss|")
    bottom.set_xlabel("step")
    if bool((diff > 0).any()):
        bottom.set_yscale("log")
    else:
        bottom.set_title("the two curves are bit-identical at every step", fontsize="small")
    fig.savefig(path, dpi=100)
