"""What every low-rank module shares: the two phases, exporting a problem, installing factors.

1. *calibrating* (built by ``from_linear`` / ``from_conv2d`` / ...): the module holds the original
   dense layer as ``dense`` and forward is exactly that layer. Its ``observer`` (an
   :class:`~torch_lowrank.observer.Observer`, fed by hooks) owns the statistics and reservoir.
2. *recovered* (after ``install_``): the module holds two factor layers, ``down`` (inputs to
   ``r``) and ``up`` (``r`` to outputs, with the bias); the dense layer and the observer are gone.

Recovery is one path for a single module and for a whole model: :meth:`problem` exports the
frozen tensors of the layer (:class:`~torch_lowrank.problem.LayerProblem`), the pure
:func:`~torch_lowrank.problem.solve` returns factors, and :meth:`install_` writes them.

A subclass says how inputs become sample rows (:meth:`input_rows`, :meth:`output_rows`), what
its weight matrices are (:meth:`matrices`), how it builds its two factor layers
(:meth:`factor_layers`) and how it goes back to a dense layer (:meth:`to_dense`).
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import solvers
from .activations import Activation, resolve_activation
from .cross import PairedGroup
from .hooks import HookCarrier
from .observer import BatchGate, Observation, Observer, group_parts
from .plan import layer_problem, layer_row
from .problem import LayerProblem, solve
from .ranks import target_rank
from .report import LayerReport
from .reservoir import Reservoir

__all__ = ["LowRankModule"]


class LowRankModule(HookCarrier):
    """Phases, problem export and installation shared by the low-rank modules (the base class
    of :class:`~torch_lowrank.LowRankLinear`, :class:`~torch_lowrank.LowRankConv1d` and
    :class:`~torch_lowrank.LowRankConv2d`; ``isinstance(m, LowRankModule)`` finds them all)."""

    #: Independent blocks of the weight (a grouped conv's groups); each gets its own factors.
    groups: int = 1
    # The calibrating phase's state, set by from_dense; a recovered module keeps these defaults.
    calibrating: bool = False
    energy: float | None = None
    settings: Any = None  # what convert() decided for the whole model (settings.Settings)
    activation: Activation | None = None
    activation_source: str = "given"  # or "auto", "observed", "static", "none"
    folded_batchnorm: tuple = ()  # (bn,) when an eval BatchNorm follows (not a child)
    offload: torch.device | None = None
    observer: Observer | None = None
    source_type: type | None = None  # the foreign layer type merge_ gives back (GPT-2's Conv1D)
    _dense_type: type  # the dense layer type this module replaces

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
        offload: str | torch.device | None = None,
        settings: Any = None,
        gate: BatchGate | None = None,
        original: nn.Module | None = None,
        allocated: bool = False,
    ) -> LowRankModule:
        """Wrap a trained dense layer in a calibrating low-rank module (the subclasses'
        ``from_linear`` / ``from_conv2d`` / ``from_conv1d`` document the arguments).
        ``offload`` keeps the dense weight and the statistics on that device until recovery;
        ``settings`` and ``gate`` are what :func:`~torch_lowrank.convert` shares between the
        modules of one model; ``original`` is the layer ``dense`` stands for (GPT-2's
        ``Conv1D``), given back when the layer stays dense; ``allocated``: the rank is chosen at
        recovery by global allocation (give no rank, ratio or energy)."""
        label = name or cls.__name__
        if not isinstance(dense, cls._dense_type):
            raise TypeError(
                f"{label}: expected an nn.{cls._dense_type.__name__}\n"
                f"but got {type(dense).__name__}"
            )
        if isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples < 0:
            raise ValueError(f"{label}: samples must be an int >= 0\nbut got {samples!r}")
        shape = cls.matrix_shape_of(dense)
        resolved = None
        if not allocated:
            resolved = target_rank(shape, rank, ratio, energy, label, cls.describe(dense))
        auto = activation == "auto"
        found = None if auto else resolve_activation(activation, label)
        module = cls._shell(dense)  # the geometry of ``dense``, no factors yet
        module.dense = dense
        if original is not None and original is not dense:
            module.__dict__["source"] = original  # a plain attribute: not a submodule
            module.source_type = type(original)
        module.calibrating = True
        module.target_rank = resolved
        module.energy = None if energy is None else float(energy)
        module.add_bias = add_bias
        module.layer_name = label
        module.settings = settings
        module.activation = found
        module.activation_source = "auto" if auto else "given"
        module.offload = None if offload is None else torch.device(offload)
        module.home = dense.weight.device  # where the inputs arrive (and factors go)
        if module.offload is not None:
            dense.to(module.offload)
        m, n = shape
        space = "output" if m < n else "input"
        module.observer = Observer(module, space, int(samples), module.offload, gate)
        module.train((original or dense).training)  # the mode of the layer it replaces
        return module

    @classmethod
    def matrix_shape_of(cls, dense: nn.Module) -> tuple[int, int]:
        """One group's weight of ``dense`` as a matrix ``(m, n)``."""
        raise NotImplementedError

    @classmethod
    def describe(cls, dense: nn.Module) -> str:
        """The weight of ``dense`` as messages name it."""
        m, n = cls.matrix_shape_of(dense)
        return f"{m} x {n} weight"

    @classmethod
    def _shell(cls, dense: nn.Module):
        """A bare module with the geometry of ``dense`` (sizes, kernel, stride, ...) and nothing
        else: :meth:`from_dense` makes it a calibrating module."""
        raise NotImplementedError

    def _start_recovered(self, rank: int, add_bias: bool) -> None:
        self.target_rank = rank
        self.add_bias = add_bias
        self.layer_name = type(self).__name__

    # -- subclass interface ----------------------------------------------------------------------
    def check_input(self, x: Tensor) -> None:
        """Raise a ``ValueError`` naming the layer unless ``x`` is an input it takes."""
        raise NotImplementedError

    def count_inputs(self, x: Tensor) -> int:
        """How many inputs ``x`` holds (a Linear's tokens; a conv's images)."""
        return x.numel() // max(x.shape[-1], 1)

    def input_rows(self, x: Tensor) -> Iterable[Tensor]:
        """The sample rows of input ``x``, ``(N, groups * n)``, in memory-bounded chunks."""
        raise NotImplementedError

    def output_rows(self, y: Tensor) -> Tensor:
        """The dense layer's output ``y`` as a view ``(..., groups * m)``."""
        return y

    def offer_samples(self, x: Tensor, reservoirs: list[Reservoir]) -> None:
        """Offer the input rows of ``x`` to the per-group reservoirs (a conv builds only the
        patches that can enter)."""
        n = self.matrix_shape[1]
        for rows in self.input_rows(x):
            for reservoir, part in zip(reservoirs, group_parts(rows, n, self.groups)):
                reservoir.update(part)

    def matrices(self) -> list[tuple[Tensor, Tensor | None]]:
        """Per group, the dense weight as an ``(m, n)`` matrix and its bias ``(m,)``."""
        raise NotImplementedError

    def factor_layers(self, factors: list[solvers.Factors]) -> tuple[nn.Module, nn.Module]:
        """Build ``(down, up)`` from per-group float64 factors, in the dense layer's dtype."""
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        """The equivalent dense layer."""
        raise NotImplementedError

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """One group's weight as a matrix: ``(m, n)`` = (outputs, inputs per sample row)."""
        raise NotImplementedError

    # -- calibration -----------------------------------------------------------------------------
    @property
    def stats_space(self) -> str:
        """Where the statistics are kept (see :attr:`Observer.space
        <torch_lowrank.observer.Observer.space>`): ``"output"`` when ``m < n``, else ``"input"``;
        settable before the first calibration batch.

        Example:
            >>> from torch_lowrank import LowRankLinear
            >>> LowRankLinear.from_linear(nn.Linear(64, 8), rank=2).stats_space
            'output'
        """
        return self.observer.space

    @stats_space.setter
    def stats_space(self, space: str) -> None:
        self.observer.space = space

    @property
    def stats(self) -> list | None:
        """The per-group statistics (read only; ``None`` before data and once recovered)."""
        return None if self.observer is None else self.observer.observation().stats

    @property
    def reservoirs(self) -> list | None:
        """The per-group reservoirs of sample rows (read only; ``None`` without any)."""
        return None if self.observer is None else self.observer.observation().reservoirs

    @property
    def samples_seen(self) -> int:
        """How many sample rows the statistics hold (0 once recovered)."""
        return 0 if self.observer is None else self.observer.observation().samples_seen

    @property
    def inputs_seen(self) -> int:
        """Calibration inputs seen (tokens of a Linear, images of a conv)."""
        return 0 if self.observer is None else self.observer.observation().inputs_seen

    def forward(self, x: Tensor) -> Tensor:
        if not self.calibrating:
            return self.up(self.down(x))
        if self.offload is None:
            return self.dense(x)
        # The dense layer lives in host memory: run a copy on the inputs' device.
        self.home = x.device
        tensors = dict(self.dense.named_parameters()) | dict(self.dense.named_buffers())
        moved = {name: t.to(x.device, non_blocking=True) for name, t in tensors.items()}
        return functional_call(self.dense, moved, (x,))

    @property
    def original(self) -> nn.Module:
        """While calibrating: the layer this module replaced (``dense``, or the foreign layer
        ``dense`` stands for, such as GPT-2's ``Conv1D``)."""
        return self.__dict__.get("source") or self.dense

    def set_activation_(
        self, activation: Activation | None, batchnorm: nn.Module | None, source: str
    ) -> None:
        """Record what follows the layer: its activation (``None``: linear), an eval
        BatchNorm in between (folded at recovery) and how it was found (``"observed"``,
        ``"static"`` or ``"none"``). The activation detector calls this."""
        self.activation = activation
        self.folded_batchnorm = () if batchnorm is None else (batchnorm,)
        self.activation_source = source

    @property
    def rank(self) -> int | None:
        """The rank of the factors (per group), or while calibrating the target rank (``None``
        when chosen at recovery)."""
        return self.target_rank if self.calibrating else self.down.weight.shape[0] // self.groups

    def saves_parameters(self, rank: int, bias: bool | None = None) -> bool:
        """Whether factors of ``rank`` hold fewer parameters than the dense layer, counting a
        bias on the factors when ``bias`` (default: when the factors would get one: the dense
        layer has a bias, or ``add_bias``). E.g. ``Linear(4, 16, bias=False)`` at rank 3: 60
        weights save, 60 weights and an added bias of 16 do not. Once recovered, the dense layer
        is gone and only the weights are compared."""
        m, n = self.matrix_shape
        if not self.calibrating:
            return rank * (m + n) < m * n
        dense_bias = self.bias is not None
        with_bias = (dense_bias or self.add_bias) if bias is None else bias
        return rank * (m + n) + m * with_bias < m * n + m * dense_bias

    @property
    def factor_device(self) -> torch.device | None:
        """Where the factors go when not beside the dense weight: the device the inputs came
        from, for a layer whose dense weight is offloaded."""
        return self.home if self.offload is not None else None

    # -- recovery --------------------------------------------------------------------------------
    def effective_activation(self, fold: bool) -> Activation | None:
        """The activation the recovery targets: the one after the layer, or after the folded
        BatchNorm when ``fold`` (without folding, an activation behind a BatchNorm is not
        the layer's own, so the layer is treated as linear)."""
        if self.folded_batchnorm and not fold:
            return None
        return self.activation

    def problem(
        self,
        *,
        fold: bool = False,
        rank: int | None = None,
        observation: Observation | None = None,
        paired: list[PairedGroup] | None = None,
        samples: bool = True,
    ) -> LayerProblem:
        """The layer's recovery problem as frozen tensors, for
        :func:`~torch_lowrank.problem.solve` (see :func:`~torch_lowrank.plan.layer_problem`
        for the arguments).

        Example:
            >>> from torch_lowrank import LowRankLinear
            >>> layer = LowRankLinear.from_linear(nn.Linear(8, 4), rank=2)
            >>> _ = layer(torch.randn(16, 8))
            >>> layer.problem().seen, layer.problem().shape
            (16, (4, 8))
        """
        return layer_problem(
            self, fold=fold, rank=rank, observation=observation, paired=paired, samples=samples
        )

    def install_(
        self,
        factors: list[solvers.Factors],
        layers: tuple[nn.Module, nn.Module] | None = None,
    ) -> None:
        """Enter the recovered phase with ``factors`` (or the factor layers already built
        from them): the dense layer, the observer and its hooks go."""
        down, up = layers if layers is not None else self.factor_layers(factors)
        down.train(self.training)
        up.train(self.training)
        self.observer.close()
        self.observer = None
        del self.dense
        self.__dict__.pop("source", None)  # the foreign layer goes with the dense one
        self.calibrating = False
        self.down, self.up = down, up
        self.target_rank = self.rank

    def recover_(
        self, method: str = "relu", options: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> LayerReport:
        """Solve for the low-rank factors from the accumulated statistics, in place.

        Args:
            method: ``"relu"``, ``"linear"``, ``"svd"`` or ``"nuclear"`` (see
                :func:`torch_lowrank.recover_`).
            options / **kwargs: the method's options (:mod:`torch_lowrank.options`), checked
                before anything runs.

        Returns:
            the :class:`~torch_lowrank.report.LayerReport` of this layer.

        Raises:
            ValueError: no calibration data was seen (data-driven methods), the data held
                NaN/Inf, ``method`` is unknown or an option value is bad. The module is then
                left unchanged, still calibrating.
            TypeError: an unknown option.
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
        problem = self.problem(samples=method in ("relu", "nuclear"))
        factors = solve(problem, method, {**(options or {}), **kwargs})
        layers = self.factor_layers(factors)
        row = layer_row(self, factors, method, time.perf_counter() - start)
        self.install_(factors, layers)
        return row

    def extra_repr(self) -> str:
        phase = ", calibrating" if self.calibrating else ""
        return f"{self._shape_repr()}, rank={self.rank}, bias={self.bias is not None}{phase}"

    def _shape_repr(self) -> str:
        raise NotImplementedError
