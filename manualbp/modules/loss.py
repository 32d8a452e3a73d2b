"""``manualbp.MSELoss``: a drop-in ``nn.MSELoss`` with a hand-written backward."""

from __future__ import annotations

from torch import Tensor, nn

from manualbp import functional
from manualbp.errors import not_scriptable


class MSELoss(nn.MSELoss):
    r"""Mean squared error between each element of the input :math:`x` and target :math:`y`.

    A subclass of :class:`torch.nn.MSELoss` with its constructor, legacy
    ``size_average``/``reduce`` handling (and warnings) and semantics:

    .. math::
        \ell_n = (x_n - y_n)^2, \qquad
        \ell(x, y) = \operatorname{mean}(\ell) \text{ or } \operatorname{sum}(\ell)
        \text{ or the vector } \ell

    for ``reduction`` = ``"mean"`` (default), ``"sum"``, ``"none"``. The backward is
    written by hand: ``dL/dx = g * 2 (x - y) / N`` (mean) and ``dL/dy = -dL/dx``.

    Shape:
        - Input: :math:`(*)`, any number of dimensions.
        - Target: :math:`(*)`, broadcastable to the input (with a warning when sizes differ).
        - Output: scalar, or the broadcast shape for ``reduction="none"``.

    Examples::

        >>> loss = manualbp.MSELoss()
        >>> x = torch.randn(3, 5, requires_grad=True)
        >>> loss(x, torch.randn(3, 5)).backward()
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.mse_loss(input, target, reduction=self.reduction)

    def __prepare_scriptable__(self) -> nn.Module:
        raise not_scriptable(self)
