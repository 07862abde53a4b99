"""One layer's calibration state, fed only by hooks (as ``torch.ao.quantization``'s observers).

An :class:`Observer` owns everything a calibrating low-rank module learns about its data: the
streaming statistics (:class:`~torch_lowrank.stats.CovarianceStats`, one per group), the
reservoir of sample rows (:class:`~torch_lowrank.reservoir.Reservoir`), the space the
statistics live in, how many inputs it saw, where it keeps them (``store``: host memory for an
offloaded layer) and its hook handles. The module holds its observer; nothing else writes it.

The statistics live in the narrower of two spaces: the input rows ``x`` (``n`` wide) when the
layer widens or keeps its width, the products ``W x + b`` the dense layer computes anyway
(``m`` wide) when it narrows. The solution needs only ``W C W^T`` and ``W mu``, and the narrower
space costs ``N min(m, n)^2`` per batch, never more than the layer's own ``N m n``. The
reservoir always holds input rows.

**A batch is all or nothing.** :class:`BatchGate` puts a forward pre-hook and a forward hook on
the converted model. While a forward of the model is running, the observers only remember the
tensors they were shown; when that forward returns, the gate hands them over in the order they
arrived. A forward that fails (an exception, a wrong dtype, Ctrl-C) never reaches the forward
hook, so what it showed is dropped when the next forward begins, or at recovery. Forwards of a
single layer outside the model's own forward are taken at once. The cost: one batch's layer
inputs stay alive until the model's forward ends (the activations a backward pass would keep).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._grad import no_grad
from .detect import paused
from .reservoir import Reservoir
from .stats import CovarianceStats

__all__ = ["BatchGate", "ModelHooks", "Observation", "Observer", "group_parts"]

SPACES = ("input", "output")


@dataclass(frozen=True)
class Observation:
    """What an observer saw, as plain data: the input of a solve (per group statistics and
    reservoirs; ``reservoirs`` is ``None`` without sample rows)."""

    space: str
    stats: list[CovarianceStats] | None
    reservoirs: list[Reservoir] | None
    inputs_seen: int

    @property
    def samples_seen(self) -> int:
        """How many sample rows the statistics hold."""
        return 0 if self.stats is None else self.stats[0].count

    @property
    def nbytes(self) -> int:
        """Memory held by the statistics and reservoirs, in bytes."""
        parts = (self.stats or []) + (self.reservoirs or [])
        return sum(part.nbytes for part in parts)


class Observer:
    """The calibration state of one low-rank module (see the module docstring).

    Args:
        module: the calibrating module; it turns inputs into sample rows
            (``input_rows``, ``output_rows``, ``offer_samples``, ``count_inputs``).
        space: ``"input"`` or ``"output"`` (see :attr:`space`).
        samples: reservoir capacity per group (0: no reservoir).
        store: where statistics and reservoirs live (``None``: where the rows arrive).
        gate: the model's :class:`BatchGate`, if any.

    Example:
        >>> from torch_lowrank import LowRankLinear
        >>> layer = LowRankLinear.from_linear(nn.Linear(6, 3), rank=1)
        >>> _ = layer(torch.randn(10, 6))
        >>> layer.observer.observation().samples_seen
        10
    """

    def __init__(
        self,
        module: nn.Module,
        space: str,
        samples: int,
        store: torch.device | None = None,
        gate: BatchGate | None = None,
    ) -> None:
        self.module = module
        self._space = space
        self.samples = samples
        self.store = store
        self.gate = gate
        self.enabled = True
        #: Copy outputs kept for a pending batch (the next module may change them in place);
        #: the activation detector clears it when the first forward showed only readers.
        self.copy_outputs = True
        self._stats: list[CovarianceStats] | None = None
        self._reservoirs: list[Reservoir] | None = None
        self._inputs_seen = 0
        self._handles = [  # the library's own hooks: not the module's, which it carries over
            nn.Module.register_forward_pre_hook(module, self._on_input),
            nn.Module.register_forward_hook(module, self._on_output),
        ]

    # -- what it holds --------------------------------------------------------------------------
    @property
    def space(self) -> str:
        """``"input"`` (statistics of the ``n``-wide input rows) or ``"output"`` (of the
        ``m``-wide products ``W x + b``); settable before the first row."""
        return self._space

    @space.setter
    def space(self, space: str) -> None:
        name = getattr(self.module, "layer_name", type(self.module).__name__)
        if space not in SPACES:
            raise ValueError(f"{name}: stats_space must be 'input' or 'output'\nbut got {space!r}")
        seen = self.observation().samples_seen
        if seen and space != self._space:
            raise RuntimeError(
                f"{name}: the statistics already hold {seen} rows in the {self._space} space;\n"
                "set stats_space before the first calibration batch"
            )
        self._space = space

    @property
    def handles(self) -> tuple:
        """The ``RemovableHandle``s of its hooks (empty once closed)."""
        return tuple(self._handles)

    def observation(self) -> Observation:
        """What was seen so far (the live accumulators, not copies)."""
        return Observation(self._space, self._stats, self._reservoirs, self._inputs_seen)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Context manager: forwards inside add nothing (e.g. corrective recovery's passes)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def reset(self) -> None:
        """Forget everything seen so far (the hooks stay: later batches start afresh)."""
        self._stats = self._reservoirs = None
        self._inputs_seen = 0

    def close(self) -> None:
        """Remove the hooks and free the statistics (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stats = self._reservoirs = None

    # -- hooks -----------------------------------------------------------------------------------
    def _on_input(self, module: nn.Module, args: tuple) -> None:
        self.module.check_input(args[0])  # a clear error naming the layer, even when disabled
        if self.enabled:
            with paused():  # the activation detector must not see these calls as consumers
                self._take("input", args[0])

    def _on_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.enabled and self._space == "output" and isinstance(output, Tensor):
            with paused():
                self._take("output", output)

    def _take(self, kind: str, tensor: Tensor) -> None:
        if self.gate is None or not self.gate.is_open:
            self.add(kind, tensor)
            return
        # An output may be changed in place by what follows (``ReLU(inplace=True)``): keep a
        # copy unless the first forward showed only readers. Inputs are kept as they are (the
        # model reads them, it rarely writes them).
        copy = kind == "output" and self.copy_outputs
        kept = tensor.detach().clone() if copy else tensor.detach()
        self.gate.pending.append((self, kind, kept))

    # -- accumulation ----------------------------------------------------------------------------
    def _start(self) -> None:
        groups = self.module.groups
        if self._stats is None:
            m, n = self.module.matrix_shape
            width = m if self._space == "output" else n
            self._stats = [CovarianceStats(width, self.store) for _ in range(groups)]
        if self.samples and self._reservoirs is None:
            self._reservoirs = [Reservoir(self.samples, self.store) for _ in range(groups)]

    @no_grad
    def add(self, kind: str, tensor: Tensor) -> None:
        """Add one input (``kind="input"``) or output (``"output"``) tensor of the layer."""
        with paused():  # the activation detector must not see these calls as consumers
            m, n = self.module.matrix_shape
            if kind == "output":
                self._start()
                rows = self.module.output_rows(tensor)
                for stats, part in zip(self._stats, group_parts(rows, m, self.module.groups)):
                    stats.update(part)
                return
            if self._space == "output":
                if self.samples:
                    self._start()
                    self.module.offer_samples(tensor, self._reservoirs)
            else:
                for rows in self.module.input_rows(tensor):
                    self._start()
                    for j, part in enumerate(group_parts(rows, n, self.module.groups)):
                        self._stats[j].update(part)
                        if self._reservoirs is not None:
                            self._reservoirs[j].update(part)
            self._inputs_seen += self.module.count_inputs(tensor)


def group_parts(rows: Tensor, width: int, groups: int) -> list[Tensor]:
    """Rows ``(..., groups * width)`` as one view ``(..., width)`` per group.

    Example:
        >>> [tuple(p.shape) for p in group_parts(torch.zeros(5, 6), 3, groups=2)]
        [(5, 3), (5, 3)]
    """
    return [rows] if groups == 1 else list(rows.split(width, dim=-1))


class BatchGate:
    """Makes every forward of ``model`` all or nothing for its observers (module docstring).

    Example:
        >>> import torch_lowrank as tl
        >>> model = tl.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), rank=2)
        >>> _ = model(torch.randn(4, 8))
        >>> model[0].samples_seen
        4
    """

    def __init__(self, model: nn.Module) -> None:
        self.pending: list[tuple[Observer, str, Tensor]] = []
        self.is_open = False
        self._handles = [
            model.register_forward_pre_hook(self._begin),
            model.register_forward_hook(self._commit),
        ]

    def _begin(self, model: nn.Module, args: tuple) -> None:
        self.pending.clear()  # what a failed forward showed
        self.is_open = True

    def _commit(self, model: nn.Module, args: tuple, output: Any) -> None:
        pending, self.pending = self.pending, []
        self.is_open = False
        for observer, kind, tensor in pending:
            observer.add(kind, tensor)

    def discard(self) -> None:
        """Drop what an unfinished forward showed."""
        self.pending.clear()
        self.is_open = False

    def remove(self) -> None:
        """Drop anything pending and remove the hooks (idempotent)."""
        self.discard()
        for handle in self._handles:
            handle.remove()
        self._handles = []


class ModelHooks:
    """The hooks a conversion puts on the model: the batch gate
    (:class:`~torch_lowrank.observer.BatchGate`) and the activation detector waiting for the
    first forward (:class:`~torch_lowrank.detect.FirstForwardDetector`), removed together."""

    def __init__(self, gate: Any = None, detector: Any = None) -> None:
        self.gate = gate
        self.detector = detector

    def abort(self) -> None:
        """After a forward that did not finish: drop what it showed and end an observation
        of activations in progress (its mode would otherwise stay on the stack)."""
        if self.gate is not None:
            self.gate.discard()
        if self.detector is not None and not self.detector.done:
            self.detector.abort()

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        self.abort()
        if self.gate is not None:
            self.gate.remove()
        if self.detector is not None and not self.detector.done:
            self.detector.remove()
