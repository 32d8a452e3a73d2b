"""``manualbp.FusedMLP``: a narrow MLP whose layers run as one fused op."""

from __future__ import annotations

from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from manualbp.activations import activation_of_module, get_activation, resolve_param
from manualbp.modules.linear import Linear
from manualbp.ops._checks import overrides_torch_function
from manualbp.ops.fused_mlp import MAX_WIDTH, fused_mlp, fused_mlp_mse_loss

__all__ = ["FusedMLP"]


class FusedMLP(nn.Module):
    r"""``in -> hidden -> ... -> hidden -> out``: ``num_hidden_layers`` hidden layers of width
    ``hidden_features`` (each ``activation(x W^T + b)``) and an output layer
    (``output_activation(x W^T + b)``), run as one fused op.

    On the Triton backend (CUDA, or the interpreter) the forward is **one kernel launch**
    that carries each tile of rows through every layer in registers, and the backward two or
    three (the activation-gradient chain, then the weight gradients by a deterministic
    reduction); elsewhere the same hand-derived math runs in plain torch ops
    (:func:`manualbp.functional.fused_mlp`). Every width must be at most 128 for the
    kernels (``hidden_features`` must be; wider inputs or outputs run layer by layer).

    The layers are ordinary modules in ``self.layers``, an ``nn.Sequential`` of ``nn.Linear``
    and activation modules, exactly the native equivalent: ``state_dict`` keys are
    ``layers.0.weight``, ``layers.0.bias``, ``layers.2.weight``, ... (the activation modules
    take the odd indices), so ``mlp.layers.state_dict()`` loads into that ``nn.Sequential``
    and back. :meth:`to_sequential` and :meth:`from_sequential` convert. Forward reads the
    Linear modules' ``weight`` / ``bias`` at each call but does not call the modules (their
    hooks do not run), except on a tensor subclass with a ``__torch_function__``, which
    ``self.layers`` computes natively (the subclass then sees each op, as natively).
    :meth:`mse_loss` computes ``mse(self(x), target)`` with the loss
    folded into the last layer's epilogue.

    Args:
        in_features, hidden_features, out_features: the widths.
        num_hidden_layers: hidden layers (0: a single Linear ``in -> out``).
        activation: of the hidden layers, a registry name or ``None``. Default ``"relu"``.
        output_activation: of the output layer. Default ``None``.
        bias: whether every layer has a bias.
        negative_slope: the hidden activation's parameter (leaky_relu's slope, softplus's beta,
            sin's omega); ``None`` (default): its default (0.01, 1, 1).
        output_negative_slope: the output activation's (default: ``negative_slope``, or the
            output activation's default).

    Shape: input ``(*, in_features)``, output ``(*, out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        num_hidden_layers: int,
        activation: str | None = "relu",
        output_activation: str | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        negative_slope: float | None = None,
        output_negative_slope: float | None = None,
    ) -> None:
        super().__init__()
        _validate(in_features, hidden_features, out_features, num_hidden_layers, negative_slope,
                  output_negative_slope)  # fmt: skip
        hidden_act, out_act = get_activation(activation), get_activation(output_activation)
        self.activation, self.output_activation = activation, output_activation
        if output_negative_slope is None:
            output_negative_slope = negative_slope
        self.negative_slope = resolve_param(activation, negative_slope)
        self.output_negative_slope = resolve_param(output_activation, output_negative_slope)
        dims = [in_features, *[hidden_features] * num_hidden_layers, out_features]
        modules: list[nn.Module] = []
        for i in range(len(dims) - 1):
            modules.append(nn.Linear(dims[i], dims[i + 1], bias, device=device, dtype=dtype))
            act = out_act if i == len(dims) - 2 else hidden_act
            if act is not None:
                last = i == len(dims) - 2
                modules.append(act.native_module(
                    self.output_negative_slope if last else self.negative_slope))  # fmt: skip
        self.layers = nn.Sequential(*modules)

    def linears(self) -> list[nn.Linear]:
        """The Linear layers, input to output."""
        return [m for m in self.layers if isinstance(m, nn.Linear)]

    def forward(self, input: Tensor) -> Tensor:
        if overrides_torch_function(input):  # its __torch_function__ sees each layer's ops
            return self.layers(input)
        linears = self.linears()
        return fused_mlp(
            input, [m.weight for m in linears], [m.bias for m in linears], self.activation,
            self.output_activation, negative_slope=self.negative_slope,
            output_negative_slope=self.output_negative_slope,
        )  # fmt: skip

    def mse_loss(self, input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """``nn.MSELoss(reduction=reduction)(self(input), target)`` with the loss folded into the
        last layer (:func:`manualbp.functional.fused_mlp_mse_loss`): for
        ``"mean"`` / ``"sum"`` the prediction is never stored; on the Triton backend the
        forward is two launches and the backward the fused MLP's."""
        if overrides_torch_function(input, target):  # as natively: the subclass sees the ops
            return F.mse_loss(self.layers(input), target, reduction=reduction)
        linears = self.linears()
        return fused_mlp_mse_loss(
            input, target, [m.weight for m in linears], [m.bias for m in linears],
            self.activation, self.output_activation, reduction,
            negative_slope=self.negative_slope, output_negative_slope=self.output_negative_slope,
        )  # fmt: skip

    def to_sequential(self) -> nn.Sequential:
        """A native ``nn.Sequential`` of ``nn.Linear`` + activation modules with copies of this
        module's parameters (same dtype and device, same ``state_dict`` keys as ``layers``)."""
        native = nn.Sequential(*(_native_copy(m) for m in self.layers))
        native.load_state_dict(self.layers.state_dict())
        return native

    @classmethod
    def from_sequential(cls, seq: nn.Sequential) -> FusedMLP:
        """The ``FusedMLP`` computing what ``seq`` computes: ``Linear [act] Linear [act] ...
        Linear [act]`` with one hidden width, every hidden layer followed by the same registry
        activation (or none) and all biases present or all absent. Parameters are copied.

        Raises ``ValueError`` for anything else: an empty ``seq``, an ``nn.Linear`` subclass
        with a ``forward`` of its own (it may compute something else), a module whose
        ``forward`` was replaced on the instance or that has hooks of its own (the fused op
        would skip them)."""
        spec = _parse(seq)
        first = spec["linears"][0].weight
        mlp = cls(*spec["args"], device=first.device, dtype=first.dtype, **spec["kwargs"])
        mlp.layers.load_state_dict(seq.state_dict())
        return mlp

    def extra_repr(self) -> str:
        first, last = self.linears()[0], self.linears()[-1]
        text = f"in={first.in_features}, hidden={first.out_features}, out={last.out_features}"
        text += f", layers={len(self.linears())}, activation={self.activation!r}"
        if self.output_activation is not None:
            text += f", output_activation={self.output_activation!r}"
        return text


def _validate(in_f: int, hidden: int, out_f: int, num_hidden: int, *slopes: float | None,
              ) -> None:  # fmt: skip
    for name, value in (("in_features", in_f), ("hidden_features", hidden),
                        ("out_features", out_f)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"FusedMLP: {name} must be a positive int, got {value!r}")
    if not isinstance(num_hidden, int) or isinstance(num_hidden, bool) or num_hidden < 0:
        raise ValueError(f"FusedMLP: num_hidden_layers must be an int >= 0, got {num_hidden!r}")
    if num_hidden > 0 and hidden > MAX_WIDTH:
        raise ValueError(
            f"FusedMLP: hidden_features must be at most {MAX_WIDTH} (the fused kernels keep a "
            f"row tile of every layer in registers), got {hidden}"
        )
    for slope in slopes:
        if slope is not None and (not isinstance(slope, Real) or isinstance(slope, bool)):
            raise TypeError(f"FusedMLP: negative_slope must be a real number, got {slope!r}")


def _native_copy(module: nn.Module) -> nn.Module:
    """A fresh native module of the same kind: ``nn.Linear`` (even for a subclass) or the
    activation module as is."""
    if isinstance(module, nn.Linear):
        w = module.weight
        return nn.Linear(module.in_features, module.out_features, module.bias is not None,
                         device=w.device, dtype=w.dtype)  # fmt: skip
    found = activation_of_module(module)
    if found is None:
        raise TypeError(f"FusedMLP: unexpected module {type(module).__name__}")
    act, slope = found
    return act.native_module(slope)


def _own_forward_only(module: nn.Module) -> bool:
    """Whether calling ``module`` runs its class's ``forward`` alone: none put on the instance
    (as Hugging Face accelerate's hooks do), no hook of its own."""
    return "forward" not in module.__dict__ and not (
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks
    )  # fmt: skip


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` computing ``F.linear`` and nothing else: ``nn.Linear`` itself, a
    subclass keeping its ``forward`` (``NonDynamicallyQuantizableLinear``), or a
    ``manualbp.Linear`` without an activation."""
    if not isinstance(module, nn.Linear):
        return False
    forward = type(module).forward
    if forward is Linear.forward:
        return module.activation is None
    return forward is nn.Linear.forward


def _parse(seq: nn.Sequential) -> dict:
    """``FusedMLP`` arguments for ``seq`` (see :meth:`FusedMLP.from_sequential`)."""
    modules, layers, i = list(seq), [], 0
    if not modules:
        raise ValueError(
            "FusedMLP.from_sequential: the Sequential is empty; expected Linear [activation] "
            "... Linear [activation]"
        )
    for j, module in enumerate(modules):
        if not _own_forward_only(module):
            raise ValueError(
                f"FusedMLP.from_sequential: module {j} ({type(module).__name__}) does not run "
                "as written (a forward set on the instance, or hooks of its own); FusedMLP "
                "would skip them"
            )
    while i < len(modules):
        lin = modules[i]
        if not _plain_linear(lin):
            why = ": it has a forward of its own" if isinstance(lin, nn.Linear) else ""
            raise ValueError(
                f"FusedMLP.from_sequential: module {i} ({type(lin).__name__}) is not a plain "
                f"Linear{why}; expected nn.Linear (or a subclass that keeps its forward), then "
                "an optional registry activation"
            )
        found = activation_of_module(modules[i + 1]) if i + 1 < len(modules) else None
        act, slope = (found[0].name, found[1]) if found else (None, 0.01)
        layers.append((lin, act, slope))
        i += 2 if found else 1
    linears = [lin for lin, _, _ in layers]
    hidden = {(a, s if _takes_param(a) else 0.01) for _, a, s in layers[:-1]}
    widths = {lin.out_features for lin in linears[:-1]}
    if len(hidden) > 1 or len(widths) > 1 or len({lin.bias is None for lin in linears}) > 1:
        raise ValueError("FusedMLP.from_sequential: hidden layers must share one width, one "
                         "activation and the presence of a bias")  # fmt: skip
    hidden_slopes = {s for _, a, s in layers[:-1] if _takes_param(a)}
    hidden_act = layers[0][1] if len(layers) > 1 else None
    args = (linears[0].in_features, widths.pop() if widths else linears[0].out_features,
            linears[-1].out_features, len(linears) - 1, hidden_act, layers[-1][1],
            linears[0].bias is not None)  # fmt: skip
    return dict(linears=linears, args=args,
                kwargs=dict(negative_slope=hidden_slopes.pop() if hidden_slopes else None,
                            output_negative_slope=layers[-1][2] if _takes_param(layers[-1][1])
                            else None))  # fmt: skip


def _takes_param(name: str | None) -> bool:
    return name is not None and get_activation(name).slope_attr is not None
