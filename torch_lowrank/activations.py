"""What follows a layer: the elementwise activations the library knows (one table), and an
eval BatchNorm between the two, folded into the layer in one place.

An :class:`Activation` is a name (for reports), the function itself and a bound on its slope (for
the step size of :func:`torch_lowrank.projected.activation_aware`). :data:`ACTIVATIONS` holds the
known ones by name; :func:`resolve_activation` turns a name or an activation module
(``nn.ReLU()``, ...) into one. Which activation follows each layer of a model is observed by
:mod:`torch_lowrank.detect`.

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

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "BATCHNORMS",
    "Activation",
    "FoldedBatchNorm",
    "batchnorm_affine",
    "fold_affine",
    "folded_scale",
    "layer_weights",
    "leaky",
    "max_slope",
    "module_activation",
    "resolve_activation",
]


@dataclass(frozen=True)
class Activation:
    """An elementwise activation: a name for reports, the function itself and ``max |act'|``.

    ``max_slope`` scales the projected-gradient step; in :data:`ACTIVATIONS` it is
    :func:`max_slope` of the function (exactly 1 for the ReLU family and tanh).

    Example:
        >>> ACTIVATIONS["relu"].fn(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """

    name: str
    fn: Callable[[Tensor], Tensor] = field(compare=False)
    max_slope: float = 1.0


def max_slope(function: Callable[[Tensor], Tensor]) -> float:
    """``max |function'|`` on ``[-8, 8]`` (1.13 for GELU, 1.10 for SiLU, 0.25 for the sigmoid).

    Example:
        >>> round(max_slope(torch.sigmoid), 6)
        0.25
    """
    with torch.inference_mode(False), torch.enable_grad():  # the table is built at import
        grid = torch.linspace(-8.0, 8.0, 3201, dtype=torch.float64, requires_grad=True)
        (slope,) = torch.autograd.grad(function(grid).sum(), grid)
    return float(slope.abs().max())


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def leaky(slope: float) -> Activation:
    """The leaky ReLU of negative slope ``slope`` (the table's ``"leaky_relu"`` for 0.01).

    Example:
        >>> leaky(0.2).name, leaky(0.01) is ACTIVATIONS["leaky_relu"]
        ('leaky_relu(0.2)', True)
    """
    if slope == 0.01:
        return ACTIVATIONS["leaky_relu"]
    return Activation(
        f"leaky_relu({slope:g})",
        functools.partial(F.leaky_relu, negative_slope=slope),
        max(1.0, abs(slope)),
    )


#: The activations the library knows, by name.
ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation("relu", F.relu),
    "relu6": Activation("relu6", F.relu6),
    "leaky_relu": Activation("leaky_relu", F.leaky_relu),
    "gelu": Activation("gelu", F.gelu, max_slope(F.gelu)),
    "gelu_tanh": Activation("gelu_tanh", _gelu_tanh, max_slope(_gelu_tanh)),
    "silu": Activation("silu", F.silu, max_slope(F.silu)),
    "tanh": Activation("tanh", torch.tanh),
    "sigmoid": Activation("sigmoid", torch.sigmoid, max_slope(torch.sigmoid)),
}


def resolve_activation(
    spec: str | Activation | nn.Module | None, name: str = "activation"
) -> Activation | None:
    """An :class:`Activation` from a name, an activation module (``nn.ReLU()``, ...) or ``None``.

    Example:
        >>> resolve_activation(nn.LeakyReLU(0.2)).name
        'leaky_relu(0.2)'
    """
    if spec is None or isinstance(spec, Activation):
        return spec
    if isinstance(spec, str):
        if spec not in ACTIVATIONS:
            raise ValueError(
                f"{name}: unknown activation {spec!r}\nexpected one of {', '.join(ACTIVATIONS)}"
            )
        return ACTIVATIONS[spec]
    found = module_activation(spec)
    if found is None:
        raise TypeError(f"{name}: not an elementwise activation\nbut got {spec!r}")
    return found


def module_activation(module: nn.Module) -> Activation | None:
    """The :class:`Activation` an activation module applies; ``None`` for any other module.

    Example:
        >>> module_activation(nn.GELU(approximate="tanh")).name, module_activation(nn.Linear(2, 2))
        ('gelu_tanh', None)
    """
    if isinstance(module, nn.ReLU):
        return ACTIVATIONS["relu"]
    if isinstance(module, nn.ReLU6):
        return ACTIVATIONS["relu6"]
    if isinstance(module, nn.LeakyReLU):
        return leaky(module.negative_slope)
    if isinstance(module, nn.GELU):
        return ACTIVATIONS["gelu_tanh" if module.approximate == "tanh" else "gelu"]
    if isinstance(module, nn.SiLU):
        return ACTIVATIONS["silu"]
    if isinstance(module, nn.Tanh):
        return ACTIVATIONS["tanh"]
    if isinstance(module, nn.Sigmoid):
        return ACTIVATIONS["sigmoid"]
    return None


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


def layer_weights(module: nn.Module, fold: bool = False) -> list[tuple[Tensor, Tensor | None]]:
    """A calibrating low-rank module's ``(W, b)`` per group; with ``fold``, the eval BatchNorm
    recorded after it folded in (float64).

    Example:
        >>> import torch_lowrank as tl
        >>> layer = tl.LowRankLinear.from_linear(nn.Linear(4, 3), rank=1)
        >>> [tuple(w.shape) for w, b in layer_weights(layer)]
        [(3, 4)]
    """
    matrices = module.matrices()
    if not (fold and module.folded_batchnorm):
        return matrices
    scale, offset = batchnorm_affine(module.folded_batchnorm[0])
    m = module.matrix_shape[0]
    return [
        fold_affine(w, b, scale[j * m : (j + 1) * m], offset[j * m : (j + 1) * m])
        for j, (w, b) in enumerate(matrices)
    ]


def folded_scale(module: nn.Module, group: int = 0) -> Tensor:
    """The scale ``s`` of the BatchNorm folded into a low-rank module, on one group's outputs
    (float64): the folded weight's products are ``s * (W x)``.

    Example:
        >>> import torch_lowrank as tl
        >>> model = tl.convert(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3).eval()), rank=1)
        >>> model[0].folded_batchnorm = (model[1],)
        >>> folded_scale(model[0]).shape
        torch.Size([3])
    """
    m = module.matrix_shape[0]
    scale, _ = batchnorm_affine(module.folded_batchnorm[0])
    return scale[group * m : (group + 1) * m].to(torch.float64)


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
