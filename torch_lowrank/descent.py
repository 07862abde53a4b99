"""The descent loop of the activation-aware solvers, shared by ``relu``
(:func:`~torch_lowrank.projected.activation_aware`) and ``nuclear``
(:func:`~torch_lowrank.nuclear.nuclear`).

:func:`minimise` runs a proximal gradient descent on ``f(Z, c) + penalty`` over factored
iterates ``Z = up down``: a gradient step, then the solver's ``prox`` (a rank projection, or
singular-value soft thresholding). The step is the Barzilai-Borwein step of the last move
(``<s, s> / <s, y>``, ``s`` the change of ``(Z, c)`` and ``y`` that of the gradient; ``1/L``
first), quartered until the objective falls below the worst of the last few values by a
sufficient amount (non-monotone). A ``torch.optim``-style optimizer may replace the plain step.
The best :class:`Iterate` is kept, and :func:`result` turns it into
:class:`~torch_lowrank.solvers.Factors`, giving back the start when nothing improved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from .solvers import Factors

__all__ = ["Iterate", "Objective", "minimise", "result"]

_WINDOW = 10  # stop when the best objective improved by < tol (relative) over this many steps
_BACKTRACKS = 30  # at most this many quarterings of one step
_MEMORY = 5  # a step must improve on the worst of this many last objective values
_SUFFICIENT = 1e-4  # ... by this fraction of its length squared over twice the step
_STEP_RANGE = 1e3  # steps stay within [1 / (1e3 L), 1e3 / L]

#: ``prox(Z, up, step) -> (up, down)``: the factors of the solver's proximal map of ``Z``
#: (``up`` is the previous left factor, a warm start; ``step`` is ``None`` after an optimizer).
Prox = Callable[[Tensor, Tensor, float | None], tuple[Tensor, Tensor]]


class Objective(Protocol):
    """What the loop needs of an objective ``f(Z, c)`` over factors ``Z = up down``
    (:class:`~torch_lowrank.projected.Problem` is one)."""

    shape: tuple[int, int]  # (m, n) of Z
    lipschitz: float  # of the gradient: the first step is 1 / lipschitz
    free_bias: bool  # whether c is a variable (else it stays 0)
    variance: float  # the targets' variance, reported with the factors

    def value_and_grad(self, up: Tensor, down: Tensor, c: Tensor) -> tuple[float, Tensor, Tensor]:
        """``f`` and its gradients in ``Z`` and ``c``."""

    def float64(self, tensor: Tensor) -> Tensor:
        """``tensor`` in float64 on the objective's device."""


@dataclass(frozen=True)
class Iterate:
    """One point of a descent: the factors (``Z = up down``, bias ``c``), the objective
    ``value`` with any penalty, and its data term ``data`` (the objective without it)."""

    up: Tensor
    down: Tensor
    c: Tensor
    value: float
    data: float


def minimise(
    problem: Objective,
    state: tuple[Tensor, Tensor, Tensor],
    prox: Prox,
    penalty: Callable[[Tensor], float],
    max_iter: int,
    tol: float,
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    lr: float | None = None,
) -> tuple[Iterate, int]:
    """Minimise ``f + penalty`` from ``state = (up, down, c)`` (module notes); returns the best
    :class:`Iterate` and the number of iterations. Stops when the best objective improved by
    less than ``tol`` (relative) over 10 iterations, at ``max_iter``, when no step decreases
    the objective enough, or on a non-finite iterate.

    Example:
        >>> from torch_lowrank import solvers
        >>> from torch_lowrank.projected import Problem
        >>> _ = torch.manual_seed(0)
        >>> w, x = torch.randn(6, 4, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)
        >>> problem = Problem(w, None, x, None, "relu")
        >>> fit = solvers.linear(w, None, x.mean(0), torch.cov(x.T, correction=0), rank=2)
        >>> in_span = lambda Z, up, step: (up, up.T @ Z)  # stay in the span of ``up``
        >>> best, steps = minimise(problem, problem.start(fit), in_span, lambda d: 0.0, 20, 1e-6)
        >>> best.value <= problem.value(*problem.start(fit))
        True
    """
    up, down, c = state
    f, gZ, gc = problem.value_and_grad(up, down, c)
    current = f + penalty(down)
    best, history, iterations = Iterate(up, down, c, current, f), [current], 0
    if not math.isfinite(current):
        return best, 0
    if optimizer is not None:
        Z = (up @ down).clone().requires_grad_(True)
        bias = c.clone().requires_grad_(True)
        opt = optimizer([Z, bias], lr=lr)
    L = problem.lipschitz
    step, recent = 1.0 / L, [current]
    for _ in range(max_iter):
        if optimizer is None:
            Z0 = up @ down
            reference = max(recent[-_MEMORY:])  # non-monotone: the worst of the last few
            for _ in range(_BACKTRACKS):
                new_up, new_down = prox(Z0 - step * gZ, up, step)
                new_c = c - step * gc
                new_f, new_gZ, new_gc = problem.value_and_grad(new_up, new_down, new_c)
                value = new_f + penalty(new_down)
                sZ, sc = new_up @ new_down - Z0, new_c - c
                moved = float(sZ.square().sum() + sc.square().sum())
                allowed = reference - _SUFFICIENT / (2.0 * step) * moved
                if not value > allowed or value - allowed <= 1e-13 * abs(reference):
                    break  # accepted, non-finite, or equal up to rounding
                step /= 4.0
            if not value <= reference + 1e-13 * abs(reference):  # no step is good enough
                break
            # Barzilai-Borwein: the step that fits the gradient's change along the last move
            curvature = float((sZ * (new_gZ - gZ)).sum() + (sc * (new_gc - gc)).sum())
            step = moved / curvature if curvature > 0 else _STEP_RANGE / L
            step = min(max(step, 1.0 / (_STEP_RANGE * L)), _STEP_RANGE / L)
        else:
            Z.grad, bias.grad = gZ, gc
            opt.step()
            if not (torch.isfinite(Z).all() and torch.isfinite(bias).all()):
                break
            with torch.no_grad():
                new_up, new_down = prox(Z, up, None)
                Z.copy_(new_up @ new_down)
            new_c = bias.detach().clone()
            new_f, new_gZ, new_gc = problem.value_and_grad(new_up, new_down, new_c)
            value = new_f + penalty(new_down)
        if not math.isfinite(value):
            break
        iterations += 1
        up, down, c, gZ, gc, current = new_up, new_down, new_c, new_gZ, new_gc, value
        recent.append(current)
        if current < best.value:
            best = Iterate(up, down, c, current, new_f)
        history.append(best.value)
        if best.value <= 0.0 or (
            len(history) > _WINDOW
            and history[-1 - _WINDOW] - best.value <= tol * abs(history[-1 - _WINDOW])
        ):
            break
    return best, iterations


def result(
    problem: Objective,
    start: Factors,
    best: Iterate,
    before: Iterate,
    iterations: int,
    info: dict[str, Any],
) -> Factors:
    """The :class:`~torch_lowrank.solvers.Factors` of ``best`` (from :func:`minimise`), or of
    ``before``, the iterate of ``start``, when nothing improved on it; ``info`` is added to
    the factors' ``info`` with the iterations and the objective before and after.

    Example:
        >>> from torch_lowrank import solvers
        >>> from torch_lowrank.projected import Problem
        >>> w, x = torch.randn(6, 4, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)
        >>> problem = Problem(w, None, x, None, "relu")
        >>> fit = solvers.linear(w, None, x.mean(0), torch.cov(x.T, correction=0), rank=2)
        >>> value = problem.value(*problem.start(fit))
        >>> start = Iterate(*problem.start(fit), value, value)
        >>> result(problem, fit, start, start, 0, {}).info["objective_after"] == value
        True
    """
    if not best.value < before.value:
        best = before
    up, down = best.up, best.down
    if down.shape[0] == 0:  # everything was thresholded away: keep one (zero) direction
        up = problem.float64(torch.eye(problem.shape[0], 1))
        down = problem.float64(torch.zeros(1, problem.shape[1]))
    info = {
        "iterations": iterations,
        "objective_before": before.value,
        "objective_after": best.value,
        **info,
    }
    bias = best.c if problem.free_bias else None
    return Factors(up, down, bias, best.data, problem.variance, start.spectrum, info)
