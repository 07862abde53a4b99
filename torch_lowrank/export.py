"""A calibrating module's recovery problem, exported as frozen tensors.

:func:`layer_problem` reads a calibrating low-rank module (its weight per group, a following
BatchNorm folded in when asked, what its observer saw, or the paired moments of corrective
recovery) and returns a :class:`~torch_lowrank.problem.LayerProblem` that keeps nothing of the
module. It is the module's :meth:`~torch_lowrank.LowRankLinear.problem`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .batchnorm import batchnorm_affine, fold_affine
from .cross import CrossStats
from .observer import Observation
from .problem import GroupData, LayerProblem
from .reservoir import Reservoir

__all__ = ["layer_problem", "layer_weights"]


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
) -> LayerProblem:
    """The layer's recovery problem as frozen tensors (nothing of the module is kept).

    Args:
        fold: fold the BatchNorm recorded after the layer into its weight.
        rank: the rank to solve for, instead of the module's own (global allocation).
        observation: statistics to use instead of the observer's (e.g. summed over
            several processes).
        paired: per group, the moments of ``(x~, x)`` pairs and a reservoir of ``[x~, x]``
            rows: a corrective problem.

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
            rows = None if seen_as.reservoirs is None else seen_as.reservoirs[j].rows
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
