"""Streaming paired statistics for corrective recovery (``docs/methods.md``).

:class:`CrossStats` keeps the moments of paired rows ``(x~, x)``: the compressed network's and
the original network's inputs to one layer on the same samples. Each side is a
:class:`~torch_lowrank.stats.CovarianceStats`; the cross sum ``sum (x~ - s~)(x - s)^T`` is about
the two sides' shifts, so it re-centres like them (:func:`~torch_lowrank.stats.shifted_product`)
and ``all_reduce`` sums the pairs of every ``torch.distributed`` rank.

The original side may be narrower than ``x~``: a layer that narrows (``m < n``) pairs ``x~``
with its products ``y = W x`` (``original_features = m``), which is all a corrective solve reads
of the original side (``docs/corrective.md``): ``n x m`` and ``m x m`` sums instead of two more
``n x n`` ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ._grad import no_grad
from .reservoir import Reservoir
from .stats import CovarianceStats, shifted_product

__all__ = ["CrossStats", "PairedGroup", "PairedMoments"]


@dataclass
class PairedMoments:
    """The moments of :class:`CrossStats` once frozen: the count, the means and covariances of
    ``x~`` and of the original side ``x`` (or ``W x``), and ``cross = E[(x~ - mu~)(x - mu)^T]``
    (float64)."""

    count: int
    mean_tilde: Tensor
    covariance_tilde: Tensor
    mean: Tensor
    covariance: Tensor
    cross: Tensor

    @property
    def nbytes(self) -> int:
        held = (self.mean_tilde, self.covariance_tilde, self.mean, self.covariance, self.cross)
        return sum(t.numel() * t.element_size() for t in held)

    def is_finite(self) -> bool:
        held = (self.mean_tilde, self.covariance_tilde, self.mean, self.covariance, self.cross)
        return all(bool(torch.isfinite(t).all()) for t in held)


@dataclass
class PairedGroup:
    """One group of a layer in corrective recovery: ``moments``, the streaming moments of its
    ``(x~, x)`` pairs, and ``rows``, a reservoir of ``[x~, x]`` rows (``None`` for a layer the
    closed forms solve, which need no rows)."""

    moments: CrossStats
    rows: Reservoir | None = None


class CrossStats:
    r"""Streaming moments of paired rows ``(x~, x)``: what the compressed network and the original
    network feed one layer on the same samples (corrective recovery, ``docs/corrective.md``).

    Keeps the count, ``sum x~``, ``sum x``, ``sum x~ x~^T``, ``sum x~ x^T`` and ``sum x x^T``
    (each about a shift, float64, on the rows' device or on ``store``). All are sums, so
    they merge. ``original_features`` (default ``features``) is the width of the original
    side's rows, which may differ from that of ``x~`` (the products ``W x`` of a narrowing layer).

    Example:
        >>> stats = CrossStats(3)
        >>> x = torch.randn(100, 3)
        >>> stats.update(x, x)
        >>> torch.allclose(stats.cross, stats.covariance_tilde)
        True
    """

    def __init__(
        self,
        features: int,
        store: str | torch.device | None = None,
        original_features: int | None = None,
    ) -> None:
        self.tilde = CovarianceStats(features, store)
        self.original = CovarianceStats(original_features or features, store)
        self._sum_cross: Tensor | None = None  # (n, w) float64 sum of (x~ - s~)(x - s)^T
        self._stage: Tensor | None = None  # (n, w) products in the work dtype, not yet summed
        self._staged_rows = 0
        self._frozen: PairedMoments | None = None

    @property
    def original_features(self) -> int:
        """The width ``w`` of the original side's rows (``n``, or ``m`` for ``W x``)."""
        return self.original.features

    @property
    def sum_cross(self) -> Tensor | None:
        """``sum (x~ - s~)(x - s)^T``, ``(n, w)`` float64 (``None`` before any pair)."""
        self._promote()
        return self._sum_cross

    @sum_cross.setter
    def sum_cross(self, value: Tensor | None) -> None:
        self._promote()
        self._sum_cross = value

    def _promote(self) -> None:
        """Add the staged products to the float64 sum (as :class:`CovarianceStats` does)."""
        if not self._staged_rows:
            return
        stage, self._staged_rows = self._stage, 0
        home = self.tilde.shift.device
        if self._sum_cross is None:
            self._sum_cross = torch.zeros(stage.shape, dtype=torch.float64, device=home)
        self._sum_cross.add_(stage.to(home))
        if stage.device == home:
            stage.zero_()
        else:
            self._stage = None

    @property
    def count(self) -> int:
        return self._frozen.count if self._frozen is not None else self.tilde.count

    @property
    def nbytes(self) -> int:
        if self._frozen is not None:
            return self._frozen.nbytes
        held = [t for t in (self._sum_cross, self._stage) if t is not None]
        extra = sum(t.numel() * t.element_size() for t in held)
        return self.tilde.nbytes + self.original.nbytes + extra

    def freeze_(self) -> CrossStats:
        """Compute the moments once, in the memory of the sums (which are given up), and free
        the float32 stages: what a solve reads, at ``3 n^2`` float64 and no second copy. A
        frozen accumulator takes no more pairs. Returns ``self``.

        Example:
            >>> stats = CrossStats(3)
            >>> x = torch.randn(100, 3, dtype=torch.float64)
            >>> stats.update(x, x)
            >>> expected = stats.covariance
            >>> torch.allclose(stats.freeze_().covariance, expected), stats.count
            (True, 100)
        """
        if self._frozen is not None or self.count == 0:
            return self
        mean_tilde, mean, cross = self.mean_tilde, self.mean, self.sum_cross
        count, sum_tilde, total = self.count, self.tilde.sum, self.original.sum
        self._sum_cross = self._stage = None
        cross = cross.div_(count).addr_(sum_tilde, total, alpha=-1.0 / count**2)
        cov_tilde, cov = self.tilde.take_covariance(), self.original.take_covariance()
        self._frozen = PairedMoments(count, mean_tilde, cov_tilde, mean, cov, cross)
        return self

    @no_grad
    def update(self, tilde_rows: Tensor, rows: Tensor) -> None:
        """Add paired batches ``(N, n)`` and ``(N, w)``: row ``i`` of both comes from the same
        sample."""
        if tilde_rows.shape[:-1] != rows.shape[:-1]:
            raise ValueError(
                f"expected paired rows with the same leading dimensions\n"
                f"but got {tuple(tilde_rows.shape)} and {tuple(rows.shape)}"
            )
        if self._frozen is not None:
            raise RuntimeError("these paired statistics are frozen; they take no more rows")
        self.tilde.check_rows(tilde_rows)  # both sides first: a bad batch adds nothing
        self.original.check_rows(rows)
        n, w = self.tilde.features, self.original.features
        tilde_rows, rows = tilde_rows.reshape(-1, n), rows.reshape(-1, w)
        if rows.shape[0] == 0:
            return
        step = max(1, self.tilde.chunk_elements // max(n, w))  # rows per chunk, on both sides
        for part_tilde, part in zip(tilde_rows.split(step), rows.split(step)):
            (t,), (x,) = self.tilde.shifted_chunks(part_tilde), self.original.shifted_chunks(part)
            if t.dtype != x.dtype:  # one float64 side: the product in float64
                t, x = t.double(), x.double()
            stage = self._stage
            if stage is None or stage.device != t.device or stage.dtype != t.dtype:
                self._promote()
                stage = self._stage = t.new_zeros(self.tilde.features, self.original.features)
            stage.addmm_(t.T, x)  # staged in the work dtype, summed in float64 (see stats.py)
            self._staged_rows += t.shape[0]
            home = self.tilde.shift.device
            if self._staged_rows >= CovarianceStats.stage_rows or stage.device != home:
                self._promote()

    def is_finite(self) -> bool:
        if self._frozen is not None:
            return self._frozen.is_finite()
        return (
            self.tilde.is_finite()
            and self.original.is_finite()
            and bool(torch.isfinite(self.sum_cross).all())
        )

    @property
    def mean_tilde(self) -> Tensor:
        return self._frozen.mean_tilde if self._frozen is not None else self.tilde.mean

    @property
    def mean(self) -> Tensor:
        return self._frozen.mean if self._frozen is not None else self.original.mean

    @property
    def covariance_tilde(self) -> Tensor:
        return self._frozen.covariance_tilde if self._frozen is not None else self.tilde.covariance

    @property
    def covariance(self) -> Tensor:
        return self._frozen.covariance if self._frozen is not None else self.original.covariance

    @property
    def cross(self) -> Tensor:
        """``E[(x~ - E x~)(x - E x)^T]``, ``(n, w)`` float64."""
        if self._frozen is not None:
            return self._frozen.cross
        n = self.count
        return self.sum_cross / n - torch.outer(self.tilde.sum / n, self.original.sum / n)

    @classmethod
    @torch.no_grad()
    def all_reduce(
        cls,
        stats: CrossStats | None,
        features: int,
        device: torch.device,
        original_features: int | None = None,
    ) -> CrossStats:
        """A new accumulator holding the pairs of every rank of the default process group, both
        sides and the cross sum about the global means (``stats`` is left unchanged; ``None``:
        this rank saw no pairs; ``original_features`` as in the constructor).

        Collective, like :meth:`CovarianceStats.all_reduce
        <torch_lowrank.stats.CovarianceStats.all_reduce>`.
        """
        held = stats is not None and stats.count > 0
        width = original_features or features
        out = cls(features, original_features=width)
        out.tilde = CovarianceStats.all_reduce(stats.tilde if held else None, features, device)
        out.original = CovarianceStats.all_reduce(stats.original if held else None, width, device)
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
            cross = torch.zeros(features, width, dtype=torch.float64, device=device)
        dist.all_reduce(cross)
        out.sum_cross = cross
        return out
