"""BatchNorm folding, in one place.

An eval-mode BatchNorm is a per-channel affine map ``y -> scale * y + offset``
(:func:`batchnorm_affine`). When one sits between a layer and its activation, the recovery folds
it into the layer (:func:`fold_affine`), so the activation-aware objective sees the layer's own
output, and the BatchNorm is replaced by a :class:`FoldedBatchNorm`: the identity, whose state
dict holds one marker, ``<name>.folded``. The marker keeps the state-dict contract honest:
:func:`~torch_lowrank.load_state_dict` puts a ``FoldedBatchNorm`` in place of the live BatchNorm
of a freshly built model, and a plain ``load_state_dict`` into a model with live BatchNorms fails
(missing BatchNorm keys, an unexpected ``folded``) instead of applying the BatchNorm twice.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BATCHNORMS", "FoldedBatchNorm", "batchnorm_affine", "batchnorm_places", "fold_affine"]

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorm_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """An eval-mode BatchNorm as ``y = scale * x + offset`` per channel, in float64.

    Example:
        >>> bn = nn.BatchNorm1d(2).eval()
        >>> scale, offset = batchnorm_affine(bn)
        >>> x = torch.randn(4, 2)
        >>> torch.allclose(x.double() * scale + offset, bn(x).double(), atol=1e-6)
        True
    """
    var, mean = bn.running_var.detach().double(), bn.running_mean.detach().double()
    gamma = torch.ones_like(var) if bn.weight is None else bn.weight.detach().double()
    beta = torch.zeros_like(var) if bn.bias is None else bn.bias.detach().double()
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def fold_affine(
    weight: Tensor, bias: Tensor | None, scale: Tensor, offset: Tensor
) -> tuple[Tensor, Tensor]:
    """``(W, b)`` followed by the per-output affine map ``y -> scale * y + offset`` as one
    layer ``(scale W, scale b + offset)``, float64.

    Example:
        >>> w, s, o = torch.ones(2, 3), torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0])
        >>> folded_w, folded_b = fold_affine(w, None, s, o)
        >>> folded_w[:, 0].tolist(), folded_b.tolist()
        ([2.0, 3.0], [1.0, 0.0])
    """
    scale = scale.to(weight.device, torch.float64)
    offset = offset.to(weight.device, torch.float64)
    b = torch.zeros_like(scale) if bias is None else bias.detach().double()
    return weight.detach().double() * scale[:, None], b * scale + offset


class FoldedBatchNorm(nn.Module):
    """A BatchNorm folded into the layer before it: the identity (see the module docstring).

    Args:
        num_features: the channels of the BatchNorm it replaces.

    Example:
        >>> folded = FoldedBatchNorm(4)
        >>> x = torch.randn(2, 4)
        >>> torch.equal(folded(x), x), list(folded.state_dict())
        (True, ['folded'])
    """

    def __init__(self, num_features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_features = num_features
        self.register_buffer("folded", torch.ones((), dtype=torch.bool, device=device))

    @classmethod
    def like(cls, bn: nn.Module) -> FoldedBatchNorm:
        """The stand-in for ``bn`` (same channels, device and train/eval mode)."""
        folded = cls(bn.num_features, device=bn.running_mean.device)
        return folded.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return str(self.num_features)


def batchnorm_places(
    model: nn.Module, folded: tuple, names: dict[nn.Module, list[str]]
) -> list[tuple[nn.Module, str]]:
    """Where the BatchNorm recorded to be folded (``folded``: ``()`` or ``(bn,)``) sits in
    ``model``, as ``(parent, attribute)`` at every name it has (``names``: every module's
    names); empty when there is none or it is no longer in the model.

    Example:
        >>> bn = nn.BatchNorm1d(4)
        >>> model = nn.Sequential(nn.Linear(4, 4), bn)
        >>> [attr for _, attr in batchnorm_places(model, (bn,), {bn: ["1"]})]
        ['1']
    """
    if not folded or folded[0] not in names:
        return []
    places = []
    for name in names[folded[0]]:
        parent_name, _, attr = name.rpartition(".")
        places.append((model.get_submodule(parent_name), attr))
    return places
