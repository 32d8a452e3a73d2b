"""``manualbp.Sequential``: an ``nn.Sequential`` that runs Linear + activation pairs as one op.

Fusion happens in the container, at call time, never in the modules: ``seq[0]`` stays a plain
Linear and ``seq[1]`` the activation module, so each returns what it returns natively when
called on its own (feature extractors, forward hooks, slices such as ``seq[:-1]``).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

from torch import Tensor, nn
from torch.nn.modules import module as _module

from manualbp import _autocast as autocast
from manualbp import functional
from manualbp.activations import activation_of_module
from manualbp.autograd.fused_mlp import MAX_WIDTH, fused_mlp
from manualbp.autograd.fused_mlp_mse import fused_mlp_mse_loss
from manualbp.autograd.linear_chain import linear_chain
from manualbp.dispatch import resolve
from manualbp.modules.linear import Linear
from manualbp.modules.linear_mse import LinearMSELoss
from manualbp.modules.loss import MSELoss

__all__ = ["Sequential"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def has_hooks(module: nn.Module) -> bool:
    """Whether a hook would observe ``module``'s call (its own hooks or global module hooks)."""
    if any(getattr(module, name, None) for name in _HOOK_DICTS):
        return True
    return any(getattr(_module, name, None) for name in _GLOBAL_HOOK_DICTS)


def fusable_pair(first: nn.Module, second: nn.Module) -> tuple[str, float] | None:
    """``(activation, negative_slope)`` when ``first`` then ``second`` can run as one fused
    Linear call exactly as they run apart: a manualbp Linear without an activation of its
    own, then a registry activation module, neither observed by hooks."""
    if type(first) is not Linear or first.activation is not None:
        return None
    found = activation_of_module(second)
    if found is None or has_hooks(first) or has_hooks(second):
        return None
    act, slope = found
    return act.name, slope


class MLPRun(NamedTuple):
    """A run of Linear (+ activation) children the container runs as one fused MLP:
    children ``start .. end - 1``, their Linear layers, the hidden layers' activation and the
    last layer's, and their slopes."""

    start: int
    end: int
    linears: list[Linear]
    hidden: str | None
    out: str | None
    hidden_slope: float
    out_slope: float


def _layer_at(modules: list[nn.Module], j: int) -> tuple[Linear, str | None, float, int] | None:
    """``(linear, activation, slope, next index)`` for a hook-free manualbp Linear at ``j`` with
    its own activation or a fusable activation module after it; ``None`` if ``j`` holds none."""
    lin = modules[j]
    if type(lin) is not Linear or has_hooks(lin):
        return None
    if lin.activation is not None:
        slope = lin.negative_slope if lin.activation == "leaky_relu" else 0.01
        return lin, lin.activation, slope, j + 1
    pair = fusable_pair(lin, modules[j + 1]) if j + 1 < len(modules) else None
    if pair is None:
        return lin, None, 0.01, j + 1
    return lin, pair[0], pair[1] if pair[0] == "leaky_relu" else 0.01, j + 2


def mlp_run(modules: list[nn.Module], start: int, min_layers: int = 2) -> MLPRun | None:
    """The longest run of >= ``min_layers`` layers from ``start`` that one fused MLP computes
    exactly: each a hook-free :class:`manualbp.Linear` (+ registry activation), every width
    <= 128, one dtype and device, consecutive shapes, and every layer but the last with the
    same activation."""
    layers: list[tuple[Linear, str | None, float]] = []
    j = start
    while j < len(modules):
        found = _layer_at(modules, j)
        if found is None:
            break
        lin, act, slope, nxt = found
        w = lin.weight
        if layers:
            prev, first = layers[-1], layers[0]
            if (prev[1], prev[2]) != (first[1], first[2]) or prev[0].out_features != w.shape[1]:
                break
            w0 = first[0].weight
            if (w.dtype, w.device) != (w0.dtype, w0.device):
                break
        if max(w.shape) > MAX_WIDTH or w.dim() != 2:
            break
        layers.append((lin, act, slope))
        j = nxt
    if len(layers) < max(min_layers, 1):
        return None
    (_, hidden, h_slope), (_, out, o_slope) = layers[0], layers[-1]
    return MLPRun(start, j, [lin for lin, _, _ in layers], hidden, out, h_slope, o_slope)


class ChainPair(NamedTuple):
    """Two consecutive layers (a Linear, then its activation if any) the container runs as one
    :func:`~manualbp.autograd.linear_chain.linear_chain` node: children ``start .. end - 1``,
    the second Linear at ``middle``."""

    start: int
    middle: int
    end: int
    first: Linear
    first_act: str | None
    first_slope: float
    second: Linear
    second_act: str | None
    second_slope: float


def chain_pair(modules: list[nn.Module], start: int) -> ChainPair | None:
    """The pair of layers from ``start`` whose backward fuses the lower layer's activation
    gradient into the upper layer's dX GEMM: two hook-free :class:`manualbp.Linear` layers
    (each with its own activation or a registry activation module after it, or none), the
    second taking the first's output width."""
    first = _layer_at(modules, start)
    if first is None or first[3] >= len(modules):
        return None
    second = _layer_at(modules, first[3])
    if second is None or second[0].in_features != first[0].out_features:
        return None
    return ChainPair(start, first[3], second[3], *first[:3], *second[:3])


def _runs_fused(run: MLPRun, input: Tensor) -> bool:
    """Whether ``run`` on ``input`` runs on the fused kernels: not on the reference path (it
    gains nothing over the pairs there), nor when the input does not fit (its width, or its
    dtype outside autocast: the modules then raise as natively)."""
    weights = [lin.weight for lin in run.linears]
    w0 = weights[0]
    if input.dim() < 1 or input.shape[-1] != w0.shape[1] or input.device != w0.device:
        return False
    if input.dtype != w0.dtype and autocast.dtype_of(input) is None:
        return False
    return resolve(input, *weights) == "triton"


def _run_mlp(run: MLPRun, input: Tensor) -> Tensor | None:
    """The run on ``input`` through :func:`fused_mlp`, or ``None`` when it would not run on the
    fused kernels (see :func:`_runs_fused`)."""
    if not _runs_fused(run, input):
        return None
    weights = [lin.weight for lin in run.linears]
    return fused_mlp(
        input, weights, [lin.bias for lin in run.linears], run.hidden, run.out,
        negative_slope=run.hidden_slope, output_negative_slope=run.out_slope,
    )  # fmt: skip


def _run_mlp_loss(run: MLPRun, input: Tensor, target: Tensor, loss: nn.Module) -> Tensor | None:
    """``loss(run(input), target)`` with the loss folded into the fused MLP
    (:func:`fused_mlp_mse_loss`), or ``None`` when it does not fold: the loss is not a
    hook-free :class:`manualbp.MSELoss` or :class:`manualbp.LinearMSELoss` with a scalar
    reduction, the run would not run fused, or a head's layer does not extend the run (its
    width, dtype or device, or a run whose last activation differs from its hidden one)."""
    reduction = getattr(loss, "reduction", None)
    if type(loss) not in (MSELoss, LinearMSELoss) or reduction not in ("mean", "sum"):
        return None
    if has_hooks(loss) or not _runs_fused(run, input):
        return None
    weights = [lin.weight for lin in run.linears]
    biases = [lin.bias for lin in run.linears]
    out, out_slope = run.out, run.out_slope
    if type(loss) is LinearMSELoss:  # its Linear is the MLP's last layer, without activation
        w, last = loss.weight, weights[-1]
        if (run.out, run.out_slope) != (run.hidden, run.hidden_slope) or w.dim() != 2:
            return None
        if (w.dtype, w.device) != (last.dtype, last.device) or w.shape[1] != last.shape[0]:
            return None
        if max(w.shape) > MAX_WIDTH:
            return None
        weights.append(w)
        biases.append(loss.bias)
        out, out_slope = None, 0.01
    return fused_mlp_mse_loss(
        input, target, weights, biases, run.hidden, out, reduction,
        negative_slope=run.hidden_slope, output_negative_slope=out_slope,
    )  # fmt: skip


def _run_chain(pair: ChainPair, input: Tensor) -> Tensor:
    """The pair on ``input`` as one :func:`linear_chain` node (which itself runs the two layers
    one by one where the fused node does not apply, with the same result)."""
    return linear_chain(
        input, pair.first.weight, pair.first.bias, pair.first_act,
        pair.second.weight, pair.second.bias, pair.second_act,
        negative_slope=pair.first_slope, negative_slope2=pair.second_slope,
    )  # fmt: skip


class Sequential(nn.Sequential):
    r"""``nn.Sequential`` whose Linear + activation pairs run as one fused call.

    When the container's own ``forward`` reaches a :class:`manualbp.Linear` (without an
    activation) followed by an activation module of the registry (``nn.ReLU``, ``nn.GELU``,
    ``nn.SiLU``, ``nn.Tanh``, ``nn.Sigmoid``, ``nn.LeakyReLU``), it computes
    ``act(x W^T + b)`` in one call of :func:`manualbp.functional.linear` — one kernel on the
    Triton path, with the hand-derived fused backward. Everything else runs module by module,
    as in ``nn.Sequential``. A pair is not fused while either module has hooks (checked at
    each call, global module hooks included), so hooks see exactly what they see natively.

    On the Triton backend (CUDA tensors), a run of two or more such layers (a Linear with or
    without a following activation, all widths <= 128, one dtype and device, no hooks, every
    layer but the last with the same activation) runs as one fused MLP
    (:func:`manualbp.autograd.fused_mlp.fused_mlp`): one forward kernel launch, reading the
    modules' own ``weight`` / ``bias`` at each call. ``fuse_mlp = False`` (on the instance)
    turns this off; the pairs are then fused as above.

    On the Triton backend, two consecutive layers (each a Linear with its activation or none)
    that no fused MLP run takes, e.g. a wide up-projection -> GELU -> down-projection, run as
    one :func:`~manualbp.autograd.linear_chain.linear_chain` node (:meth:`chain_pairs`): the
    upper layer's dX GEMM forms the lower layer's activation gradient and bias gradient in its
    epilogue, so that gradient is never written and read back; results equal the pairs'.

    When the last child is a loss (:class:`manualbp.MSELoss` or
    :class:`manualbp.LinearMSELoss`, or ``nn.MSELoss``), the container is called as
    ``loss = seq(x, target)`` and passes ``target`` to it. When a run of layers that runs fused
    reaches a hook-free ``manualbp.MSELoss`` / ``manualbp.LinearMSELoss`` (``"mean"`` or
    ``"sum"``; the head's Linear becomes the MLP's last layer), the loss and its gradient fold
    into the fused MLP's last layer (:func:`manualbp.FusedMLP.mse_loss`'s op): the prediction
    is never stored.

    :func:`manualbp.convert` re-classes ``nn.Sequential`` containers into this class in place;
    children, indices, ``state_dict`` keys and Parameters are unchanged.
    """

    fuse_mlp: bool = True  # class default; an instance attribute overrides it

    def forward(self, input: Tensor, target: Tensor | None = None) -> Tensor:
        modules = list(self._modules.values())
        loss = None
        if target is not None:
            if not modules or not isinstance(modules[-1], (nn.MSELoss, LinearMSELoss)):
                raise TypeError(
                    f"{type(self).__name__}.forward() takes a target only when its last module "
                    "is a loss (manualbp.MSELoss, manualbp.LinearMSELoss or nn.MSELoss)"
                )
            modules, loss = modules[:-1], modules[-1]
        i = 0
        while i < len(modules):
            module = modules[i]
            fuse = self.fuse_mlp and type(module) is Linear
            if fuse and loss is not None:  # a run up to the loss: fold the loss into it
                run = mlp_run(modules, i, min_layers=1)
                if run is not None and run.end == len(modules):
                    folded = _run_mlp_loss(run, input, target, loss)
                    if folded is not None:
                        return folded
            run = mlp_run(modules, i) if fuse else None
            out = None if run is None else _run_mlp(run, input)
            if out is not None:
                input, i = out, run.end
                continue
            pair = chain_pair(modules, i) if type(module) is Linear else None
            if pair is not None and resolve(input, pair.first.weight) == "triton":
                input, i = _run_chain(pair, input), pair.end
                continue
            fused = fusable_pair(module, modules[i + 1]) if i + 1 < len(modules) else None
            if fused is None:
                input = module(input)
                i += 1
                continue
            activation, slope = fused
            input = functional.linear(
                input, module.weight, module.bias, activation, negative_slope=slope
            )
            i += 2
        return input if loss is None else loss(input, target)

    def fused_pairs(self) -> list[tuple[str, str]]:
        """The (Linear, activation) child names the container fuses when called now."""
        items = list(self._modules.items())
        return [
            (name, next_name)
            for (name, m), (next_name, n) in itertools.pairwise(items)
            if fusable_pair(m, n) is not None
        ]

    def chain_pairs(self) -> list[tuple[str, str]]:
        """The first child names of each pair of layers the container runs as one
        cross-layer-fused node (:func:`~manualbp.autograd.linear_chain.linear_chain`) when
        called now on the Triton backend, where no fused MLP run takes them."""
        names, modules = list(self._modules), list(self._modules.values())
        pairs, i = [], 0
        while i < len(modules):
            run = mlp_run(modules, i) if self.fuse_mlp and type(modules[i]) is Linear else None
            if run is not None:
                i = run.end
                continue
            pair = chain_pair(modules, i) if type(modules[i]) is Linear else None
            if pair is None:
                i += 1
                continue
            pairs.append((names[pair.start], names[pair.middle]))
            i = pair.end
        return pairs

    def mlp_runs(self) -> list[list[str]]:
        """The child names of each run the container fuses into one MLP when called now on the
        Triton backend (empty with ``fuse_mlp = False``)."""
        if not self.fuse_mlp:
            return []
        names, modules = list(self._modules), list(self._modules.values())
        runs, i = [], 0
        while i < len(modules):
            run = mlp_run(modules, i) if type(modules[i]) is Linear else None
            if run is None:
                i += 1
                continue
            runs.append(names[run.start : run.end])
            i = run.end
        return runs

    def extra_repr(self) -> str:
        pairs = self.fused_pairs()
        return "fused=[" + ", ".join(f"{a}+{b}" for a, b in pairs) + "]" if pairs else ""
