"""``manualbp.LinearMSELoss``: an output Linear layer and its MSE loss fused into one op."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from manualbp import functional
from manualbp.errors import not_scriptable
from manualbp.ops._checks import check_reduction


class LinearMSELoss(nn.Module):
    r"""``loss = mse(x A^T + b, target)``: the last Linear layer and the MSE loss as one op.

    Holds ``weight`` and ``bias`` exactly as :class:`torch.nn.Linear` does (names, shapes,
    initial draw; ``state_dict`` loads both ways). ``loss = head(x, target)`` equals
    ``nn.MSELoss(reduction)(nn.Linear(...)(x), target)``, but the prediction is never stored
    (nor returned): how, and when that helps, is :func:`manualbp.functional.linear_mse_loss`.

    Args:
        in_features: size of each input sample.
        out_features: size of each prediction (and target) sample.
        bias: if ``False``, no additive bias. Default ``True``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        chunk_rows: rows per chunk (default: chosen from the shapes).

    Shape:
        - x: :math:`(*, H_{in})`; target: :math:`(*, H_{out})` (broadcastable).
        - Output: scalar, or :math:`(*, H_{out})` for ``reduction="none"``.

    Examples::

        >>> head = manualbp.LinearMSELoss(1024, 32768)
        >>> loss = head(torch.randn(64, 1024), torch.randn(64, 32768))
        >>> loss.backward()
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        reduction: str = "mean",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        chunk_rows: int | None = None,
    ) -> None:
        check_reduction(reduction)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.reduction, self.chunk_rows = reduction, chunk_rows
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialisation of ``nn.Linear`` (the same draw for the same seed)."""
        nn.Linear.reset_parameters(self)  # type: ignore[arg-type]

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.linear_mse_loss(
            input, self.weight, self.bias, target, self.reduction, chunk_rows=self.chunk_rows
        )

    def __prepare_scriptable__(self) -> nn.Module:
        raise not_scriptable(self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, reduction={self.reduction!r}"
        )
