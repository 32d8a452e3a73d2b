"""``manualbp.Sequential``: an ``nn.Sequential`` that runs Linear + activation pairs, narrow
runs of layers and cross-layer pairs as fused ops.

Fusion happens in the container, at call time, never in the modules: ``seq[0]`` stays a plain
Linear and ``seq[1]`` the activation module, so each returns what it returns natively when
called on its own (feature extractors, forward hooks, slices such as ``seq[:-1]``). One
planning function (:meth:`Sequential.step_at`) decides, child by child, what runs next; the
forward pass and the introspection methods (:meth:`fused_pairs`, :meth:`mlp_runs`,
:meth:`chain_pairs`) all ask it.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn
from torch.nn.modules import module as _module

from manualbp import _mode
from manualbp.activations import activation_of_module, get_activation
from manualbp.modules.linear import Linear
from manualbp.modules.linear_mse import LinearMSELoss
from manualbp.modules.loss import MSELoss
from manualbp.ops._checks import overrides_torch_function
from manualbp.ops.fused_mlp import MAX_WIDTH, fused_mlp, fused_mlp_mse_loss
from manualbp.ops.linear import linear
from manualbp.ops.linear_chain import linear_chain

__all__ = ["Sequential", "has_hooks", "runs_as_written"]


def _global_hooks() -> bool:
    m = _module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks
                or m._global_backward_hooks or m._global_backward_pre_hooks)  # fmt: skip


def has_hooks(module: nn.Module) -> bool:
    """Whether a hook would observe ``module``'s call (its own hooks or global module hooks)."""
    own = module.__dict__
    if own.get("_forward_hooks") or own.get("_forward_pre_hooks"):
        return True
    return bool(own.get("_backward_hooks") or own.get("_backward_pre_hooks")) or _global_hooks()


def runs_as_written(module: nn.Module) -> bool:
    """Whether calling ``module`` runs its class's own ``forward`` and nothing else: no hook
    observes it and no ``forward`` was put on the instance (as Hugging Face accelerate's
    ``add_hook_to_module`` does). Only such modules are fused: a fused op reads their
    parameters and skips the call.

    ``module.forward`` is read too (always true): torch.compile guards on that attribute read,
    not on the ``__dict__`` look-up, so a forward patched after compiling recompiles, as
    natively."""
    return "forward" not in module.__dict__ and module.forward is not None and not has_hooks(module)


class Layer(NamedTuple):
    """A Linear child and the activation that follows it (its own, or the next child's)."""

    linear: Linear
    activation: str | None
    slope: float


class Step(NamedTuple):
    """What the container runs next: children ``start .. end - 1`` as ``kind``: ``"module"``
    (one child, called), ``"pair"`` (a Linear + activation, one fused Linear call), ``"chain"``
    (two layers as one cross-layer-fused node), ``"mlp"`` (a run of layers as one fused MLP) or
    ``"mlp_loss"`` (a run and the loss after it, the loss folded into the MLP)."""

    kind: str
    start: int
    end: int
    layers: tuple[Layer, ...] = ()


def _layer_at(modules: list[nn.Module], j: int) -> tuple[Layer, int] | None:
    """The layer at child ``j`` and the index after it, for a fusable manualbp Linear (with its
    own activation, or a registry activation module after it, or none); ``None`` otherwise."""
    lin = modules[j]
    if type(lin) is not Linear or not runs_as_written(lin):
        return None
    if lin.activation is not None:
        takes_param = get_activation(lin.activation).slope_attr is not None
        return Layer(lin, lin.activation, lin.negative_slope if takes_param else 0.01), j + 1
    after = modules[j + 1] if j + 1 < len(modules) else None
    found = None if after is None else activation_of_module(after)
    if found is None or not runs_as_written(after):
        return Layer(lin, None, 0.01), j + 1
    act, slope = found
    return Layer(lin, act.name, slope if act.slope_attr else 0.01), j + 2


def _mlp_run(modules: list[nn.Module], start: int) -> tuple[list[Layer], int]:
    """The longest run of layers from ``start`` that one fused MLP computes exactly: widths
    <= 128, one dtype and device, consecutive shapes, every layer but the last with the same
    activation; and the index after it."""
    layers: list[Layer] = []
    j = start
    while j < len(modules):
        found = _layer_at(modules, j)
        if found is None:
            break
        layer, nxt = found
        w = layer.linear.weight
        if w.dim() != 2 or max(w.shape) > MAX_WIDTH:
            break
        if layers:
            first, prev = layers[0], layers[-1]
            w0 = first.linear.weight
            if prev[1:] != first[1:] or prev.linear.out_features != w.shape[1]:
                break
            if (w.dtype, w.device) != (w0.dtype, w0.device):
                break
        layers.append(layer)
        j = nxt
    return layers, j


def _fits(layer: Layer, input: Tensor | None) -> bool:
    """Whether ``input`` reaches ``layer`` as a fused op needs it (its width and device, its
    dtype outside autocast: else the modules raise as natively); ``None`` (planning): yes."""
    if input is None:
        return True
    if overrides_torch_function(input):  # a subclass's __torch_function__ sees each module's op
        return False
    w = layer.linear.weight
    if input.dim() < 1 or input.shape[-1] != w.shape[1] or input.device != w.device:
        return False
    return input.dtype == w.dtype or _mode.autocast_dtype(input) is not None


def _folds(loss: nn.Module | None, layers: list[Layer]) -> list[Layer] | None:
    """The layers of a run with ``loss`` folded in (a :class:`LinearMSELoss`'s Linear as the
    last layer), or ``None`` where it does not fold: not a fusable manualbp MSE loss with a
    scalar reduction, or a head's layer that does not extend the run."""
    if type(loss) not in (MSELoss, LinearMSELoss) or not runs_as_written(loss):
        return None
    if loss.reduction not in ("mean", "sum"):
        return None
    if type(loss) is MSELoss:
        return layers
    w, last = loss.weight, layers[-1]
    if last[1:] != layers[0][1:] or w.dim() != 2 or max(w.shape) > MAX_WIDTH:
        return None  # the run's last activation must be its hidden one
    lw = last.linear.weight
    if (w.dtype, w.device) != (lw.dtype, lw.device) or w.shape[1] != lw.shape[0]:
        return None
    return [*layers, Layer(loss, None, 0.01)]  # type: ignore[arg-type]


class Sequential(nn.Sequential):
    r"""``nn.Sequential`` whose Linear + activation pairs run as one fused call.

    When the container's own ``forward`` reaches a :class:`manualbp.Linear` (without an
    activation) followed by an activation module of the registry (``nn.ReLU``, ``nn.GELU``,
    ``nn.SiLU``, ``nn.Tanh``, ``nn.Sigmoid``, ``nn.LeakyReLU``), it computes
    ``act(x W^T + b)`` in one call of :func:`manualbp.functional.linear` — one kernel on the
    Triton path, with the hand-derived fused backward. Everything else runs module by module,
    as in ``nn.Sequential``. Only children that run as written are fused: none observed by a
    hook (its own or a global one) and none whose ``forward`` was replaced on the instance,
    checked at each call, so hooks and patched forwards see exactly what they see natively.

    On the Triton backend, a run of two or more such layers (a Linear with or without a
    following activation, all widths <= 128, one dtype and device, every layer but the last
    with the same activation) runs as one fused MLP (:func:`manualbp.functional.fused_mlp`):
    one forward kernel launch, reading the modules' own ``weight`` / ``bias`` at each call.
    ``fuse_mlp = False`` (on the instance; slices keep it) turns this off. Two consecutive
    layers that no run takes (a wide up-projection -> GELU -> down-projection) run as one
    :func:`manualbp.functional.linear_chain` node, whose backward forms the lower layer's
    activation and bias gradients in the upper layer's dX GEMM.

    When the last child is a loss (:class:`manualbp.MSELoss` or
    :class:`manualbp.LinearMSELoss`, or ``nn.MSELoss``), the container is called as
    ``loss = seq(x, target)`` and passes ``target`` to it. When a run of layers that runs fused
    reaches a fusable ``manualbp.MSELoss`` / ``manualbp.LinearMSELoss`` (``"mean"`` or
    ``"sum"``; the head's Linear becomes the MLP's last layer), the loss folds into the fused
    MLP's last layer (:func:`manualbp.functional.fused_mlp_mse_loss`).

    :func:`manualbp.convert` re-classes ``nn.Sequential`` containers into this class in place;
    children, indices, ``state_dict`` keys and Parameters are unchanged.
    """

    fuse_mlp: bool = True  # class default; an instance attribute overrides it

    def step_at(self, modules: list[nn.Module], i: int, input: Tensor | None,
                loss: nn.Module | None = None) -> Step:  # fmt: skip
        """What runs from child ``i`` on ``input`` (``None``: planning, as if on the Triton
        backend with inputs that fit); ``loss``: the loss after ``modules``, if any."""
        found = _layer_at(modules, i)
        if found is None:
            return Step("module", i, i + 1)
        layer, nxt = found
        w = layer.linear.weight
        kernels = input is None or (_fits(layer, input) and _mode.kernels_for(input, w))
        if self.fuse_mlp and kernels:
            layers, end = _mlp_run(modules, i)
            folded = _folds(loss, layers) if end == len(modules) and layers else None
            if folded is not None:
                return Step("mlp_loss", i, end, tuple(folded))
            if len(layers) >= 2:
                return Step("mlp", i, end, tuple(layers))
        second = _layer_at(modules, nxt) if kernels and nxt < len(modules) else None
        if second is not None and second[0].linear.in_features == w.shape[0]:
            return Step("chain", i, second[1], (layer, second[0]))
        if layer.activation is not None and layer.linear.activation is None:
            return Step("pair", i, nxt, (layer,))
        return Step("module", i, i + 1)

    def forward(self, input: Tensor, target: Tensor | None = None) -> Tensor:
        modules = list(self._modules.values())
        loss = None
        if target is not None:
            if not modules or not isinstance(modules[-1], (nn.MSELoss, LinearMSELoss)):
                raise TypeError(
                    f"{type(self).__name__}.forward() got a target, but its last module is "
                    f"{type(modules[-1]).__name__ if modules else 'missing'}, not a loss "
                    "(manualbp.MSELoss, manualbp.LinearMSELoss or nn.MSELoss)"
                )
            modules, loss = modules[:-1], modules[-1]
        # A target with a __torch_function__ of its own sees the loss's op: no folding.
        fold = None if target is None or overrides_torch_function(target) else loss
        # Under torch.jit.trace, manualbp's own planning and fused steps run without the
        # TracerWarnings of their size checks (native has none); the children called one by
        # one keep theirs.
        tracing = _mode.jit_tracing()
        i = 0
        while i < len(modules):
            if tracing:
                step = _mode.untraced(self.step_at, modules, i, input, fold)
            else:
                step = self.step_at(modules, i, input, fold)
            i = step.end
            if step.kind == "module":
                input = modules[step.start](input)
            elif tracing:
                input = _mode.untraced(self._run, step, input, target, loss)
            else:
                input = self._run(step, input, target, loss)
            if step.kind == "mlp_loss":
                return input
        return input if loss is None else loss(input, target)

    def _run(self, step: Step, input: Tensor, target: Tensor | None,
             loss: nn.Module | None) -> Tensor:  # fmt: skip
        """One fused step (not ``"module"``) on ``input``: its output (``"mlp_loss"``: the
        loss)."""
        layers = step.layers
        if step.kind == "pair":
            (lin, act, slope), = layers  # fmt: skip
            return linear(input, lin.weight, lin.bias, act, negative_slope=slope)
        if step.kind == "chain":
            (l1, a1, s1), (l2, a2, s2) = layers
            return linear_chain(input, l1.weight, l1.bias, a1, l2.weight, l2.bias, a2,
                                negative_slope=s1, negative_slope2=s2)  # fmt: skip
        weights = [layer.linear.weight for layer in layers]
        biases = [layer.linear.bias for layer in layers]
        hidden, last = layers[0], layers[-1]
        args = (hidden.activation, last.activation)
        slopes = dict(negative_slope=hidden.slope, output_negative_slope=last.slope)
        if step.kind == "mlp":
            return fused_mlp(input, weights, biases, *args, **slopes)
        return fused_mlp_mse_loss(input, target, weights, biases, *args, loss.reduction,
                                  **slopes)  # fmt: skip

    def _plan(self) -> list[tuple[Step, list[str]]]:
        """The steps, with their children's names, on the Triton backend with inputs that fit."""
        names, modules = list(self._modules), list(self._modules.values())
        steps, i = [], 0
        while i < len(modules):
            step = self.step_at(modules, i, None)
            steps.append((step, names[step.start : step.end]))
            i = step.end
        return steps

    def fused_pairs(self) -> list[tuple[str, str]]:
        """The (Linear, activation) child names the container fuses into one Linear call when
        called now (on either backend, where no fused run takes them)."""
        names, modules = list(self._modules), list(self._modules.values())
        found = [_layer_at(modules, i) for i in range(len(modules) - 1)]
        return [(names[i], names[i + 1]) for i, f in enumerate(found) if f and f[1] == i + 2]

    def mlp_runs(self) -> list[list[str]]:
        """The child names of each run the container fuses into one MLP when called now on the
        Triton backend (empty with ``fuse_mlp = False``)."""
        return [names for step, names in self._plan() if step.kind == "mlp"]

    def chain_pairs(self) -> list[tuple[str, str]]:
        """The first child names of the two layers of each cross-layer-fused node the container
        runs when called now on the Triton backend (where no fused MLP run takes them)."""
        modules = list(self._modules.values())
        return [(names[0], names[_layer_at(modules, step.start)[1] - step.start])
                for step, names in self._plan() if step.kind == "chain"]  # fmt: skip

    def __getitem__(self, idx: int | slice) -> nn.Module:
        item = super().__getitem__(idx)
        if isinstance(item, Sequential) and "fuse_mlp" in self.__dict__:
            item.fuse_mlp = self.fuse_mlp  # a slice keeps the instance's setting
        return item

    def extra_repr(self) -> str:
        pairs = self.fused_pairs()
        return "fused=[" + ", ".join(f"{a}+{b}" for a, b in pairs) + "]" if pairs else ""
