"""One layer's recovery, from the module to its plan: export the problem, solve it, plan it.

A calibrating module exports a frozen :class:`LayerProblem` (:func:`layer_problem`: its weight
per group, with a following BatchNorm folded in when asked, the moments it observed, its sample
rows, the activation after it; nothing of the module is kept) and the pure :func:`solve` turns it
into :class:`~torch_lowrank.solvers.Factors`, one per group. The module-level and the
model-level ``recover_`` share this one path::

    problem = module.problem()                # frozen tensors
    factors = solve(problem, "relu", options)  # pure: reads only tensors
    module.install_(factors)                  # the module's own write

Model-level recovery is all or nothing: every layer is solved first into a :class:`Plan`
(:func:`plan_layer`: factors with their layers already built, or "keep this layer dense" with
the reason), and only when every plan is ready are they written.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from . import projected, solvers
from .activations import Activation, folded_scale, layer_weights
from .cross import PairedGroup
from .nuclear import nuclear, pad_rank
from .observer import Observation
from .options import Options, make_options
from .report import LayerReport
from .solvers import Factors
from .weighting import solve_weighted, weigh

__all__ = ["GroupData", "LayerProblem", "Plan", "layer_problem", "layer_row", "plan_layer"]
__all__ += ["fits_activation", "solve"]


@dataclass(frozen=True)
class GroupData:
    """The data of one group of a layer (a plain layer has one group).

    ``weight`` ``(m, n)`` and ``bias`` ``(m,)`` are the dense layer's (float64 when a BatchNorm
    was folded in). The moments are of the input rows ``x``, or of the products ``W x`` when
    the problem's ``outputs`` is set; corrective problems add the moments of the compressed
    network's input ``x~`` and the cross moment ``E[(x~ - mu~)(x - mu)^T]``. ``rows`` are the
    sample rows the low-rank layer sees (``x``, or ``x~`` when corrective) and ``target_rows``
    the rows that produce the targets (corrective only). ``scale`` / ``unscale``: ``S`` and
    ``S^-1`` of an output weighting (:mod:`torch_lowrank.weighting`), ``None`` when unweighted.
    """

    weight: Tensor
    bias: Tensor | None
    mean: Tensor | None = None
    cov: Tensor | None = None
    mean_tilde: Tensor | None = None
    cov_tilde: Tensor | None = None
    cross: Tensor | None = None
    rows: Tensor | None = None
    target_rows: Tensor | None = None
    scale: Tensor | None = None
    unscale: Tensor | None = None


@dataclass(frozen=True)
class LayerProblem:
    """Everything :func:`solve` needs about one layer, and nothing of the module.

    Attributes:
        name: the layer's name, for messages.
        groups: one :class:`GroupData` per group.
        rank / energy: the rank to keep, or the fraction of output variance to keep.
        add_bias: whether the factors may carry a bias the dense layer lacks.
        activation: what follows the layer (``None``: linear).
        outputs: the moments are of ``W x`` (a layer that keeps its statistics in the output
            space), not of ``x``.
        corrective: the moments pair the compressed network's input with the original's.
        seen: how many sample rows the moments hold.
        folded: a following BatchNorm is folded into ``weight`` and ``bias``.
    """

    name: str
    groups: tuple[GroupData, ...]
    rank: int | None
    energy: float | None
    add_bias: bool = True
    activation: Activation | None = None
    outputs: bool = False
    corrective: bool = False
    seen: int = 0
    folded: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """One group's weight as a matrix ``(m, n)``."""
        return tuple(self.groups[0].weight.shape)


def fits_activation(method: str, activation: Activation | None) -> bool:
    """Whether ``method`` fits the activation after a layer (from its sample rows): ``relu`` and
    ``nuclear`` do where an activation follows; every other layer gets its closed form.

    Example:
        >>> fits_activation("relu", None), fits_activation("linear", Activation("relu", abs, 1.0))
        (False, False)
    """
    return method in ("relu", "nuclear") and activation is not None


def _check_data(problem: LayerProblem, method: str) -> None:
    name = problem.name
    if method != "svd" and problem.seen == 0:
        raise ValueError(
            f"{name}: saw no calibration data; run forward passes over calibration batches\n"
            f"before recover_(method={method!r})"
        )
    if problem.seen == 0:
        return
    for group in problem.groups:
        first = [t for t in (group.mean, group.mean_tilde) if t is not None]
        second = [t for t in (group.cov, group.cov_tilde, group.cross) if t is not None]
        if not all(bool(torch.isfinite(t).all()) for t in first):
            raise ValueError(
                f"{name}: the calibration inputs contained NaN or Inf\n"
                f"({problem.seen} rows seen); the layer was left unchanged"
            )
        if not all(bool(torch.isfinite(t).all()) for t in second):
            raise ValueError(
                f"{name}: the calibration inputs are finite but their products overflowed\n"
                f"({problem.seen} rows seen; float32 holds squares up to about 3e38): scale the "
                "inputs down or calibrate in float64; the layer was left unchanged"
            )


def _solve_group(
    problem: LayerProblem, group: GroupData, method: str, options: Options, rank, energy
):
    weight, bias = group.weight, group.bias
    aware = fits_activation(method, problem.activation)
    if group.scale is not None and method != "svd" and not aware:  # weighted closed form
        plain = lambda seen: _solve_group(problem, seen, method, options, rank, energy)  # noqa: E731
        return solve_weighted(plain, group, problem.outputs, problem.corrective)
    if method == "svd":
        moments = {}
        if problem.seen and not problem.corrective:
            moments = {"mean": group.mean, "cov": group.cov, "outputs": problem.outputs}
        return solvers.svd(weight, bias, rank, energy, **moments)
    if problem.corrective:
        start = solvers.corrective(
            weight, bias, group.mean_tilde, group.cov_tilde, group.mean, group.cov, group.cross,
            rank, energy, problem.add_bias, options.damping, outputs=problem.outputs,
        )  # fmt: skip
    else:
        closed_form = solvers.linear_from_outputs if problem.outputs else solvers.linear
        start = closed_form(weight, bias, group.mean, group.cov, rank, energy, problem.add_bias)
    if method == "linear" or problem.activation is None:
        return start
    rows, targets = group.rows, group.target_rows
    kwargs = options.solver_kwargs()
    if method == "nuclear":
        return nuclear(weight, bias, rows, start, target_rows=targets, **kwargs)
    return projected.activation_aware(
        weight, bias, rows, start, problem.activation, target_rows=targets, **kwargs
    )


def solve(
    problem: LayerProblem, method: str = "relu", options: Options | Mapping[str, Any] | None = None
) -> list[solvers.Factors]:
    """The factors of every group of ``problem``, by ``method``; pure (reads only tensors).

    Args:
        problem: from a calibrating module's :meth:`~torch_lowrank.LowRankLinear.problem`.
        method: ``"relu"`` (activation-aware where an activation follows, else ``linear``),
            ``"linear"``, ``"svd"`` or ``"nuclear"``.
        options: the method's options (:mod:`torch_lowrank.options`), validated here.

    Raises:
        ValueError: unknown method or bad option value, no data, non-finite or overflowing
            moments, or no sample rows for an activation-aware method; each names the layer.
        TypeError: an unknown option.

    Example:
        >>> from torch_lowrank import LowRankLinear
        >>> layer = LowRankLinear.from_linear(torch.nn.Linear(8, 4), rank=2)
        >>> _ = layer(torch.randn(32, 8))
        >>> [f.rank for f in solve(layer.problem(), "linear")]
        [2]
    """
    options = make_options(method, options, where=problem.name)
    _check_data(problem, method)
    aware = fits_activation(method, problem.activation)
    if aware and any(group.rows is None for group in problem.groups):
        raise ValueError(
            f"{problem.name}: method={method!r} needs sample rows, but the layer keeps none\n"
            "(samples=0); convert with samples > 0 or use method='linear'"
        )
    factors = [
        _solve_group(problem, group, method, options, problem.rank, problem.energy)
        for group in problem.groups
    ]
    ranks = {f.rank for f in factors}
    if len(ranks) > 1 and method == "nuclear":  # the penalty chose each group's rank
        factors = [pad_rank(f, max(ranks)) for f in factors]
    elif len(ranks) > 1:  # energy chose different ranks per group: all take the largest
        fixed = replace(problem, rank=max(ranks), energy=None)
        factors = [
            _solve_group(fixed, group, method, options, fixed.rank, None) for group in fixed.groups
        ]
    return factors


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
    or whose chosen rank saves nothing gets a dense plan."""
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
