"""Drop-in low-rank layers with two phases (DESIGN section 3).

1. *calibrating* (built by ``from_linear``): the module holds the original dense layer as
   ``dense``, forward is exactly that layer, and a forward pre-hook (a ``RemovableHandle``)
   feeds every input row to a :class:`~torch_lowrank.stats.CovarianceStats`.
2. *recovered* (after ``recover_()``): the module holds two factor layers, ``down`` (``n -> r``)
   and ``up`` (``r -> m``, with the bias); the dense layer, the statistics and the hook are gone.

State dict of a recovered ``LowRankLinear`` (the on-disk contract; the rank is the first dimension
of ``down.weight``)::

    down.weight  (r, in_features)
    up.weight    (out_features, r)
    up.bias      (out_features,)        only when the layer has a bias
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from . import solvers
from .report import LayerReport
from .stats import CovarianceStats

__all__ = ["LowRankLinear", "METHODS"]

#: Recovery methods a module accepts.
METHODS = ("linear", "svd")


def _observe(module: _LowRankBase, args: tuple) -> None:
    """Forward pre-hook of a calibrating module: accumulate the statistics of its input."""
    module._accumulate(args[0])


def target_rank(
    shape: tuple[int, int],
    rank: int | None,
    ratio: float | None,
    energy: float | None,
    name: str,
) -> int | None:
    """Validate the rank specification of a layer whose weight matrix is ``shape = (m, n)`` and
    return its rank (``None`` with ``energy``: the rank is chosen at recovery).

    ``ratio`` is the fraction of the weight parameters kept: ``rank = floor(ratio m n / (m + n))``.
    """
    m, n = shape
    given = [k for k, v in (("rank", rank), ("ratio", ratio), ("energy", energy)) if v is not None]
    if len(given) != 1:
        raise ValueError(
            f"{name}: give exactly one of rank, ratio or energy\n"
            f"but got {', '.join(given) if given else 'none'}"
        )
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"{name}: rank must be an int\nbut got {rank!r}")
        if not 1 <= rank <= min(m, n):
            raise ValueError(
                f"{name}: rank must be in [1, {min(m, n)}] for a {m} x {n} weight\nbut got {rank}"
            )
        return rank
    value, label = (ratio, "ratio") if ratio is not None else (energy, "energy")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}: {label} must be a number in (0, 1]\nbut got {value!r}")
    if energy is not None:
        return None
    r = math.floor(ratio * m * n / (m + n))
    if r < 1:
        raise ValueError(
            f"{name}: ratio={ratio} leaves no rank for a {m} x {n} weight\n"
            f"(rank 1 keeps {(m + n) / (m * n):.3f} of its parameters)"
        )
    return min(r, m, n)


class _LowRankBase(nn.Module):
    """Phases, statistics and recovery shared by the low-rank modules.

    A subclass says how inputs become sample rows (:meth:`_rows`), what its weight matrix is
    (:meth:`_matrix`), how it builds its two factor layers (:meth:`_factor_layers`) and how it
    goes back to a dense layer (:meth:`to_dense`).
    """

    calibrating: bool

    def _start_calibration(
        self,
        dense: nn.Module,
        rank: int | None,
        energy: float | None,
        add_bias: bool,
        name: str | None,
    ) -> None:
        for child in ("down", "up"):
            if hasattr(self, child):
                delattr(self, child)
        self.dense = dense
        self.calibrating = True
        self.target_rank = rank
        self.energy = energy
        self.add_bias = add_bias
        self.layer_name = name or type(self).__name__
        self.stats: CovarianceStats | None = None
        self._calibration_hook = self.register_forward_pre_hook(_observe)

    # -- subclass interface ------------------------------------------------------------------
    def _rows(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _matrix(self) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    @torch.no_grad()
    def _factor_layers(self, down: Tensor, up: Tensor, bias: Tensor | None) -> tuple:
        """Build ``(down_layer, up_layer)`` from float64 factors, in the dense layer's dtype."""
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        raise NotImplementedError

    # -- calibration --------------------------------------------------------------------------
    @torch.no_grad()
    def _accumulate(self, x: Tensor) -> None:
        rows = self._rows(x)
        if self.stats is None:
            self.stats = CovarianceStats(rows.shape[1])
        self.stats.update(rows)

    @property
    def samples_seen(self) -> int:
        """How many sample rows the statistics hold (0 once recovered)."""
        return 0 if self.stats is None else self.stats.count

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The weight as a matrix, ``(m, n)`` = (outputs, inputs per sample row)."""
        raise NotImplementedError

    @property
    def rank(self) -> int | None:
        """The rank of the factors, or while calibrating the target rank (``None`` with energy)."""
        return self.target_rank if self.calibrating else self.down.weight.shape[0]

    def _dense_params(self) -> int:
        return sum(p.numel() for p in self.dense.parameters())

    def _params_for(self, factors: solvers.Factors) -> int:
        m, n = self.matrix_shape
        return factors.rank * (m + n) + (0 if factors.bias is None else m)

    # -- recovery -----------------------------------------------------------------------------
    def _solve(self, method: str) -> solvers.Factors:
        """Solve for the factors without changing the module."""
        name = self.layer_name
        if not self.calibrating:
            raise RuntimeError(f"{name}: already recovered; recover_() runs once per module")
        if method not in METHODS:
            raise ValueError(
                f"{name}: method must be one of {', '.join(METHODS)}\nbut got {method!r}"
            )
        weight, bias = self._matrix()
        stats = self.stats
        if stats is not None and stats.count > 0 and not stats.is_finite():
            raise ValueError(
                f"{name}: the calibration inputs contained NaN or Inf\n"
                f"({stats.count} rows seen); the layer was left unchanged"
            )
        if method == "svd":
            moments = {} if stats is None else {"mean": stats.mean, "cov": stats.covariance}
            return solvers.svd(weight, bias, self.target_rank, self.energy, **moments)
        if stats is None or stats.count == 0:
            raise ValueError(
                f"{name}: saw no calibration data; run forward passes over calibration batches\n"
                f"before recover_(method={method!r})"
            )
        return solvers.linear(
            weight,
            bias,
            stats.mean,
            stats.covariance,
            self.target_rank,
            self.energy,
            add_bias=self.add_bias,
        )

    def _install(self, rank: int, layers: tuple) -> None:
        """Enter the recovered phase with prepared factor layers ``(down, up)``."""
        self._calibration_hook.remove()
        del self.dense
        self.stats = None
        self.calibrating = False
        self.target_rank = rank
        self.down, self.up = layers

    def _report_row(self, factors: solvers.Factors, method: str, seconds: float) -> LayerReport:
        return LayerReport(
            name=self.layer_name,
            shape=tuple(self._dense_weight_shape()),
            rank=factors.rank,
            params_before=self._dense_params(),
            params_after=self._params_for(factors),
            relative_error=factors.relative_error,
            method=method,
            seconds=seconds,
        )

    def _dense_weight_shape(self) -> torch.Size:
        return self.dense.weight.shape

    def recover_(self, method: str = "linear") -> LayerReport:
        """Solve for the low-rank factors from the accumulated statistics, in place.

        Args:
            method: ``"linear"`` (the exact data-driven optimum) or ``"svd"`` (truncated SVD of
                the weight, needs no data).

        Returns:
            the :class:`~torch_lowrank.report.LayerReport` of this layer.

        Raises:
            ValueError: no calibration data was seen (data-driven methods), the data held NaN/Inf,
                or ``method`` is unknown. The module is then left unchanged, still calibrating.
            RuntimeError: the module is already recovered.

        Example:
            >>> layer = LowRankLinear.from_linear(nn.Linear(16, 8), rank=2)
            >>> _ = layer(torch.randn(64, 16))
            >>> row = layer.recover_("linear")
            >>> layer.rank, layer.calibrating
            (2, False)
        """
        start = time.perf_counter()
        factors = self._solve(method)
        layers = self._factor_layers(factors.down, factors.up, factors.bias)
        row = self._report_row(factors, method, time.perf_counter() - start)
        self._install(factors.rank, layers)
        return row

    def _new_parameter(self, value: Tensor, like: Tensor) -> nn.Parameter:
        return nn.Parameter(
            value.to(device=like.device, dtype=like.dtype).contiguous(),
            requires_grad=like.requires_grad,
        )


class LowRankLinear(_LowRankBase):
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
        self.calibrating = False
        self.target_rank = rank
        self.energy = None
        self.add_bias = bias
        self.layer_name = type(self).__name__
        self.stats = None
        self.down = nn.Linear(in_features, rank, bias=False, **factory_kwargs)
        self.up = nn.Linear(rank, out_features, bias=bias, **factory_kwargs)

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

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``, or ``rank`` is not an int.
            ValueError: a bad rank / ratio / energy, naming the layer and the value.

        Example:
            >>> layer = LowRankLinear.from_linear(nn.Linear(20, 10), rank=4)
            >>> layer.calibrating, layer.rank
            (True, 4)
        """
        label = name or cls.__name__
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"{label}: from_linear expects an nn.Linear\nbut got {type(linear).__name__}"
            )
        shape = (linear.out_features, linear.in_features)
        resolved = target_rank(shape, rank, ratio, energy, label)
        module = cls(linear.in_features, linear.out_features, resolved or 1, device="meta")
        module._start_calibration(linear, resolved, energy, add_bias, name)
        return module

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            return self.dense(x)
        return self.up(self.down(x))

    def _rows(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.layer_name}: expected input with last dimension {self.in_features}\n"
                f"but got shape {tuple(x.shape)}"
            )
        return x.reshape(-1, self.in_features)

    def _matrix(self) -> tuple[Tensor, Tensor | None]:
        return self.dense.weight, self.dense.bias

    @torch.no_grad()
    def _factor_layers(self, down: Tensor, up: Tensor, bias: Tensor | None) -> tuple:
        like = self.dense.weight
        r = down.shape[0]
        down_layer = nn.Linear(self.in_features, r, bias=False, device="meta")
        up_layer = nn.Linear(r, self.out_features, bias=bias is not None, device="meta")
        down_layer.weight = self._new_parameter(down, like)
        up_layer.weight = self._new_parameter(up, like)
        if bias is not None:
            bias_like = self.dense.bias if self.dense.bias is not None else like
            up_layer.bias = self._new_parameter(bias, bias_like)
        return down_layer, up_layer

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
            dense.weight = self._new_parameter(w @ self.down.weight, w)
            if self.up.bias is not None:
                dense.bias = self._new_parameter(self.up.bias, self.up.bias)
        return dense

    to_dense = to_linear

    def extra_repr(self) -> str:
        phase = ", calibrating" if self.calibrating else ""
        has_bias = self.bias is not None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={has_bias}{phase}"
        )
