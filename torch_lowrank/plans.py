"""From a calibrating module to its plan: export the problem, solve it, build the layers.

:func:`layer_problem` reads a calibrating low-rank module (its weight per group, a following
BatchNorm folded in when asked, what its observer saw, or the paired moments of corrective
recovery) and returns a frozen :class:`~torch_lowrank.problem.LayerProblem` that keeps nothing
of the module; it is the module's :meth:`~torch_lowrank.LowRankLinear.problem`.

What model-level recovery decides for one layer before anything is written is a :class:`Plan`.

Model-level recovery is all or nothing: every layer is solved first (:func:`plan_layer`, the
same export -> solve path as a module's own ``recover_``), and only when every plan is ready are
they written. A plan is either factors (with their layers already built, so that writing them is
attribute assignments only) or "keep this layer dense", with the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import solvers
from .activations import batchnorm_affine, fold_affine
from .cross import CrossStats
from .observer import Observation
from .options import Options
from .problem import GroupData, LayerProblem, solve
from .report import LayerReport
from .reservoir import Reservoir
from .solvers import Factors

__all__ = ["Plan", "layer_problem", "layer_row", "layer_weights", "plan_layer"]


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
    aware = method in ("relu", "nuclear")  # the closed forms need no sample rows
    problem = module.problem(
        fold=fold, rank=rank, observation=observation, paired=paired, samples=aware
    )
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
        relative_error=solvers.relative_error(error, variance),
        method=method,
        seconds=seconds,
        note=", ".join(notes),
        activation=activation.name if activation is not None else "-",
        spectrum=sum(f.spectrum for f in factors).tolist(),
    )


def layer_weights(module: Any, fold: bool = False) -> list[tuple[Tensor, Tensor | None]]:
    """Per group ``(W, b)``; with ``fold``, the following eval BatchNorm folded in
    (float64)."""
    matrices = module.matrices()
    if not (fold and module.folded_batchnorm):
        return matrices
    scale, offset = batchnorm_affine(module.folded_batchnorm[0])
    m = module.matrix_shape[0]
    return [
        fold_affine(w, b, scale[j * m : (j + 1) * m], offset[j * m : (j + 1) * m])
        for j, (w, b) in enumerate(matrices)
    ]


def layer_problem(
    module: Any,
    *,
    fold: bool = False,
    rank: int | None = None,
    observation: Observation | None = None,
    paired: list[tuple[CrossStats, Reservoir | None]] | None = None,
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
            cross, reservoir = paired[j]
            both = None if reservoir is None else reservoir.rows  # (k, 2n): [x~, x]
            data = GroupData(
                weight, bias, cross.mean, cross.covariance, cross.mean_tilde,
                cross.covariance_tilde, cross.cross,
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
    seen = paired[0][0].count if paired is not None else seen_as.samples_seen
    energy = module.energy if rank is None else None
    return LayerProblem(
        name=module.layer_name,
        groups=tuple(groups),
        rank=rank if rank is not None else module.target_rank,
        energy=energy,
        add_bias=module.add_bias,
        activation=module.effective_activation(fold),
        outputs=paired is None and seen_as.space == "output",
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
        m = module.matrix_shape[0]
        scale, _ = batchnorm_affine(module.folded_batchnorm[0])
        s = scale[group * m : (group + 1) * m].to(mean.device, torch.float64)
        mean, cov = mean * s, cov * s[:, None] * s[None, :]
    return mean, cov
