"""``manualbp demo``: the same MLP trained with manualbp and with native autograd, side by side.

Both runs start from the same weights and see the same mini-batches, so their loss curves may
differ only by floating-point rounding (:data:`CURVE_TOL`). What it runs, reports and exits
with: the command's description in :func:`add_parser`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import manualbp
from manualbp._mode import kernels_for
from manualbp.activations import ACTIVATIONS, get_activation
from manualbp.cli._args import (
    DEVICE_HELP,
    Formatter,
    device,
    nonnegative_float,
    nonnegative_int,
    paragraphs,
    positive_float,
    positive_int,
)
from manualbp.kernels._host import interpreting
from manualbp.optim import SGD

__all__ = ["CURVE_TOL", "DATASETS", "DEFAULT_PLOT", "PLOT_EXTENSIONS", "CurveComparison",
           "DemoConfig", "DemoResult", "add_parser", "command", "compare_curves", "plot_path",
           "run_demo", "save_plot"]  # fmt: skip

# Per-dataset defaults for the options left unset on the command line. Chosen so that the bare
# command trains to a sensible result in a few seconds on a 2-core laptop CPU; diabetes is small
# (332 training rows): fewer steps and a narrower net before it overfits.
DATASETS: dict[str, dict[str, Any]] = {
    "digits": dict(task="classification", metric="accuracy", steps=1000, lr=0.5, hidden=128),
    "diabetes": dict(task="regression", metric="R²", steps=200, lr=0.005, hidden=64),
}
QUICK_STEPS = 60

# ``--plot``: the file written inside a directory given as PATH, and the image types accepted
# (matplotlib writes each of them without extra software).
DEFAULT_PLOT = "manualbp-demo.png"
PLOT_EXTENSIONS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")

# Agreement of the two loss curves, step by step: |l_manualbp(t) - l_native(t)| <= CURVE_TOL * S,
# where S = max_t |l_native(t)| (in practice the first loss): near the end, where the loss is
# small and noisy, training amplifies rounding differences relative to l(t) itself.
# Why 1e-3: both runs evaluate the same float32 formulas from bit-identical weights; only the
# order in which sums are rounded may differ (a Triton GEMM's K loop against cuBLAS's, the fused
# epilogue, MSE's reduction tree; on the CPU reference path the curves are bit-identical).
# Measured with native autograd on the default runs: weights moved by one ulp move the curve by
# at most 4e-7 * S; a relative error of 1e-3 in a weight gradient at every step, by 1.4e-2 * S,
# so a persistent ulp-level difference (1e-6) stays near 1e-5 * S. A bias gradient averaged
# instead of summed moves it by 1.4e-2 * S to 3.7e-2 * S within 20 to 45 steps, a missing
# factor 2 in MSE's gradient by 0.15 * S to 0.26 * S: a margin of 100x to 1000x over rounding.
CURVE_TOL = 1e-3


# --- Configuration and results ---------------------------------------------------------------
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
    device: str | torch.device = "cpu"
    test_fraction: float = 0.25
    progress: bool = True  # the tqdm bar on stderr, when that is a terminal

    def resolved(self) -> DemoConfig:
        """A copy with the dataset defaults filled in."""
        unset = [name for name in ("steps", "lr", "hidden") if getattr(self, name) is None]
        return dataclasses.replace(self, **{k: DATASETS[self.dataset][k] for k in unset})


@dataclass
class RunStats:
    """One implementation's run: its loss per step, held-out metric and step times."""

    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    metric: float = math.nan

    @property
    def median_step_ms(self) -> float:
        return 1e3 * statistics.median(self.step_seconds) if self.step_seconds else math.nan


@dataclass(frozen=True)
class CurveComparison:
    """How two loss curves compare (:func:`compare_curves`).

    The steps compared are those before either curve first becomes non-finite (all of them
    when both stay finite); ``*_diverged_at`` is that first non-finite step (0-based) of each
    curve, ``None`` when it stays finite. ``verdict``: ``"agree"`` (finite and within
    tolerance), ``"diverged"`` (both curves went NaN/Inf and agree before that: the training
    blew up, natively too; not a mismatch) or ``"disagree"``.
    """

    max_abs_diff: float
    max_rel_diff: float
    worst_step: int  # -1 when no step was compared
    steps_compared: int
    tolerance: float  # the largest |Δ| allowed: CURVE_TOL x the compared steps' max |loss|
    native_diverged_at: int | None
    manual_diverged_at: int | None
    verdict: str

    @property
    def agree(self) -> bool:
        return self.verdict == "agree"


@dataclass
class DemoResult:
    """What :func:`run_demo` measured."""

    config: DemoConfig
    backend: str
    metric_name: str
    native: RunStats
    manual: RunStats
    curves: CurveComparison

    @property
    def agree(self) -> bool:
        return self.curves.agree

    @property
    def native_losses(self) -> Tensor:
        return torch.tensor(self.native.losses, dtype=torch.float64)

    @property
    def manual_losses(self) -> Tensor:
        return torch.tensor(self.manual.losses, dtype=torch.float64)


# --- Data, models, training ------------------------------------------------------------------
def _import_extra(module: str) -> Any:
    """``module`` from the ``demo`` extra; ``RuntimeError`` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            f"manualbp demo needs {e.name}, which is not installed; install the demo extras: "
            "pip install 'manualbp[demo]'"
        ) from e


def load_dataset(name: str, seed: int, test_fraction: float) -> dict[str, Tensor]:
    """``x_train, y_train, x_test, y_test`` (float32 tensors) and ``labels_test`` (digits).

    Features are standardised with the training split's statistics. Digits targets are
    one-hot rows; the diabetes target is standardised (R² is unchanged by that affine map).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    datasets = _import_extra("sklearn.datasets")
    load = datasets.load_digits if name == "digits" else datasets.load_diabetes
    x_np, y_np = load(return_X_y=True)
    x, y = torch.as_tensor(x_np, dtype=torch.float64), torch.as_tensor(y_np)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
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
    """``Linear -> act -> Linear -> act -> Linear`` from ``torch.nn``; ``act`` is the native
    module of the registry's activation ``activation`` (which ``convert`` fuses)."""
    act = get_activation(activation)
    assert act is not None
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        act.native_module(),
        nn.Linear(hidden, hidden),
        act.native_module(),
        nn.Linear(hidden, n_out),
    )


@dataclass
class _Trainer:
    """One side of the comparison: a model, its loss, its optimizer, its statistics."""

    model: nn.Module
    loss_fn: nn.Module
    opt: torch.optim.Optimizer
    stats: RunStats = field(default_factory=RunStats)

    def step(self, x: Tensor, y: Tensor) -> float:
        """One forward, loss, backward, update; records the loss and the time (synced)."""
        _sync(x.device)
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.opt.step()
        value = loss.item()
        _sync(x.device)
        self.stats.losses.append(value)
        self.stats.step_seconds.append(time.perf_counter() - start)
        return value


def _trainers(cfg: DemoConfig, n_in: int, n_out: int, dev: torch.device) -> tuple[_Trainer, ...]:
    """``(native, manualbp)``: the same initial weights; manualbp's by ``convert`` of a copy."""
    torch.manual_seed(cfg.seed)
    native = build_native_model(n_in, cfg.hidden, n_out, cfg.activation).to(dev)
    manual = manualbp.convert(copy.deepcopy(native))
    hyper = {"lr": cfg.lr, "momentum": cfg.momentum}
    return (
        _Trainer(native, nn.MSELoss(), torch.optim.SGD(native.parameters(), **hyper)),
        _Trainer(manual, manualbp.MSELoss(), SGD(manual.parameters(), **hyper)),
    )


def _batches(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Mini-batch indices: a fresh shuffle of ``range(n)`` per epoch, forever."""
    gen = torch.Generator().manual_seed(seed + 1)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):  # the last partial batch is dropped
            yield perm[i : i + batch_size]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _train(cfg: DemoConfig, data: dict[str, Tensor], native: _Trainer, manual: _Trainer) -> None:
    """``cfg.steps`` steps of both, on the same mini-batches, under a tqdm bar on stderr with
    both losses; the bar is off without ``cfg.progress`` and when stderr is not a terminal
    (its redraws would clutter a log file)."""
    tqdm = _import_extra("tqdm").tqdm
    n_train = len(data["x_train"])
    batches = _batches(n_train, min(cfg.batch_size, n_train), cfg.seed)
    off = None if cfg.progress else True  # None: tqdm's own test, stderr is not a terminal
    with tqdm(total=cfg.steps, desc="training", unit="step", disable=off) as bar:
        for step, idx in zip(range(1, cfg.steps + 1), batches, strict=False):
            idx = idx.to(data["x_train"].device)
            x, y = data["x_train"][idx], data["y_train"][idx]
            losses = native.step(x, y), manual.step(x, y)
            bar.update()
            if step % 10 == 0 or step == cfg.steps:
                bar.set_postfix(
                    native=f"{losses[0]:.4g}", manualbp=f"{losses[1]:.4g}", refresh=False
                )


@torch.no_grad()
def _evaluate(model: nn.Module, data: dict[str, Tensor], task: str) -> float:
    pred = model.eval()(data["x_test"])
    if task == "classification":
        return (pred.argmax(1) == data["labels_test"]).double().mean().item()
    target = data["y_test"]
    ss_res = ((pred - target) ** 2).sum()
    ss_tot = ((target - target.mean()) ** 2).sum()
    return (1 - ss_res / ss_tot).item()


# --- The verdict -----------------------------------------------------------------------------
def _first_nonfinite(curve: Tensor) -> int | None:
    bad = (~curve.isfinite()).nonzero()
    return int(bad[0, 0]) if len(bad) else None


def compare_curves(manual: Tensor, native: Tensor, tol: float = CURVE_TOL) -> CurveComparison:
    """Compare two loss curves (float64), step by step; see :class:`CurveComparison`.

    On the steps compared: ``|Δ(t)| <= tol * max|native|`` (see :data:`CURVE_TOL`); the
    relative difference reported is per step, ``|Δ(t)| / |native(t)|``.
    """
    nat_bad, man_bad = _first_nonfinite(native), _first_nonfinite(manual)
    end = min((i for i in (nat_bad, man_bad) if i is not None), default=len(native))
    diff = (manual[:end] - native[:end]).abs()
    scale = native[:end].abs().max().item() if end else 0.0
    rel = diff / native[:end].abs().clamp_min(torch.finfo(torch.float64).tiny)
    within = bool((diff <= tol * scale).all())
    if nat_bad is None and man_bad is None:
        verdict = "agree" if within else "disagree"
    else:  # both blew up alike, or one alone (a real mismatch)
        verdict = "diverged" if within and None not in (nat_bad, man_bad) else "disagree"
    return CurveComparison(
        max_abs_diff=diff.max().item() if end else 0.0,
        max_rel_diff=rel.max().item() if end else 0.0,
        worst_step=int(diff.argmax()) if end else -1,
        steps_compared=end,
        tolerance=tol * scale,
        native_diverged_at=nat_bad,
        manual_diverged_at=man_bad,
        verdict=verdict,
    )


# --- Running and reporting -------------------------------------------------------------------
def describe_backend(dev: torch.device) -> tuple[str, str]:
    """``(backend, sentence)`` for what manualbp runs on ``dev`` under the current setting;
    raises what the backend setting raises when it cannot run there."""
    backend = "triton" if kernels_for(torch.empty(0, device=dev)) else "reference"
    if backend == "triton":
        how = "Triton kernels"
        if dev.type != "cuda" and interpreting():
            how += " under Triton's CPU interpreter (TRITON_INTERPRET=1; slow)"
    else:
        how = "reference path (plain torch ops"
        how += ")" if dev.type == "cuda" else "; the Triton kernels run on a CUDA GPU)"
    return backend, f"device {dev}, manualbp backend '{backend}': {how}"


def run_demo(config: DemoConfig, *, out: Callable[[str], None] = print) -> DemoResult:
    """Train the native and the manualbp model side by side; report (each line to ``out``; the
    progress bar to stderr, see :func:`_train`) and return the results."""
    cfg = config.resolved()
    dev = torch.device(cfg.device)
    backend, sentence = describe_backend(dev)
    data = {k: v.to(dev) for k, v in load_dataset(cfg.dataset, cfg.seed, cfg.test_fraction).items()}
    native, manual = _trainers(cfg, data["x_train"].shape[1], data["y_train"].shape[1], dev)
    _introduce(cfg, data, sentence, manual.model, out)
    _train(cfg, data, native, manual)
    for side in (native, manual):
        side.stats.metric = _evaluate(side.model, data, DATASETS[cfg.dataset]["task"])
    curves = compare_curves(
        *(torch.tensor(s.stats.losses, dtype=torch.float64) for s in (manual, native))
    )
    metric_name = DATASETS[cfg.dataset]["metric"]
    result = DemoResult(cfg, backend, metric_name, native.stats, manual.stats, curves)
    _report(result, out)
    return result


def _introduce(cfg: DemoConfig, data: dict[str, Tensor], sentence: str, manual: nn.Module,
               out: Callable[[str], None]) -> None:  # fmt: skip
    """The lines before training: the data, the backend, the model and its hyper-parameters."""
    (n_train, n_in), n_out = data["x_train"].shape, data["y_train"].shape[1]
    out(
        f"manualbp demo: {cfg.dataset} ({DATASETS[cfg.dataset]['task']}, {n_train} train / "
        f"{len(data['x_test'])} held-out samples, {n_in} features -> {n_out} outputs)"
    )
    out(f"  {sentence}")
    out(
        f"  MLP {n_in}-{cfg.hidden}-{cfg.hidden}-{n_out} ({cfg.activation}), MSE loss, "
        f"SGD lr={cfg.lr:g} momentum={cfg.momentum:g}, batch {min(cfg.batch_size, n_train)}, "
        f"{cfg.steps} steps, seed {cfg.seed}"
    )
    layers = [m for m in manual.modules() if isinstance(m, nn.Linear)]
    out("  manualbp model: " + ", ".join(map(_layer, layers)))


def _layer(m: nn.Linear) -> str:
    act = getattr(m, "activation", None)
    return f"{type(m).__module__.split('.')[0]}.Linear({m.in_features}, {m.out_features}" + (
        f", activation={act!r})" if act else ")"
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
    out(f"  {_curves_sentence(r.curves)}")


def _step(i: int | None) -> str:
    return "never" if i is None else f"at step {i + 1}"


def _curves_sentence(c: CurveComparison) -> str:
    """The report's verdict line on the two loss curves."""
    where = f", largest at step {c.worst_step + 1}" if c.worst_step >= 0 and c.max_abs_diff else ""
    numbers = (
        f"max |Δ| per step = {c.max_abs_diff:.3g}, max relative Δ = {c.max_rel_diff:.3g} over "
        f"{c.steps_compared} steps{where} (tolerance |Δ| <= {CURVE_TOL:g} x max loss = "
        f"{c.tolerance:.3g})"
    )
    if c.native_diverged_at is None and c.manual_diverged_at is None:
        return f"loss curves {'AGREE' if c.agree else 'DISAGREE'}: {numbers}"
    blew_up = (
        f"the loss became NaN/Inf {_step(c.native_diverged_at)} with native autograd and "
        f"{_step(c.manual_diverged_at)} with manualbp"
    )
    if c.verdict == "diverged":
        return f"loss curves DIVERGED, both alike: {blew_up}; before that, {numbers}"
    return f"loss curves DISAGREE: {blew_up}; before that, {numbers}"


# --- The plot --------------------------------------------------------------------------------
def save_plot(result: DemoResult, path: str) -> None:
    """Write both loss curves (and their difference) to ``path``, an image of the type its
    extension names. Non-finite losses (a diverged run) leave gaps. Matplotlib's object API
    with the Agg canvas: no display or global backend state is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    cfg, name, n_steps = result.config, result.metric_name, len(result.native.losses)
    native, manual = (
        [v if math.isfinite(v) else math.nan for v in s.losses]
        for s in (result.native, result.manual)
    )
    steps = range(1, n_steps + 1)
    top.plot(steps, native, label="native autograd (nn.Linear, nn.MSELoss, torch.optim.SGD)",
             lw=2.5, alpha=0.6)  # fmt: skip
    top.plot(steps, manual, "--", label="manualbp (Linear, MSELoss, optim.SGD)", lw=1.2)
    if any(v > 0 for v in native + manual):  # NaN > 0 is False
        top.set_yscale("log")
    top.set(xlim=(1, max(n_steps, 2)), ylabel="training loss (MSE)")  # xlim: NaN steps too
    top.set_title(
        f"{cfg.dataset}: held-out {name} native {_format_metric(name, result.native.metric)}, "
        f"manualbp {_format_metric(name, result.manual.metric)} "
        f"(backend {result.backend}, {cfg.device})"
    )
    top.legend()
    compared = result.curves.steps_compared
    diff = (result.manual_losses - result.native_losses).abs()[:compared]
    bottom.plot(range(1, compared + 1), diff.tolist(), color="C2", lw=1)
    bottom.set(ylabel="|Δ loss|", xlabel="step")
    if bool((diff > 0).any()):
        bottom.set_yscale("log")
    if compared < n_steps:
        bottom.axvline(compared + 1, color="C3", lw=1, ls=":")
        bottom.set_title(f"NaN/Inf loss from step {compared + 1}", fontsize="small")
    elif not bool((diff > 0).any()):
        bottom.set_title("the two curves are bit-identical at every step", fontsize="small")
    fig.savefig(path, dpi=100)


# --- The command line: ``manualbp demo`` -----------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``demo`` sub-command to ``sub``; its handler is :func:`command`."""
    defaults = "; ".join(
        f"{name}: {d['steps']} steps, lr {d['lr']:g}, hidden {d['hidden']}"
        for name, d in DATASETS.items()
    )
    parser = sub.add_parser(
        "demo",
        help="train an MLP with manualbp and with native autograd side by side",
        formatter_class=Formatter,
        description=paragraphs(
            "Train the same MLP (Linear-act-Linear-act-Linear) twice, from the same initial "
            "weights, on the same mini-batches: once with native autograd (nn.Linear, "
            "nn.MSELoss, torch.optim.SGD), once with manualbp (manualbp.convert of a copy: "
            "manualbp.Linear with the activation fused; manualbp.MSELoss; manualbp.optim.SGD).",
            "Reports how closely the two loss curves agree step by step, the held-out accuracy "
            "(digits: 10 classes, one-hot targets with MSE) or R² (diabetes: regression), the "
            "time per step of each, and plots both curves. The datasets ship with scikit-learn "
            "(no download). Runs on CUDA with the Triton kernels when there is a GPU, on the "
            "reference path (plain torch ops) on CPU, and says which.",
            "Exits 1 if the curves differ by more than floating-point rounding explains: "
            "|Δloss| <= 1e-3 x the curve's largest loss at every step. Exits 3 if the loss "
            "became NaN/Inf in both runs alike (the learning rate is too large; not a "
            "manualbp-vs-native mismatch). Exits 130 on Ctrl-C.",
            f"Dataset defaults: {defaults}.",
        ),
    )
    _add_arguments(parser.add_argument)
    parser.set_defaults(handler=command, subparser=parser)
    return parser


def _add_arguments(arg: Callable[..., Any]) -> None:
    """The demo's flags; those named after a :class:`DemoConfig` field set that field."""
    arg(
        "--dataset",
        choices=sorted(DATASETS),
        default="digits",
        help="scikit-learn dataset to train on (default: %(default)s)",
    )
    arg(
        "--steps",
        type=positive_int,
        help=f"training steps (default: per dataset; {QUICK_STEPS} with --quick)",
    )
    arg("--batch-size", type=positive_int, default=64, help="mini-batch size (default: 64)")
    arg("--lr", type=positive_float, help="learning rate (default: per dataset)")
    arg("--momentum", type=nonnegative_float, default=0.9, help="SGD momentum (default: 0.9)")
    arg("--hidden", type=positive_int, help="width of the two hidden layers (default: per dataset)")
    arg(
        "--activation",
        default="relu",
        choices=list(ACTIVATIONS),
        help="hidden activation, fused into manualbp.Linear by convert (default: %(default)s)",
    )
    arg(
        "--seed",
        type=int,
        default=0,
        help="seed of the initial weights, the split and the batch order (default: %(default)s)",
    )
    arg("--device", type=device, default="auto", help=DEVICE_HELP)
    arg(
        "--threads",
        type=nonnegative_int,
        default=1,
        help="CPU threads for torch (default: %(default)s; 0: torch's own default). One thread "
        "is as fast for this small MLP and keeps the timing steady when other processes share "
        "the cores",
    )
    arg("--quick", action="store_true", help=f"{QUICK_STEPS} steps (unless --steps): for CI")
    arg(
        "--plot",
        metavar="PATH",
        help="where to write the plot of both loss curves: a file ending in "
        f"{', '.join(PLOT_EXTENSIONS)}, or an existing directory (the plot is then "
        f"DIR/{DEFAULT_PLOT}); checked before training; needs matplotlib (default: "
        f"{DEFAULT_PLOT} in the current directory)",
    )
    arg("--no-plot", action="store_true", help="write no plot")
    arg(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (there is none either when stderr is not a terminal)",
    )


def plot_path(text: str) -> str:
    """The absolute path ``--plot text`` writes: ``text`` itself, or :data:`DEFAULT_PLOT`
    inside it when it is an existing directory. ``ValueError`` (naming the problem) when it
    has no known image extension or its directory is missing or not writable."""
    path = os.path.abspath(os.path.join(text, DEFAULT_PLOT) if os.path.isdir(text) else text)
    ext = os.path.splitext(path)[1].lower()
    if ext not in PLOT_EXTENSIONS:
        got = f"extension {ext!r}" if ext else "no extension"
        raise ValueError(
            f"{text!r} has {got}: expected a file name ending in "
            f"{', '.join(PLOT_EXTENSIONS)}, or an existing directory"
        )
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        why = "is not a directory" if os.path.exists(folder) else "does not exist"
        raise ValueError(f"directory {folder!r} {why}")
    if os.path.exists(path):
        writable = os.path.isfile(path) and os.access(path, os.W_OK)
    else:
        writable = os.access(folder, os.W_OK | os.X_OK)
    if not writable:
        raise ValueError(f"cannot write {path!r}: permission denied")
    return path


def _have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _chosen_plot(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The validated plot path, or ``None`` for no plot; exits 2 for a path it cannot write."""
    if args.no_plot:
        return None
    if not _have_matplotlib():
        if args.plot is not None:  # asked for explicitly: an error, before any training
            parser.error(
                "argument --plot: needs matplotlib, which is not installed "
                "(pip install 'manualbp[demo]'), or pass --no-plot"
            )
        print(
            "manualbp demo: matplotlib is not installed, so no plot will be written "
            "(pip install 'manualbp[demo]', or pass --no-plot)",
            file=sys.stderr,
        )
        return None
    try:
        return plot_path(args.plot if args.plot is not None else DEFAULT_PLOT)
    except ValueError as e:
        parser.error(f"argument --plot: {e}")


def _write_plot(result: DemoResult, path: str) -> int:
    try:
        save_plot(result, path)
    except (OSError, ValueError) as e:  # checked before training, but the disk may have changed
        print(f"manualbp demo: error: could not write the plot {path!r}: {e}", file=sys.stderr)
        return 1
    print(f"  plot of both loss curves: {path}")
    return 0


def _verdict(result: DemoResult) -> int:
    """Say on stderr what went wrong, if anything; the exit status (0, 1 or 3)."""
    c = result.curves
    if c.verdict == "diverged":
        print(
            f"manualbp demo: DIVERGED: the loss became NaN/Inf in both runs alike (native "
            f"autograd {_step(c.native_diverged_at)}, manualbp {_step(c.manual_diverged_at)}; "
            "the curves agree before that). That is not a manualbp-vs-native mismatch: the "
            f"training itself blew up; try a smaller --lr (now {result.config.lr:g}) or "
            "--momentum.",
            file=sys.stderr,
        )
        return 3
    if not c.agree:
        print(
            "manualbp demo: FAILED: the manualbp and native loss curves differ by more than "
            "floating-point rounding explains",
            file=sys.stderr,
        )
    return 0 if c.agree else 1


def command(args: argparse.Namespace) -> int:
    """``manualbp demo``: exit status 0 if the curves agree, 1 if not, 2 for bad arguments,
    3 if both runs diverged alike, 130 on Ctrl-C (one line on stderr, no traceback). Every
    argument, the plot path included, is checked before training."""
    parser: argparse.ArgumentParser = args.subparser
    plot = _chosen_plot(parser, args)
    try:
        describe_backend(args.device)
    except (RuntimeError, ValueError) as e:  # MANUALBP_BACKEND unknown, or triton on bare CPU
        parser.error(str(e))
    if args.device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig) if f.name in args
    }
    if args.quick and args.steps is None:
        given["steps"] = QUICK_STEPS
    start = time.perf_counter()
    try:
        result = run_demo(DemoConfig(**given))
        plot_status = 0 if plot is None else _write_plot(result, plot)
    except RuntimeError as e:
        print(f"manualbp demo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # 130 = 128 + SIGINT, as a shell reports a process it stopped
        print("manualbp demo: interrupted", file=sys.stderr)
        return 130
    print(f"  total time {time.perf_counter() - start:.1f} s")
    return _verdict(result) or plot_status
