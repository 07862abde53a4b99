"""What model-level recovery decides for one layer before anything is written: a :class:`Plan`.

Model-level recovery is all or nothing: every layer is solved first (:func:`plan_layer`, the
same export -> solve path as a module's own ``recover_``), and only when every plan is ready are
they written. A plan is either factors (with their layers already built, so that writing them is
attribute assignments only) or "keep this layer dense", with the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn

from . import solvers
from .cross import CrossStats
from .observer import Observation
from .options import Options
from .problem import solve
from .report import LayerReport, relative_error
from .reservoir import Reservoir
from .solvers import Factors

__all__ = ["Plan", "layer_row", "plan_layer"]


@dataclass
class Plan:
    """One layer's outcome.

    Attributes:
        factors: per group, or ``None`` when the layer goes back to dense.
        layers: ``(down, up)`` built from the factors.
        seconds: time spent solving.
        folded: a following BatchNorm was folded into the factors.
        dense_reason: why the layer goes back to dense (``None``: it does not).
        saw_no_data: the layer went back to dense for want of calibration data.
    """

    factors: list[Factors] | None = None
    layers: tuple[nn.Module, nn.Module] | None = None
    seconds: float = 0.0
    folded: bool = False
    dense_reason: str | None = None
    saw_no_data: bool = False

    @classmethod
    def dense(cls, reason: str, saw_no_data: bool = False) -> Plan:
        """A plan that puts the dense layer back.

        Example:
            >>> Plan.dense("global allocation keeps it dense").factors is None
            True
        """
        return cls(dense_reason=reason, saw_no_data=saw_no_data)


def plan_layer(
    module: nn.Module,
    method: str,
    options: Options,
    *,
    fold: bool = False,
    rank: int | None = None,
    observation: Observation | None = None,
    paired: list[tuple[CrossStats, Reservoir | None]] | None = None,
) -> Plan:
    """Solve one calibrating layer without changing it (see
    :meth:`~torch_lowrank.LowRankLinear.problem` for the arguments). A layer that saw no data
    (except for ``svd``) or whose chosen rank saves nothing gets a dense plan."""
    start = time.perf_counter()
    problem = module.problem(fold=fold, rank=rank, observation=observation, paired=paired)
    if method != "svd" and problem.seen == 0:
        return Plan.dense("saw no calibration data", saw_no_data=True)
    factors = solve(problem, method, options)
    chosen = factors[0].rank
    if not module.saves_parameters(chosen, factors[0].bias is not None):
        how = f"energy={module.energy}" if problem.energy is not None else f"method={method!r}"
        return Plan.dense(f"rank {chosen} for {how} saves nothing")
    layers = module.factor_layers(factors)
    return Plan(factors, layers, time.perf_counter() - start, problem.folded)


def layer_row(
    module: nn.Module,
    factors: list[solvers.Factors],
    method: str,
    seconds: float,
    fold: bool = False,
) -> LayerReport:
    """The report row of a solve of ``module`` (still calibrating)."""
    m, n = module.matrix_shape
    rank = factors[0].rank
    has_bias = factors[0].bias is not None
    error = sum(f.error for f in factors)
    variance = sum(f.variance for f in factors)
    activation = module.effective_activation(fold)
    notes = []
    if module.groups > 1:
        notes.append(f"rank {rank} per group, {module.groups} groups")
    if fold and module.folded_batchnorm:
        notes.append("BatchNorm folded in")
    if "iterations" in factors[0].info:
        notes.append(f"{max(f.info['iterations'] for f in factors)} iterations")
    return LayerReport(
        name=module.layer_name,
        shape=tuple(module.dense.weight.shape),
        rank=rank,
        params_before=sum(p.numel() for p in module.dense.parameters()),
        params_after=module.groups * (rank * (m + n) + (m if has_bias else 0)),
        relative_error=relative_error(error, variance),
        method=method,
        seconds=seconds,
        note=", ".join(notes),
        activation=activation.name if activation is not None else "-",
        spectrum=sum(f.spectrum for f in factors).tolist(),
    )
