"""Solving one layer: check its statistics, pick the solver, solve every group.

A pure dispatch from a calibrating module's statistics to the solver functions of
:mod:`torch_lowrank.solvers` (``svd``, ``linear``, ``corrective``) and
:mod:`torch_lowrank.projected` (activation-aware and nuclear); it never changes the module.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from . import nuclear, projected, solvers
from .cross import CrossStats
from .reservoir import Reservoir

__all__ = ["METHODS", "solve_layer", "plan_layer"]

#: Recovery methods a module accepts. ``relu`` is activation-aware (whatever the activation).
METHODS = ("relu", "linear", "svd", "nuclear")


def solve_layer(
    module,
    method: str,
    fold: bool = False,
    paired: list[tuple[CrossStats, Reservoir | None]] | None = None,
    **options,
) -> list[solvers.Factors]:
    """The factors of every group of a calibrating low-rank ``module``.

    ``fold`` folds the BatchNorm recorded after the layer into its weight. ``paired`` (per
    group: the moments of ``(x~, x)`` pairs and a reservoir of concatenated pair rows) switches
    to corrective recovery. ``options`` go to the iterative solvers (``optimizer``, ``lr``,
    ``max_iter``, ``tol``; ``lam`` for ``nuclear``), except ``damping``, the corrective ridge
    weight (see :func:`torch_lowrank.solvers.corrective`).

    Raises:
        RuntimeError: the module is already recovered.
        ValueError: unknown method, no data, non-finite data, or no sample rows for the
            activation-aware methods; each message names the layer.
    """
    name = module.layer_name
    if not module.calibrating:
        raise RuntimeError(f"{name}: already recovered; recover_() runs once per module")
    if method not in METHODS:
        raise ValueError(f"{name}: method must be one of {', '.join(METHODS)}\nbut got {method!r}")
    seen = module.samples_seen if paired is None else paired[0][0].count
    sources = module.stats if paired is None else [cross for cross, _ in paired]
    if seen > 0 and not all(stats.is_finite() for stats in sources):
        raise ValueError(
            f"{name}: the calibration inputs contained NaN or Inf\n"
            f"({seen} rows seen); the layer was left unchanged"
        )
    if method != "svd" and seen == 0:
        raise ValueError(
            f"{name}: saw no calibration data; run forward passes over calibration batches\n"
            f"before recover_(method={method!r})"
        )
    damping = options.pop("damping", 1e-2)
    activation = module.effective_activation(fold)
    aware = method in ("relu", "nuclear") and activation is not None
    if aware and (module.reservoirs if paired is None else paired[0][1]) is None:
        raise ValueError(
            f"{name}: method={method!r} needs sample rows, but the layer keeps none\n"
            f"(samples=0); convert with samples > 0 or use method='linear'"
        )

    outputs = paired is None and module.stats_space == "output"

    def solve_group(j: int, weight: Tensor, bias: Tensor | None, rank, energy):
        stats = sources[j] if seen else None
        if stats is not None and outputs:  # the moments of W x, for the (folded) weight
            mean, cov = module.output_moments(j, fold)
        elif stats is not None:
            mean, cov = stats.mean, stats.covariance
        if method == "svd":
            moments = {} if stats is None else {"mean": mean, "cov": cov, "outputs": outputs}
            return solvers.svd(weight, bias, rank, energy, **moments)
        if paired is None:
            closed_form = solvers.linear_from_outputs if outputs else solvers.linear
            start = closed_form(weight, bias, mean, cov, rank, energy, module.add_bias)
            rows, targets = (module.reservoirs[j].rows, None) if aware else (None, None)
        else:
            start = solvers.corrective(
                weight, bias, stats.mean_tilde, stats.covariance_tilde, stats.mean,
                stats.covariance, stats.cross, rank, energy, module.add_bias, damping,
            )  # fmt: skip
            if aware:
                both = paired[j][1].rows  # (k, 2n): [x~, x]
                rows, targets = both[:, : weight.shape[1]], both[:, weight.shape[1] :]
        if not aware:
            return start
        if method == "nuclear":
            return nuclear.nuclear(weight, bias, rows, start, target_rows=targets, **options)
        return projected.activation_aware(
            weight, bias, rows, start, activation, target_rows=targets, **options
        )

    matrices = module._weights(fold)
    factors = [
        solve_group(j, w, b, module.target_rank, module.energy) for j, (w, b) in enumerate(matrices)
    ]
    ranks = {f.rank for f in factors}
    if len(ranks) > 1:  # different ranks per group (energy, nuclear): keep the largest
        factors = [solve_group(j, w, b, max(ranks), None) for j, (w, b) in enumerate(matrices)]
    return factors


def plan_layer(
    module,
    method: str,
    fold: bool,
    options: dict,
    paired: list[tuple[CrossStats, Reservoir | None]] | None = None,
) -> tuple:
    """Solve one calibrating layer without changing it, for model-level recovery.

    Returns ``("dense", reason)`` when the layer saw no data (except for ``svd``) or its
    energy-chosen rank saves nothing, else ``("factors", factors, (down, up), seconds, fold)``.
    ``paired`` switches to corrective recovery (see :func:`solve_layer`)."""
    start = time.perf_counter()
    seen = module.samples_seen if paired is None else paired[0][0].count
    if method != "svd" and seen == 0:
        return ("dense", "saw no calibration data")
    factors = module._solve(method, fold=fold, paired=paired, **options)
    rank = factors[0].rank
    if not module.saves_parameters(rank):
        return ("dense", f"rank {rank} for energy={module.energy} saves nothing")
    layers = module._factor_layers(factors)
    return ("factors", factors, layers, time.perf_counter() - start, fold)


def spectrum_of(module, group: int, fold: bool) -> Tensor:
    """The descending eigenvalues of one group's output covariance ``W C W^T`` (``min(m, n)`` of
    them), from the statistics in either space: what ``linear`` keeps and drops at each rank."""
    if module.stats_space == "output":
        _, cov = module.output_moments(group, fold)
        return torch.linalg.eigvalsh((cov + cov.T) / 2).flip(0).clamp_min(0.0)
    weight, _ = module._weights(fold)[group]
    return solvers.output_spectrum(weight, module.stats[group].covariance)
