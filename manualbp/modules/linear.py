"""``manualbp.Linear``: a drop-in ``nn.Linear`` with a fused activation, hand-written backward."""

from __future__ import annotations

from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from manualbp import functional
from manualbp.activations import get_activation, resolve_param
from manualbp.errors import not_scriptable


class Linear(nn.Linear):
    r"""Applies ``y = act(x A^T + b)``, with the activation fused into the layer.

    A subclass of :class:`torch.nn.Linear`: same parameters (``weight`` of shape
    ``(out_features, in_features)``, ``bias`` of shape ``(out_features,)``), the same
    initialisation draw for the same seed, and ``state_dict`` keys that load both ways
    with ``nn.Linear``. Forward and backward run through
    :class:`manualbp.LinearFunction`, whose backward is derived by hand::

        dZ = dY * act'(Z),  dX = dZ W,  dW = dZ^T X,  db = sum dZ

    ``torch.compile`` keeps that backward; ``torch.jit.trace`` and ``torch.export`` record
    the same math as native aten ops (trained by native autograd); ``torch.jit.script``
    refuses the module with an error saying so.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: if ``False``, the layer has no additive bias. Default: ``True``.
        activation: ``None`` (default), ``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"``,
            ``"tanh"``, ``"sigmoid"``, ``"leaky_relu"``, ``"softplus"`` or ``"sin"``, applied to
            ``x A^T + b``.
        negative_slope: the activation's parameter: ``"leaky_relu"``'s slope for negative
            inputs, ``"softplus"``'s ``beta``, ``"sin"``'s ``omega``. Default: the
            activation's (0.01, 1, 1).

    Shape:
        - Input: :math:`(*, H_{in})`, :math:`H_{in} = \text{in\_features}`.
        - Output: :math:`(*, H_{out})`, :math:`H_{out} = \text{out\_features}`.

    Examples::

        >>> m = manualbp.Linear(20, 30, activation="gelu")
        >>> m(torch.randn(128, 20)).size()
        torch.Size([128, 30])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        activation: str | None = None,
        negative_slope: float | None = None,
    ) -> None:
        # Validate before nn.Linear draws the initial weights, so a bad call changes nothing.
        get_activation(activation)
        if negative_slope is not None and (
            not isinstance(negative_slope, Real) or isinstance(negative_slope, bool)
        ):
            raise TypeError(
                f"negative_slope must be a real number, got {type(negative_slope).__name__}"
            )
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = resolve_param(activation, negative_slope)

    def forward(self, input: Tensor) -> Tensor:
        if self._backward_hooks and self._is_full_backward_hook is False:
            # A legacy (deprecated) register_backward_hook sees the grad_fn of the output and
            # its inputs' gradients: aten's node for nn.Linear. Give it that node, as natively.
            return _legacy_hooked_linear(self, input)
        return functional.linear(
            input, self.weight, self.bias, self.activation, negative_slope=self.negative_slope
        )

    def __prepare_scriptable__(self) -> nn.Module:
        raise not_scriptable(self)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.activation is not None:
            text += f", activation={self.activation!r}"
            if get_activation(self.activation).slope_attr is not None:
                text += f", negative_slope={self.negative_slope}"
        return text


def _legacy_hooked_linear(module: Linear, input: Tensor) -> Tensor:
    """``nn.Linear``'s own forward (and native autograd) plus the activation: what a legacy
    module backward hook is written against."""
    z = F.linear(input, module.weight, module.bias)
    act = get_activation(module.activation)
    return z if act is None else act.native_module(module.negative_slope)(z)
