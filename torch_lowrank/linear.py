"""``LowRankLinear``: the low-rank drop-in replacement for ``nn.Linear``.

State dict of a recovered ``LowRankLinear`` (the on-disk contract; the rank is the first dimension
of ``down.weight``)::

    down.weight  (r, in_features)
    up.weight    (out_features, r)
    up.bias      (out_features,)        only when the layer has a bias
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from . import solvers
from .base import LowRankModule
from .ranks import target_rank

__all__ = ["LowRankLinear", "new_parameter"]


def new_parameter(value: Tensor, like: Tensor, device: torch.device | None = None) -> nn.Parameter:
    """``value`` as a parameter with the dtype, device and ``requires_grad`` of ``like``
    (on ``device`` instead, when given).

    Example:
        >>> like = nn.Parameter(torch.zeros(2, dtype=torch.float16), requires_grad=False)
        >>> p = new_parameter(torch.ones(2, dtype=torch.float64), like)
        >>> p.dtype, p.requires_grad
        (torch.float16, False)
    """
    return nn.Parameter(
        value.detach().to(device=device or like.device, dtype=like.dtype).contiguous(),
        requires_grad=like.requires_grad,
    )


class LowRankLinear(LowRankModule):
    r"""A low-rank drop-in replacement for :class:`torch.nn.Linear`: ``y = up(down(x))``.

    Build it from a trained layer with :meth:`from_linear` (calibrating phase), run calibration
    batches through the model, then call :meth:`recover_`. The constructor builds a recovered
    module with freshly initialised factors, e.g. to load a saved ``state_dict`` into.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        rank: inner dimension ``r`` of the factors, ``1 <= r <= min(in, out)``.
        bias: whether ``up`` has a bias.

    Shape:
        - Input: :math:`(*, H_{in})`. Output: :math:`(*, H_{out})`, same dtype and device.

    Attributes:
        down (nn.Linear): ``in_features -> rank``, no bias.
        up (nn.Linear): ``rank -> out_features``, with the bias.

    Example:
        >>> dense = nn.Linear(64, 32)
        >>> layer = LowRankLinear.from_linear(dense, ratio=0.5)
        >>> _ = layer(torch.randn(256, 64))  # calibration: output is exactly dense's
        >>> _ = layer.recover_("linear")
        >>> layer
        LowRankLinear(
          in_features=64, out_features=32, rank=10, bias=True
          (down): Linear(in_features=64, out_features=10, bias=False)
          (up): Linear(in_features=10, out_features=32, bias=True)
        )
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        target_rank((out_features, in_features), rank, None, None, type(self).__name__)
        self.in_features = in_features
        self.out_features = out_features
        self._start_recovered(rank, bias)
        self.down = nn.Linear(in_features, rank, bias=False, **factory_kwargs)
        self.up = nn.Linear(rank, out_features, bias=bias, **factory_kwargs)

    _dense_type = nn.Linear

    def reset_parameters(self) -> None:
        """Re-initialise the factors as :class:`torch.nn.Linear` initialises its weights."""
        self.down.reset_parameters()
        self.up.reset_parameters()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int | None = None,
        ratio: float | None = None,
        energy: float | None = None,
        add_bias: bool = True,
        name: str | None = None,
        samples: int = 4096,
        activation: str | nn.Module | None = None,
    ) -> LowRankLinear:
        """Wrap a trained ``nn.Linear`` in a calibrating ``LowRankLinear``.

        Args:
            linear: the layer; it is kept (not copied) as ``dense`` until recovery.
            rank / ratio / energy: exactly one. ``ratio`` is the fraction of the weight's
                parameters kept; ``energy`` the fraction of output variance kept, rank chosen at
                recovery.
            add_bias: give a bias-free layer a bias so the recovery can correct for the input
                mean (the optimum); ``False`` keeps it bias-free and solves without intercept.
            name: the layer's name in error messages and reports.
            samples: how many input rows to keep in a uniform random reservoir for the
                activation-aware methods (0: none).
            activation: the elementwise activation that follows the layer (a name such as
                ``"relu"`` / ``"gelu"``, or a module such as ``nn.ReLU()``); ``None``: linear.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``, or ``rank`` is not an int.
            ValueError: a bad rank / ratio / energy, naming the layer and the value.

        Example:
            >>> layer = LowRankLinear.from_linear(nn.Linear(20, 10), rank=4)
            >>> layer.calibrating, layer.rank
            (True, 4)
        """
        return cls.from_dense(
            linear,
            rank=rank,
            ratio=ratio,
            energy=energy,
            add_bias=add_bias,
            name=name,
            samples=samples,
            activation=activation,
        )

    @classmethod
    def _shell(cls, linear: nn.Linear) -> LowRankLinear:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        return module

    @classmethod
    def matrix_shape_of(cls, linear: nn.Linear) -> tuple[int, int]:
        """The weight of ``linear`` as a matrix: ``(out_features, in_features)``."""
        return linear.out_features, linear.in_features

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def _shape_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def check_input(self, x: Tensor) -> None:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"{self.layer_name}: expected input with last dimension {self.in_features}\n"
                f"but got shape {tuple(x.shape)}"
            )

    def input_rows(self, x: Tensor) -> Iterable[Tensor]:
        self.check_input(x)
        return (x.reshape(-1, self.in_features),)  # (N, in): every token is a sample

    def paired_rows(
        self, x: Tensor, x_tilde: Tensor, positions: int | None = None
    ) -> Iterable[tuple[Tensor, Tensor]]:
        """The rows of two inputs of one shape (what the original and the compressed network
        feed the layer), pair by pair: every token (``positions`` samples a conv's patch
        positions; a Linear keeps all of its rows).

        Example:
            >>> layer = LowRankLinear.from_linear(nn.Linear(4, 2), rank=1)
            >>> [(tuple(a.shape), tuple(b.shape)) for a, b in layer.paired_rows(
            ...     torch.randn(3, 5, 4), torch.randn(3, 5, 4), positions=2)]
            [((15, 4), (15, 4))]
        """
        return zip(self.input_rows(x), self.input_rows(x_tilde))

    def matrices(self) -> list[tuple[Tensor, Tensor | None]]:
        return [(self.dense.weight, self.dense.bias)]

    @torch.no_grad()
    def factor_layers(self, factors: list[solvers.Factors]) -> tuple[nn.Module, nn.Module]:
        (f,) = factors
        like = self.dense.weight
        down = nn.Linear(self.in_features, f.rank, bias=False, device="meta")
        up = nn.Linear(f.rank, self.out_features, bias=f.bias is not None, device="meta")
        down.weight = new_parameter(f.down, like, self.factor_device)
        up.weight = new_parameter(f.up, like, self.factor_device)
        if f.bias is not None:
            up.bias = new_parameter(
                f.bias, like if self.dense.bias is None else self.dense.bias, self.factor_device
            )
        return down, up

    @property
    def weight(self) -> Tensor:
        """The dense weight ``(out, in)``: the original while calibrating, else ``up @ down``
        (computed on every read)."""
        if self.calibrating:
            return self.dense.weight
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> Tensor | None:
        """The bias ``(out,)`` or ``None``."""
        return self.dense.bias if self.calibrating else self.up.bias

    def to_linear(self) -> nn.Linear:
        """The equivalent dense :class:`torch.nn.Linear`.

        While calibrating this is the original layer itself (same object, same parameters); once
        recovered, a new layer holding ``up @ down`` on the same device and dtype.

        Example:
            >>> layer = LowRankLinear(8, 6, rank=2)
            >>> x = torch.randn(3, 8)
            >>> torch.allclose(layer.to_linear()(x), layer(x), atol=1e-6)
            True
        """
        if self.calibrating:
            return self.dense
        w = self.up.weight
        dense = nn.Linear(
            self.in_features, self.out_features, bias=self.up.bias is not None, device="meta"
        )
        with torch.no_grad():
            dense.weight = new_parameter(w @ self.down.weight, w)
            if self.up.bias is not None:
                dense.bias = new_parameter(self.up.bias, self.up.bias)
        return dense

    to_dense = to_linear
