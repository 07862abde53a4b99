"""What every low-rank module shares: the two phases, the statistics, the recovery.

1. *calibrating* (built by ``from_linear`` / ``from_conv2d`` / ...): the module holds the original
   dense layer as ``dense``, forward is exactly that layer, and a forward pre-hook (a
   ``RemovableHandle``) sees every input. Statistics go to a
   :class:`~torch_lowrank.stats.CovarianceStats` per group, kept in the narrower of two spaces
   (:attr:`_LowRankBase.stats_space`): the input sample rows ``x`` (``n`` wide) when the layer
   widens or keeps its width, the products ``W x + b`` the dense layer computes anyway (``m``
   wide) when it narrows. The solution needs only ``W C W^T`` and ``W mu`` (DESIGN section 2),
   and the narrower space costs ``N min(m, n)^2`` per batch, never more than the layer's own
   ``N m n``. The reservoir of the activation-aware methods always holds input rows.
2. *recovered* (after ``recover_()``): the module holds two factor layers, ``down`` (inputs to
   ``r``) and ``up`` (``r`` to outputs, with the bias); the dense layer, the statistics and the
   hook are gone.

A subclass says how inputs become sample rows (:meth:`_row_chunks`), what its weight matrices
are (:meth:`_matrices`), how it builds its two factor layers (:meth:`_factor_layers`) and how it
goes back to a dense layer (:meth:`to_dense`). Statistics and solvers are shared, not copied.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import solvers
from ._grad import no_grad
from .activations import Activation, batchnorm_affine, resolve_activation
from .cross import CrossStats
from .detect import paused
from .report import LayerReport
from .reservoir import Reservoir
from .solve import METHODS, solve_layer
from .stats import CovarianceStats

__all__ = ["METHODS", "target_rank"]


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

    Example:
        >>> target_rank((64, 32), None, 0.5, None, "fc")
        10
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


def new_parameter(value: Tensor, like: Tensor, device: torch.device | None = None) -> nn.Parameter:
    """``value`` as a parameter with the dtype, device and ``requires_grad`` of ``like``
    (on ``device`` instead, when given)."""
    return nn.Parameter(
        value.detach().to(device=device or like.device, dtype=like.dtype).contiguous(),
        requires_grad=like.requires_grad,
    )


class _LowRankBase(nn.Module):
    """Phases, statistics and recovery shared by the low-rank modules (see the module doc)."""

    calibrating: bool
    #: Independent blocks of the weight (a grouped conv's groups); each gets its own factors.
    groups: int = 1
    #: The dense layer type this module replaces.
    _dense_type: type

    @classmethod
    def from_dense(
        cls,
        dense: nn.Module,
        *,
        rank: int | None = None,
        ratio: float | None = None,
        energy: float | None = None,
        add_bias: bool = True,
        name: str | None = None,
        samples: int = 4096,
        activation: str | nn.Module | None = None,
    ):
        """Wrap a trained dense layer in a calibrating low-rank module (the subclasses'
        ``from_linear`` / ``from_conv2d`` / ``from_conv1d`` document the arguments)."""
        label = name or cls.__name__
        if not isinstance(dense, cls._dense_type):
            raise TypeError(
                f"{label}: expected an nn.{cls._dense_type.__name__}\n"
                f"but got {type(dense).__name__}"
            )
        resolved = target_rank(cls.matrix_shape_of(dense), rank, ratio, energy, label)
        module = cls._empty_like(dense, resolved or 1)
        module._start_calibration(dense, resolved, energy, add_bias, name, samples, activation)
        return module

    @classmethod
    def matrix_shape_of(cls, dense: nn.Module) -> tuple[int, int]:
        """One group's weight of ``dense`` as a matrix ``(m, n)``."""
        raise NotImplementedError

    @classmethod
    def _empty_like(cls, dense: nn.Module, rank: int):
        """A module with the geometry of ``dense`` and factors of ``rank`` on the meta device."""
        raise NotImplementedError

    def _start_calibration(
        self,
        dense: nn.Module,
        rank: int | None,
        energy: float | None,
        add_bias: bool,
        name: str | None,
        samples: int = 4096,
        activation: str | Activation | nn.Module | None = None,
    ) -> None:
        label = name or type(self).__name__
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise ValueError(f"{label}: samples must be an int >= 0\nbut got {samples!r}")
        for child in ("down", "up"):
            if hasattr(self, child):
                delattr(self, child)
        self.dense = dense
        self.calibrating = True
        self.target_rank = rank
        self.energy = energy
        self.add_bias = add_bias
        self.layer_name = label
        self.stats: list[CovarianceStats] | None = None
        self.samples = samples
        self.reservoirs: list[Reservoir] | None = None
        self.activation_source = "auto" if activation == "auto" else "given"
        self.activation = None if activation == "auto" else resolve_activation(activation, label)
        self.folded_batchnorm: tuple = ()  # (bn,) when an eval BatchNorm follows (not a child)
        self.accumulating = True  # corrective recovery pauses the first-pass statistics
        self.inputs_seen = 0  # calibration inputs (tokens of a Linear, images of a conv)
        self.staged: tuple | None = None  # (down, up) solved during a corrective run
        self.run_staged = False  # forward through ``staged`` instead of ``dense``
        self.offload: torch.device | None = None  # host copies of dense weight and statistics
        self.home: torch.device | None = None  # where the inputs arrive (and factors go)
        m, n = self.matrix_shape
        self._stats_space = "output" if m < n else "input"
        self._calibration_hook = self.register_forward_pre_hook(_observe)

    def _start_recovered(self, rank: int, add_bias: bool) -> None:
        self.staged, self.run_staged = None, False
        self.activation = None
        self.activation_source = "given"
        self.folded_batchnorm = ()
        self.calibrating = False
        self.target_rank = rank
        self.energy = None
        self.add_bias = add_bias
        self.layer_name = type(self).__name__
        self.stats = None

    # -- subclass interface ------------------------------------------------------------------
    def _inputs_in(self, x: Tensor) -> int:
        """How many inputs ``x`` holds (a Linear's tokens; a conv overrides: its images)."""
        return x.numel() // max(x.shape[-1], 1)

    def _row_chunks(self, x: Tensor) -> Iterable[Tensor]:
        """The sample rows of input ``x``, ``(N, groups * n)``, in memory-bounded chunks."""
        raise NotImplementedError

    def _matrices(self) -> list[tuple[Tensor, Tensor | None]]:
        """Per group, the dense weight as an ``(m, n)`` matrix and its bias ``(m,)``."""
        raise NotImplementedError

    def _factor_layers(self, factors: list[solvers.Factors]) -> tuple[nn.Module, nn.Module]:
        """Build ``(down, up)`` from per-group float64 factors, in the dense layer's dtype."""
        raise NotImplementedError

    @property
    def factor_device(self) -> torch.device | None:
        """Where the factors go when not beside the dense weight: the device the inputs
        arrived on, for a layer whose dense weight is offloaded to host memory."""
        return self.home if self.offload is not None else None

    def to_dense(self) -> nn.Module:
        """The equivalent dense layer."""
        raise NotImplementedError

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """One group's weight as a matrix: ``(m, n)`` = (outputs, inputs per sample row)."""
        raise NotImplementedError

    # -- calibration --------------------------------------------------------------------------
    @property
    def stats_space(self) -> str:
        """Where the statistics are kept: ``"input"`` (the covariance of the ``n``-wide input
        rows) or ``"output"`` (that of the ``m``-wide products ``W x + b``).

        The default is the narrower space: ``"output"`` when ``m < n``. Both give the same
        ``linear`` solution; set ``"input"`` before the first calibration batch to keep the
        input covariance itself (e.g. to inspect it, or for a method that needs it).

        Example:
            >>> from torch_lowrank import LowRankLinear
            >>> layer = LowRankLinear.from_linear(nn.Linear(64, 8), rank=2)
            >>> layer.stats_space
            'output'
            >>> layer.stats_space = "input"
            >>> _ = layer(torch.randn(32, 64))
            >>> tuple(layer.stats[0].covariance.shape)
            (64, 64)
        """
        return self._stats_space

    @stats_space.setter
    def stats_space(self, space: str) -> None:
        if space not in ("input", "output"):
            raise ValueError(
                f"{self.layer_name}: stats_space must be 'input' or 'output'\nbut got {space!r}"
            )
        if self.samples_seen and space != self._stats_space:
            raise RuntimeError(
                f"{self.layer_name}: the statistics already hold {self.samples_seen} rows in the "
                f"{self._stats_space} space;\nset stats_space before the first calibration batch"
            )
        self._stats_space = space

    @property
    def stats_features(self) -> int:
        """The width of each group's statistics: ``n`` in the input space, ``m`` in the output
        space."""
        m, n = self.matrix_shape
        return m if self._stats_space == "output" else n

    def forward(self, x: Tensor) -> Tensor:
        if not self.calibrating:
            return self.up(self.down(x))
        if self.run_staged:
            down, up = self.staged
            return up(down(x))
        if self.offload is not None:
            self.home = x.device  # the dense layer lives in host memory: run a device copy
            tensors = dict(self.dense.named_parameters()) | dict(self.dense.named_buffers())
            moved = {name: t.to(x.device, non_blocking=True) for name, t in tensors.items()}
            y = functional_call(self.dense, moved, (x,))
        else:
            y = self.dense(x)
        if self.accumulating and self._stats_space == "output":
            self._accumulate_outputs(y)
        return y

    def _start_accumulators(self) -> None:
        if self.stats is None:
            width = self.stats_features
            self.stats = [CovarianceStats(width, self.offload) for _ in range(self.groups)]
        if self.samples and self.reservoirs is None:
            self.reservoirs = [Reservoir(self.samples, self.offload) for _ in range(self.groups)]

    @no_grad
    def _accumulate(self, x: Tensor) -> None:
        """The pre-hook's work: count the inputs; feed the input rows to the reservoirs, and
        to the statistics when they live in the input space."""
        if not self.accumulating:
            return
        with paused():  # the activation detector must not see these calls as consumers
            if self._stats_space == "output":
                self._sample_inputs(x)  # validates x even without a reservoir
                self.inputs_seen += self._inputs_in(x)
                return
            for rows in self._row_chunks(x):
                self._start_accumulators()
                for j, part in enumerate(self._group_parts(rows, self.matrix_shape[1])):
                    self.stats[j].update(part)
                    if self.reservoirs is not None:
                        self.reservoirs[j].update(part)
            self.inputs_seen += self._inputs_in(x)

    def _sample_inputs(self, x: Tensor) -> None:
        """Offer the input rows of ``x`` to the reservoirs (output-space statistics); a
        subclass may screen rows before it builds them (a conv's patches)."""
        chunks = self._row_chunks(x)
        if not self.samples:
            return
        for rows in chunks:
            self._start_accumulators()
            for reservoir, part in zip(
                self.reservoirs, self._group_parts(rows, self.matrix_shape[1])
            ):
                reservoir.update(part)

    @no_grad
    def _accumulate_outputs(self, y: Tensor) -> None:
        """Feed the dense layer's output rows ``W x + b`` to the output-space statistics."""
        with paused():
            rows = self._output_rows(y)
            self._start_accumulators()
            for stats, part in zip(self.stats, self._group_parts(rows, self.matrix_shape[0])):
                stats.update(part)

    def _group_parts(self, rows: Tensor, width: int) -> list[Tensor]:
        """Rows ``(..., groups * width)`` as one view ``(..., width)`` per group."""
        return [rows] if self.groups == 1 else list(rows.split(width, dim=-1))

    def _output_rows(self, y: Tensor) -> Tensor:
        """The dense layer's output ``y`` as a view ``(..., groups * m)``: every position of the
        leading dimensions is one sample row."""
        return y

    def output_moments(self, group: int, fold: bool = False) -> tuple[Tensor, Tensor]:
        """The mean ``(m,)`` and covariance ``(m, m)`` of ``W x`` (without the bias) for one
        group, float64, from either space; with ``fold``, of the folded ``W``.

        Example:
            >>> from torch_lowrank import LowRankLinear
            >>> layer = LowRankLinear.from_linear(nn.Linear(6, 3), rank=1)
            >>> _ = layer(torch.randn(100, 6))
            >>> mean, cov = layer.output_moments(0)
            >>> tuple(mean.shape), tuple(cov.shape)
            ((3,), (3, 3))
        """
        stats = self.stats[group]
        weight, bias = self._matrices()[group]
        if self._stats_space == "input":
            W = weight.detach().to(stats.mean.device, torch.float64)
            mean, cov = W @ stats.mean, W @ stats.covariance @ W.T
        else:
            mean, cov = stats.mean, stats.covariance
            if bias is not None:
                mean = mean - bias.detach().to(mean.device, torch.float64)
        if fold and self.folded_batchnorm:
            m = self.matrix_shape[0]
            scale, _ = batchnorm_affine(self.folded_batchnorm[0])
            s = scale[group * m : (group + 1) * m].to(mean.device, torch.float64)
            mean, cov = mean * s, cov * s[:, None] * s[None, :]
        return mean, cov

    @property
    def samples_seen(self) -> int:
        """How many sample rows the statistics hold (0 once recovered)."""
        return 0 if self.stats is None else self.stats[0].count

    @property
    def rank(self) -> int | None:
        """The rank of the factors (per group), or while calibrating the target rank (``None``
        with energy)."""
        return self.target_rank if self.calibrating else self.down.weight.shape[0] // self.groups

    def saves_parameters(self, rank: int) -> bool:
        """Whether factors of this rank hold fewer weights than the dense layer."""
        m, n = self.matrix_shape
        return rank * (m + n) < m * n

    # -- recovery -----------------------------------------------------------------------------
    def _weights(self, fold: bool) -> list[tuple[Tensor, Tensor | None]]:
        """Per group ``(W, b)``; with ``fold``, the following eval BatchNorm folded in."""
        matrices = self._matrices()
        if not (fold and self.folded_batchnorm):
            return matrices
        scale, offset = batchnorm_affine(self.folded_batchnorm[0])
        scale, offset = scale.to(matrices[0][0].device), offset.to(matrices[0][0].device)
        m = self.matrix_shape[0]
        folded = []
        for j, (w, b) in enumerate(matrices):
            s, o = scale[j * m : (j + 1) * m], offset[j * m : (j + 1) * m]
            b = torch.zeros_like(s) if b is None else b.detach().double()
            folded.append((w.detach().double() * s[:, None], b * s + o))
        return folded

    def effective_activation(self, fold: bool) -> Activation | None:
        """The activation the recovery targets: the one after the layer, or after the folded
        BatchNorm when ``fold`` (without folding, an activation behind a BatchNorm is not
        the layer's own, so the layer is treated as linear)."""
        if self.folded_batchnorm and not fold:
            return None
        return self.activation

    def _solve(
        self,
        method: str,
        fold: bool = False,
        paired: list[tuple[CrossStats, Reservoir | None]] | None = None,
        **options,
    ) -> list[solvers.Factors]:
        """Solve every group for its factors without changing the module.

        ``paired`` (per group: the moments of ``(x~, x)`` pairs and a reservoir of concatenated
        pair rows) switches to corrective recovery. ``options`` go to the iterative solvers
        (``optimizer``, ``lr``, ``max_iter``, ``tol``; ``lam`` for ``nuclear``), except
        ``damping``, the corrective ridge weight (see :func:`solvers.corrective`).
        """
        return solve_layer(self, method, fold, paired, **options)

    def _install(self, layers: tuple[nn.Module, nn.Module]) -> None:
        """Enter the recovered phase with prepared factor layers ``(down, up)``."""
        self._calibration_hook.remove()
        del self.dense
        self.stats = None
        self.reservoirs = None
        self.staged, self.run_staged = None, False
        self.calibrating = False
        self.down, self.up = layers
        self.target_rank = self.rank

    def _report_row(
        self, factors: list[solvers.Factors], method: str, seconds: float, fold: bool = False
    ) -> LayerReport:
        m, n = self.matrix_shape
        rank = factors[0].rank
        has_bias = factors[0].bias is not None
        error = sum(f.error for f in factors)
        variance = sum(f.variance for f in factors)
        if math.isnan(error) or math.isnan(variance):
            relative = math.nan
        elif variance <= 0.0:
            relative = 0.0 if error <= 0.0 else math.inf
        else:
            relative = error / variance
        activation = self.effective_activation(fold)
        notes = []
        if self.groups > 1:
            notes.append(f"rank {rank} per group, {self.groups} groups")
        if fold and self.folded_batchnorm:
            notes.append("BatchNorm folded in")
        if "iterations" in factors[0].info:
            notes.append(f"{max(f.info['iterations'] for f in factors)} iterations")
        return LayerReport(
            name=self.layer_name,
            shape=tuple(self.dense.weight.shape),
            rank=rank,
            params_before=sum(p.numel() for p in self.dense.parameters()),
            params_after=self.groups * (rank * (m + n) + (m if has_bias else 0)),
            relative_error=relative,
            method=method,
            seconds=seconds,
            note=", ".join(notes),
            activation=activation.name if activation is not None else "-",
            spectrum=sum(f.spectrum for f in factors).tolist(),
        )

    def recover_(self, method: str = "relu", **options) -> LayerReport:
        """Solve for the low-rank factors from the accumulated statistics, in place.

        Args:
            method: ``"relu"`` (activation-aware: the layer's activation objective by projected
                gradient from the ``linear`` start; plain ``linear`` when no activation follows),
                ``"linear"`` (the exact data-driven optimum of the pre-activations), ``"svd"``
                (truncated SVD of the weight, needs no data) or ``"nuclear"`` (nuclear-norm
                relaxation of the ReLU objective).
            **options: for the iterative methods: ``optimizer`` (a ``torch.optim`` or
                ``torch_optimizer`` class), ``lr``, ``max_iter``, ``tol``; ``lam`` for nuclear.

        Returns:
            the :class:`~torch_lowrank.report.LayerReport` of this layer.

        Raises:
            ValueError: no calibration data was seen (data-driven methods), the data held NaN/Inf,
                or ``method`` is unknown. The module is then left unchanged, still calibrating.
            RuntimeError: the module is already recovered.

        Example:
            >>> from torch_lowrank import LowRankLinear
            >>> layer = LowRankLinear.from_linear(nn.Linear(16, 8), rank=2)
            >>> _ = layer(torch.randn(64, 16))
            >>> row = layer.recover_("linear")
            >>> layer.rank, layer.calibrating
            (2, False)
        """
        start = time.perf_counter()
        factors = self._solve(method, **options)
        layers = self._factor_layers(factors)
        row = self._report_row(factors, method, time.perf_counter() - start)
        self._install(layers)
        return row

    def extra_repr(self) -> str:
        phase = ", calibrating" if self.calibrating else ""
        return f"{self._shape_repr()}, rank={self.rank}, bias={self.bias is not None}{phase}"

    def _shape_repr(self) -> str:
        raise NotImplementedError
