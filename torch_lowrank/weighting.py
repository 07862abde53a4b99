"""Loss-aware output weighting (``weighting="fisher"``): errors weighed by what they cost the loss.

Every closed form counts an error in each of a layer's outputs alike. With output weighting, a
layer's error ``e`` (its outputs minus the original's) costs ``e^T G e`` instead of ``e^T e``,
where ``G`` is the second moment of the loss gradient with respect to the layer's output,
``G = E[g g^T]``, one row ``g`` per output position (a token, a pixel), measured on the original
network by one backward pass per calibration batch
(:func:`~torch_lowrank.sensitivity.output_fisher`). Without a loss of
the user's, the labels are sampled from the model's own predictive distribution (the output is
read as logits over its last dimension), which makes ``G`` an estimate of the Fisher
information at that layer's output.

``G`` is damped to ``G_d = G + alpha trace(G) / m I`` (``alpha``:
:attr:`~torch_lowrank.sensitivity.FisherWeighting.damping`)
and the weighted problem is the plain one seen through ``S = G_d^1/2``: the closed forms solve
for ``S W`` (and ``S b``), and the factor that reaches the output is mapped back by ``S^-1``
(:func:`solve_weighted`), so ``Z = S^-1 P_r S W`` with ``P_r`` the top-``r`` eigenvectors of
``S W C W^T S`` (corrective recovery likewise, with its regression target). Layers solved by an
activation-aware method (``relu`` / ``nuclear`` where an activation follows) are not weighted.
The report's errors stay the plain, unweighted ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from .activations import batchnorm_affine
from .solvers import Factors, output_error

__all__ = ["DEFAULT_DAMPING", "FisherWeighting", "output_scale", "solve_weighted", "weigh"]


#: ``alpha`` in ``G + alpha trace(G) / m I``: the damping rule, the same for every model.
DEFAULT_DAMPING = 0.1


@dataclass(frozen=True)
class FisherWeighting:
    """How output weights are measured (``weighting=`` in :func:`~torch_lowrank.compress`).

    Attributes:
        damping: ``alpha`` in ``G + alpha trace(G) / m I`` (``> 0``; larger is closer to
            the unweighted solve).
        batches: how many calibration batches to run backward (``None``: all).
        loss: ``loss(output, batch) -> Tensor``, a scalar to differentiate; ``None``: the
            cross-entropy of labels sampled from the model's own output distribution.

    Example:
        >>> FisherWeighting(damping=0.5).batches is None
        True
    """

    damping: float = DEFAULT_DAMPING
    batches: int | None = None
    loss: Callable[[Any, Any], Tensor] | None = None

    def __post_init__(self) -> None:
        damping = self.damping
        if isinstance(damping, bool) or not isinstance(damping, Real):
            raise ValueError(f"weighting: damping must be a number\nbut got {damping!r}")
        if not (math.isfinite(damping) and damping > 0):
            raise ValueError(f"weighting: damping must be finite and > 0\nbut got {damping!r}")
        object.__setattr__(self, "damping", float(damping))
        batches = self.batches
        if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int)):
            raise ValueError(f"weighting: batches must be a positive int\nbut got {batches!r}")
        if batches is not None and batches < 1:
            raise ValueError(f"weighting: batches must be a positive int\nbut got {batches!r}")
        if self.loss is not None and not callable(self.loss):
            raise ValueError(f"weighting: loss must be callable\nbut got {self.loss!r}")


def output_scale(fisher: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """``(S, S^-1)`` with ``S = (G + damping trace(G) / m I)^1/2`` (float64); a ``G`` of
    trace 0 (the output never reaches the loss) gives ``S = I``.

    Example:
        >>> s, s_inv = output_scale(torch.diag(torch.tensor([3.0, 1.0])), 1.0)
        >>> torch.allclose(s @ s, torch.diag(torch.tensor([5.0, 3.0], dtype=torch.float64)))
        True
    """
    G = fisher.to(torch.float64)
    m = G.shape[0]
    trace = float(torch.diagonal(G).sum())
    if not trace > 0:
        eye = torch.eye(m, dtype=torch.float64, device=G.device)
        return eye, eye
    G = (G + G.T) / 2 + damping * trace / m * torch.eye(m, dtype=G.dtype, device=G.device)
    values, vectors = torch.linalg.eigh(G)
    values = values.clamp_min(damping * trace / m)  # rounding below the damping floor
    root = values.sqrt()
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


def solve_weighted(
    solve: Callable[[Any], Factors], group: Any, outputs: bool, corrective: bool
) -> Factors:
    """Solve ``group`` (a :class:`~torch_lowrank.problem.GroupData` with ``scale`` set) by
    ``solve`` seen through ``S``, and map the factors back; their ``error`` and ``variance``
    are the plain (unweighted) ones on the group's moments.

    Example:
        >>> from torch_lowrank import solvers
        >>> from torch_lowrank.problem import GroupData
        >>> w, eye = torch.randn(4, 6, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
        >>> moments = torch.zeros(6, dtype=torch.float64), torch.eye(6, dtype=torch.float64)
        >>> group = GroupData(w, None, *moments, scale=eye, unscale=eye)  # S = I: unweighted
        >>> plain = lambda g: solvers.linear(g.weight, g.bias, g.mean, g.cov, rank=2)
        >>> fit, fit_plain = solve_weighted(plain, group, False, False), plain(group)
        >>> torch.allclose(fit.up @ fit.down, fit_plain.up @ fit_plain.down)
        True
    """
    S, S_inv = group.scale, group.unscale
    W = group.weight.detach().to(S.device, torch.float64)
    b = None if group.bias is None else group.bias.detach().to(S.device, torch.float64)
    seen = replace(group, weight=S @ W, bias=None if b is None else S @ b, scale=None)
    if outputs:  # moments of W x: those of S W x are S mu, S C S (and E[x~ (S W x)^T] = Ctx S)
        cross = None if group.cross is None else group.cross.to(S) @ S
        seen = replace(seen, mean=S @ group.mean.to(S), cov=S @ group.cov.to(S) @ S, cross=cross)
    fit = solve(seen)
    Q, R = torch.linalg.qr(S_inv @ fit.up)  # keep ``up`` orthonormal: Z = Q (R down)
    up, down = Q, R @ fit.down
    bias = None if fit.bias is None else S_inv @ fit.bias
    if outputs:  # the target is y = W x itself; in parallel, the map on it is S^-1 U U^T S
        target = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
        predict = up @ down if corrective else S_inv @ fit.up @ (fit.up.T @ S)
    else:
        target, predict = W, up @ down
    paired = (group.mean_tilde, group.cov_tilde, group.cross) if corrective else None
    error, variance = output_error(target, predict, b, bias, group.mean, group.cov, paired)
    info = {**fit.info, "weighted": True}
    return Factors(up, down, bias, error, variance, fit.spectrum, info)


def weigh(problem: Any, module: nn.Module, fisher: Tensor, damping: float) -> Any:
    """``problem`` (a :class:`~torch_lowrank.problem.LayerProblem` of ``module``) with each
    group's output weight ``S`` set from ``fisher`` (``G`` over all the module's outputs, from
    :func:`~torch_lowrank.sensitivity.output_fisher`), damped by ``damping``. A folded
    BatchNorm scales the outputs by ``s``, so the folded problem's ``G`` is ``G / (s s^T)``.

    Example:
        >>> import torch_lowrank as tl
        >>> layer = tl.LowRankLinear.from_linear(nn.Linear(4, 3), rank=1)
        >>> _ = layer(torch.randn(8, 4))
        >>> weigh(layer.problem(), layer, torch.eye(3), 1.0).groups[0].scale.shape
        torch.Size([3, 3])
    """
    m = module.matrix_shape[0]
    G = fisher.to(torch.float64)
    if problem.folded:
        scale, _ = batchnorm_affine(module.folded_batchnorm[0])
        s = scale.to(G.device, torch.float64)
        inverse = torch.where(s == 0, torch.zeros_like(s), 1 / s)
        G = G * inverse[:, None] * inverse[None, :]
    groups = []
    for j, group in enumerate(problem.groups):
        S, S_inv = output_scale(G[j * m : (j + 1) * m, j * m : (j + 1) * m], damping)
        groups.append(replace(group, scale=S, unscale=S_inv))
    return replace(problem, groups=tuple(groups))
