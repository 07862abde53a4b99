"""From a calibrating module to its plan: export its problem, solve it, build its layers.

:func:`layer_problem` reads a calibrating module (its weights, with a following BatchNorm folded
in when asked, its observer's moments and sample rows, the activation after it) into a frozen
:class:`~torch_lowrank.problem.LayerProblem`; the pure :func:`~torch_lowrank.problem.solve`
turns that into factors. Model-level recovery is all or nothing: every layer is solved first
into a :class:`Plan` (:func:`plan_layer`: factors with their layers already built, or "keep this
layer dense" with the reason), and only when every plan is ready are they written;
:func:`layer_row` is a solve's row of the report.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import solvers
from .activations import folded_scale, layer_weights
from .cross import PairedGroup
from .observer import Observation
from .options import Options
from .problem import GroupData, LayerProblem, solve
from .report import LayerReport
from .solvers import Factors
from .weighting import weigh

__all__ = ["Plan", "layer_problem", "layer_row", "plan_layer"]


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
    paired: list[PairedGroup] | None = None,
    weighting: Mapping[str, Any] | None = None,
) -> Plan:
    """Solve one calibrating layer without changing it (see
    :meth:`~torch_lowrank.LowRankLinear.problem` for the arguments; ``weighting``: the keywords
    of :func:`~torch_lowrank.weighting.weigh`). A layer that saw no data (except for ``svd``)
    or whose chosen rank saves nothing gets a dense plan.

    Example:
        >>> from torch_lowrank import LowRankLinear
        >>> from torch_lowrank.options import make_options
        >>> layer = LowRankLinear.from_linear(nn.Linear(16, 8), rank=2)
        >>> plan_layer(layer, "linear", make_options("linear")).dense_reason
        'saw no calibration data'
        >>> _ = layer(torch.randn(64, 16))
        >>> plan = plan_layer(layer, "linear", make_options("linear"))
        >>> plan.factors[0].rank, layer.calibrating  # the layer itself is unchanged
        (2, True)
    """
    start = time.perf_counter()
    aware = method in ("relu", "nuclear")  # the closed forms need no sample rows
    problem = module.problem(
        fold=fold, rank=rank, observation=observation, paired=paired, samples=aware
    )
    problem = problem if weighting is None else weigh(problem, module, **weighting)
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
    """The report row of a solve of ``module`` (still calibrating).

    Example:
        >>> from torch_lowrank import LowRankLinear
        >>> from torch_lowrank.problem import solve
        >>> layer = LowRankLinear.from_linear(nn.Linear(16, 8), rank=2)
        >>> _ = layer(torch.randn(64, 16))
        >>> row = layer_row(layer, solve(layer.problem(), "linear"), "linear", seconds=0.0)
        >>> row.rank, row.params_before, row.params_after
        (2, 136, 56)
    """
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
        relative_error=solvers.relative_error(error, variance),
        method=method,
        seconds=seconds,
        note=", ".join(notes),
        activation=activation.name if activation is not None else "-",
        spectrum=sum(f.spectrum for f in factors).tolist(),
    )


def layer_problem(
    module: Any,
    *,
    fold: bool = False,
    rank: int | None = None,
    observation: Observation | None = None,
    paired: list[PairedGroup] | None = None,
    samples: bool = True,
) -> LayerProblem:
    """The layer's recovery problem as frozen tensors (nothing of the module is kept).

    Args:
        fold: fold the BatchNorm recorded after the layer into its weight.
        rank: the rank to solve for, instead of the module's own (global allocation).
        observation: statistics to use instead of the observer's (e.g. summed over
            several processes).
        paired: per group, the moments of ``(x~, x)`` pairs and a reservoir of ``[x~, x]``
            rows: a corrective problem.
        samples: include the reservoir's sample rows (the activation-aware methods need them;
            reading them costs a settle of the reservoir).

    Raises:
        RuntimeError: the module is already recovered.

    Example:
        >>> from torch_lowrank import LowRankLinear
        >>> layer = LowRankLinear.from_linear(nn.Linear(8, 4), rank=2)
        >>> _ = layer(torch.randn(32, 8))
        >>> problem = layer_problem(layer, rank=3)
        >>> problem.seen, problem.rank, problem.groups[0].cov.shape
        (32, 3, torch.Size([4, 4]))
    """
    if not module.calibrating:
        raise RuntimeError(
            f"{module.layer_name}: already recovered; recover_() runs once per module"
        )
    seen_as = observation or module.observer.observation()
    weights = layer_weights(module, fold)
    n = module.matrix_shape[1]
    groups = []
    for j, (weight, bias) in enumerate(weights):
        if paired is not None:
            cross, reservoir = paired[j].moments, paired[j].rows
            both = None if reservoir is None else reservoir.rows  # (k, 2n): [x~, x]
            mean, cov, joint = cross.mean, cross.covariance, cross.cross
            if cross.original_features != n and fold and module.folded_batchnorm:
                s = folded_scale(module, j).to(mean.device)  # W x of the folded weight
                mean, cov, joint = mean * s, cov * s[:, None] * s[None, :], joint * s[None, :]
            data = GroupData(
                weight, bias, mean, cov, cross.mean_tilde, cross.covariance_tilde, joint,
                rows=None if both is None else both[:, :n],
                target_rows=None if both is None else both[:, n:],
            )  # fmt: skip
        elif seen_as.samples_seen:
            mean, cov = _moments(module, seen_as, j, fold)
            kept = samples and seen_as.reservoirs is not None
            rows = seen_as.reservoirs[j].rows if kept else None
            data = GroupData(weight, bias, mean, cov, rows=rows)
        else:
            data = GroupData(weight, bias)
        groups.append(data)
    seen = paired[0].moments.count if paired is not None else seen_as.samples_seen
    energy = module.energy if rank is None else None
    return LayerProblem(
        name=module.layer_name,
        groups=tuple(groups),
        rank=rank if rank is not None else module.target_rank,
        energy=energy,
        add_bias=module.add_bias,
        activation=module.effective_activation(fold),
        outputs=seen_as.space == "output"
        if paired is None
        else paired[0].moments.original_features != n,
        corrective=paired is not None,
        seen=seen,
        folded=bool(fold and module.folded_batchnorm),
    )


def _moments(module: Any, seen: Observation, group: int, fold: bool) -> tuple[Tensor, Tensor]:
    """The group's mean and covariance: of the input rows, or (output space) of ``W x``
    without the bias, scaled by a folded BatchNorm."""
    stats = seen.stats[group]
    if seen.space == "input":
        return stats.mean, stats.covariance
    weight, bias = module.matrices()[group]
    mean, cov = stats.mean, stats.covariance
    if bias is not None:
        mean = mean - bias.detach().to(mean.device, torch.float64)
    if fold and module.folded_batchnorm:
        s = folded_scale(module, group).to(mean.device)
        mean, cov = mean * s, cov * s[:, None] * s[None, :]
    return mean, cov
