"""One layer's recovery problem as frozen tensors, and the pure :func:`solve`.

A calibrating module exports a :class:`LayerProblem` (its weight per group, with a following
BatchNorm folded in when asked, the moments it observed, its sample rows, the activation after
it; nothing of the module is kept; :func:`~torch_lowrank.plan.layer_problem`), and :func:`solve`
turns it into :class:`~torch_lowrank.solvers.Factors`, one per group, reading only tensors. The
module-level and the model-level ``recover_`` share this one path::

    problem = module.problem()                # frozen tensors
    factors = solve(problem, "relu", options)  # pure: reads only tensors
    module.install_(factors)                  # the module's own write

Nothing in this file touches a module; :mod:`torch_lowrank.plan` is the side that does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from . import projected, solvers
from .activations import Activation
from .nuclear import nuclear, pad_rank
from .options import Options, make_options
from .weighting import solve_weighted

__all__ = ["GroupData", "LayerProblem", "fits_activation", "solve"]


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
