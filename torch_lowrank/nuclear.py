"""ReLU-aware low-rank recovery with a nuclear-norm penalty: the rank falls out of ``lam``.

``docs/methods.md`` (``nuclear``). :func:`nuclear` minimises ``f_relu + lam ||Z||_*``, where
``f_relu`` is the convex objective of Theorem 3 (see :mod:`torch_lowrank.projected`), by proximal
gradient: a gradient step of size ``1/L`` then singular-value soft thresholding, with ``lam``
given or bisected for a rank. The problem, the loop (backtracking on ``L``, best iterate kept,
never worse than the start) and the result are those of :mod:`torch_lowrank.projected`. All work
is in float64 on the weight's device.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from .descent import Iterate, minimise, result
from .projected import Problem
from .solvers import Factors

__all__ = ["nuclear", "pad_rank"]


def _shrink(Z: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """The proximal map of ``threshold ||.||_*``: soft-threshold the singular values."""
    U, s, Vh = torch.linalg.svd(Z, full_matrices=False)
    s = (s - threshold).clamp_min(0.0)
    k = int((s > 0).sum())
    return U[:, :k], s[:k, None] * Vh[:k]


def nuclear(
    weight: Tensor,
    bias: Tensor | None,
    rows: Tensor,
    start: Factors,
    *,
    lam: float | None = None,
    rank: int | None = None,
    target_rows: Tensor | None = None,
    max_iter: int = 200,
    tol: float = 1e-6,
) -> Factors:
    r"""ReLU-aware recovery with a nuclear-norm penalty: minimises ``f_relu + lam ||Z||_*``.

    Proximal gradient (step ``1/L``, singular-value soft thresholding, one SVD per iteration)
    from ``start``; the rank falls out of ``lam``. Give ``lam``, or ``rank`` (default: the rank
    of ``start``) and ``lam`` is found by bisection (on a log scale, about 13 solves) as nearly
    the smallest one whose solution has rank ``<= rank``. The best iterate for the final ``lam``
    is returned; it is never worse than ``start`` on ``f_relu + lam ||Z||_*``.

    Args: as :func:`~torch_lowrank.projected.activation_aware`, and ``lam >= 0`` or ``rank`` in
    ``[1, min(m, n)]``.

    Returns:
        :class:`~torch_lowrank.solvers.Factors` as
        :func:`~torch_lowrank.projected.activation_aware`; ``up`` ``(m, k)``, ``k`` >= 1 the
        solution's rank; ``error`` = ``f_relu`` without the penalty;
        ``info["objective_before" / "objective_after"]`` penalised; ``info["lam"]``.

    Example:
        >>> from torch_lowrank import solvers
        >>> _ = torch.manual_seed(0)
        >>> w, x = torch.randn(12, 8, dtype=torch.float64), torch.randn(200, 8, dtype=torch.float64)
        >>> start = solvers.linear(w, None, x.mean(0), torch.cov(x.T, correction=0), rank=6)
        >>> fit = nuclear(w, None, x, start, rank=3, max_iter=30)
        >>> fit.rank <= 3, fit.info["lam"] > 0
        (True, True)
    """
    problem = Problem(weight, bias, rows, target_rows, "relu")
    if lam is not None and rank is not None:
        raise ValueError("expected at most one of lam or rank\nbut got both")
    if lam is not None and not lam >= 0:
        raise ValueError(f"expected lam >= 0\nbut got {lam}")
    state = problem.start(start)
    f_start = problem.value(*state)
    norm_start = float(torch.linalg.svdvals(state[0] @ state[1]).sum())  # ||Z_start||_*
    released = problem.release_dead(*state)

    def solve(weight_: float) -> Factors:
        best, iterations = minimise(
            problem,
            released,
            lambda Z, up, step: _shrink(Z, weight_ * step),
            lambda down: weight_ * float(torch.linalg.svdvals(down).sum()),  # up orthonormal
            max_iter,
            tol,
        )
        before = Iterate(*state, value=f_start + weight_ * norm_start, data=f_start)
        info = {"activation": "relu", "lam": weight_}
        return result(problem, start, best, before, iterations, info)

    if lam is not None:
        return solve(float(lam))
    target = start.rank if rank is None else rank
    if not 1 <= target <= min(problem.shape):
        raise ValueError(f"expected a rank in [1, {min(problem.shape)}]\nbut got {target}")
    # From lam = L ||Z_start||_2 up, the first step alone thresholds almost everything away.
    hi = max(problem.lipschitz * float(torch.linalg.matrix_norm(state[0] @ state[1], ord=2)), 1e-12)
    while (fit := solve(hi)).rank > target and hi < 1e300:
        hi *= 4.0
    lo = 1e-9 * hi
    for _ in range(12):  # geometric bisection to within 0.5%: rank(lo) > target >= rank(hi)
        mid = math.sqrt(lo * hi)
        if (trial := solve(mid)).rank <= target:
            hi, fit = mid, trial
        else:
            lo = mid
    return fit


def pad_rank(factors: Factors, rank: int) -> Factors:
    """``factors`` at a higher ``rank`` with the same product: ``down`` gets zero rows and
    ``up`` orthonormal columns orthogonal to its own (the groups of a layer share one rank, and
    the penalty may choose a different one for each).

    Example:
        >>> up = torch.linalg.qr(torch.randn(4, 1, dtype=torch.float64))[0]
        >>> f = Factors(up, torch.randn(1, 3, dtype=torch.float64), None, 0.0, 1.0, up[:1, 0])
        >>> g = pad_rank(f, 3)
        >>> g.rank, torch.allclose(g.up @ g.down, f.up @ f.down)
        (3, True)
    """
    extra = rank - factors.rank
    up, down = factors.up, factors.down
    eye = torch.eye(up.shape[0], dtype=up.dtype, device=up.device)
    basis, _ = torch.linalg.qr(torch.cat([up, eye], 1))  # first columns span up's
    return replace(
        factors,
        up=torch.cat([up, basis[:, factors.rank : rank]], 1),
        down=torch.cat([down, down.new_zeros(extra, down.shape[1])]),
    )
