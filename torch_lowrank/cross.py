"""Streaming paired statistics for corrective recovery (``docs/methods.md``).

:class:`CrossStats` keeps the moments of paired rows ``(x~, x)``: the compressed network's and
the original network's inputs to one layer on the same samples. Each side is a
:class:`~torch_lowrank.stats.CovarianceStats`; the cross sum ``sum (x~ - s~)(x - s)^T`` is about
the two sides' shifts, so it re-centres like them (:func:`~torch_lowrank.stats.shifted_product`)
and ``all_reduce`` sums the pairs of every ``torch.distributed`` rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ._grad import no_grad
from .stats import CovarianceStats, shifted_product

__all__ = ["CrossStats"]


class CrossStats:
    r"""Streaming moments of paired rows ``(x~, x)``: what the compressed network and the original
    network feed one layer on the same samples (corrective recovery, ``docs/corrective.md``).

    Keeps the count, ``sum x~``, ``sum x``, ``sum x~ x~^T``, ``sum x~ x^T`` and ``sum x x^T``
    (each about a shift, float64, on the rows' device or on ``store``). All are sums, so
    they merge.

    Example:
        >>> stats = CrossStats(3)
        >>> x = torch.randn(100, 3)
        >>> stats.update(x, x)
        >>> torch.allclose(stats.cross, stats.covariance_tilde)
        True
    """

    def __init__(self, features: int, store: str | torch.device | None = None) -> None:
        self.tilde = CovarianceStats(features, store)
        self.original = CovarianceStats(features, store)
        self.sum_cross: Tensor | None = None  # (n, n) sum of (x~ - s~)(x - s)^T

    @property
    def count(self) -> int:
        return self.tilde.count

    @property
    def nbytes(self) -> int:
        extra = 0 if self.sum_cross is None else self.sum_cross.numel() * 8
        return self.tilde.nbytes + self.original.nbytes + extra

    @no_grad
    def update(self, tilde_rows: Tensor, rows: Tensor) -> None:
        """Add paired batches ``(N, n)``: row ``i`` of both comes from the same sample."""
        if tilde_rows.shape != rows.shape:
            raise ValueError(
                f"expected paired rows of one shape\n"
                f"but got {tuple(tilde_rows.shape)} and {tuple(rows.shape)}"
            )
        self.tilde.check_rows(tilde_rows)  # both sides first: a bad batch adds nothing
        self.original.check_rows(rows)
        pairs = zip(self.tilde.shifted_chunks(tilde_rows), self.original.shifted_chunks(rows))
        for t, x in pairs:
            if t.dtype != x.dtype:  # one float64 side: the product in float64
                t, x = t.double(), x.double()
            product = (t.T @ x).to(self.tilde.shift.device, torch.float64)
            self.sum_cross = product if self.sum_cross is None else self.sum_cross + product

    def is_finite(self) -> bool:
        return (
            self.tilde.is_finite()
            and self.original.is_finite()
            and bool(torch.isfinite(self.sum_cross).all())
        )

    @property
    def mean_tilde(self) -> Tensor:
        return self.tilde.mean

    @property
    def mean(self) -> Tensor:
        return self.original.mean

    @property
    def covariance_tilde(self) -> Tensor:
        return self.tilde.covariance

    @property
    def covariance(self) -> Tensor:
        return self.original.covariance

    @property
    def cross(self) -> Tensor:
        """``E[(x~ - E x~)(x - E x)^T]``, ``(n, n)`` float64."""
        n = self.count
        return self.sum_cross / n - torch.outer(self.tilde.sum / n, self.original.sum / n)

    @classmethod
    @torch.no_grad()
    def all_reduce(
        cls, stats: CrossStats | None, features: int, device: torch.device
    ) -> CrossStats:
        """A new accumulator holding the pairs of every rank of the default process group, both
        sides and the cross sum about the global means (``stats`` is left unchanged; ``None``:
        this rank saw no pairs).

        Collective, like :meth:`CovarianceStats.all_reduce
        <torch_lowrank.stats.CovarianceStats.all_reduce>`.
        """
        held = stats is not None and stats.count > 0
        out = cls(features)
        out.tilde = CovarianceStats.all_reduce(stats.tilde if held else None, features, device)
        out.original = CovarianceStats.all_reduce(
            stats.original if held else None, features, device
        )
        if out.count == 0:
            return out
        mean_tilde, mean = out.tilde.shift, out.original.shift
        if held:
            tilde, original = stats.tilde, stats.original
            cross = shifted_product(
                stats.sum_cross,
                stats.count,
                tilde.sum,
                tilde.shift - mean_tilde,
                original.sum,
                original.shift - mean,
            )
        else:
            cross = torch.zeros(features, features, dtype=torch.float64, device=device)
        dist.all_reduce(cross)
        out.sum_cross = cross
        return out
