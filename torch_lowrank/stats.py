"""Streaming statistics of a layer's inputs.

Every sample row ``x`` (one token of a Linear layer, one receptive-field patch of a conv) adds to

    sum (x - s),   sum (x - s)(x - s)^T,   and the count N,

where the shift ``s`` is the mean of the first batch. Accumulating about a shift instead of about
zero keeps the covariance accurate when the mean is large compared to the spread (the textbook
"shifted data" algorithm). Each batch product runs in float32 (float64 for float64 inputs) and the
running sums are float64, so millions of rows and float16/bfloat16 activations lose nothing. The
sums live on the device of the rows they are fed, and ``merge_`` adds two accumulators exactly.

The accumulator is a plain object, not a buffer: it is never part of a ``state_dict``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CovarianceStats", "CrossStats"]


class CovarianceStats:
    r"""Streaming mean and covariance of sample rows of width ``features``.

    Args:
        features: the width ``n`` of every row.
        store: where the running sums live (e.g. ``"cpu"`` to keep a GPU layer's statistics in
            host memory); ``None``: on the device of the first batch. Each batch product is
            computed on the rows' own device either way.

    Shape:
        - rows passed to :meth:`update`: :math:`(N, n)`.
        - :attr:`mean`: :math:`(n,)`, :attr:`covariance` and :attr:`second_moment`: :math:`(n, n)`,
          all float64 on the device of the first batch.

    Example:
        >>> stats = CovarianceStats(3)
        >>> stats.update(torch.randn(100, 3))
        >>> stats.update(torch.randn(50, 3))
        >>> stats.count, tuple(stats.covariance.shape)
        (150, (3, 3))
    """

    def __init__(self, features: int, store: str | torch.device | None = None) -> None:
        self.features = features
        self.store = None if store is None else torch.device(store)
        self.count = 0
        self.shift: Tensor | None = None  # (n,) float64
        self.sum: Tensor | None = None  # (n,) float64, sum of (x - shift)
        self.sum_sq: Tensor | None = None  # (n, n) float64, sum of (x - shift)(x - shift)^T

    @property
    def device(self) -> torch.device | None:
        """The device the sums live on (``None`` before the first batch)."""
        return None if self.shift is None else self.shift.device

    @property
    def nbytes(self) -> int:
        """Memory held by the running sums, in bytes."""
        if self.sum_sq is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.shift, self.sum, self.sum_sq))

    @torch.no_grad()
    def update(self, rows: Tensor) -> None:
        """Add a batch of rows ``(N, n)`` to the sums."""
        if rows.dim() != 2 or rows.shape[1] != self.features:
            raise ValueError(
                f"expected rows of shape (N, {self.features})\nbut got shape {tuple(rows.shape)}"
            )
        if rows.shape[0] == 0:
            return
        work = torch.float64 if rows.dtype == torch.float64 else torch.float32
        x = rows.detach().to(work)
        if self.shift is None:
            self.shift = x.mean(0, dtype=torch.float64).to(self.store or x.device)
            self.sum = torch.zeros_like(self.shift)
            self.sum_sq = torch.zeros(
                self.features, self.features, dtype=torch.float64, device=self.shift.device
            )
        elif self.store is None and x.device != self.shift.device:
            raise ValueError(
                f"calibration rows arrived on {x.device}\n"
                f"but the statistics live on {self.shift.device}; keep the model on one device"
            )
        x = x - self.shift.to(x.device, work)
        home = self.shift.device
        self.sum += x.sum(0, dtype=torch.float64).to(home)
        self.sum_sq += (x.T @ x).to(home, torch.float64)  # batch product in float32, sum in float64
        self.count += x.shape[0]

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError("no rows have been accumulated")

    @property
    def mean(self) -> Tensor:
        """The mean row, ``(n,)`` float64."""
        self._require_data()
        return self.shift + self.sum / self.count

    @property
    def covariance(self) -> Tensor:
        """The (biased, ``1/N``) covariance, ``(n, n)`` float64, exactly symmetric."""
        self._require_data()
        d = self.sum / self.count
        cov = self.sum_sq / self.count - torch.outer(d, d)
        return (cov + cov.T) / 2

    @property
    def second_moment(self) -> Tensor:
        """The uncentred second moment ``(1/N) sum x x^T``, ``(n, n)`` float64."""
        mean = self.mean
        return self.covariance + torch.outer(mean, mean)

    def is_finite(self) -> bool:
        """Whether every accumulated sum is finite (a NaN or Inf row makes them non-finite)."""
        return self.count > 0 and bool(
            torch.isfinite(self.sum_sq).all() & torch.isfinite(self.sum).all()
        )

    @torch.no_grad()
    def merge_(self, other: CovarianceStats) -> CovarianceStats:
        """Add the rows of ``other`` to this accumulator, exactly; returns ``self``.

        Example:
            >>> a, b, both = CovarianceStats(2), CovarianceStats(2), CovarianceStats(2)
            >>> x = torch.randn(10, 2, dtype=torch.float64)
            >>> a.update(x[:4]); b.update(x[4:]); both.update(x)
            >>> torch.allclose(a.merge_(b).covariance, both.covariance)
            True
        """
        if other.features != self.features:
            raise ValueError(
                f"cannot merge statistics of width {other.features} into {self.features}"
            )
        if other.count == 0:
            return self
        if self.count == 0:
            self.shift, self.sum, self.sum_sq = (
                t.clone() for t in (other.shift, other.sum, other.sum_sq)
            )
            self.count = other.count
            return self
        # Re-centre other's sums from its shift to ours: x - s = (x - t) + (t - s).
        delta = other.shift.to(self.shift.device) - self.shift
        o_sum = other.sum.to(self.shift.device)
        cross = torch.outer(o_sum, delta)
        self.sum_sq += (
            other.sum_sq.to(self.shift.device)
            + cross
            + cross.T
            + other.count * torch.outer(delta, delta)
        )
        self.sum += o_sum + other.count * delta
        self.count += other.count
        return self


class CrossStats:
    r"""Streaming moments of paired rows ``(x~, x)``: what the compressed network and the original
    network feed one layer on the same samples (corrective recovery, DESIGN section 2).

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

    @torch.no_grad()
    def update(self, tilde_rows: Tensor, rows: Tensor) -> None:
        """Add paired batches ``(N, n)``: row ``i`` of both comes from the same sample."""
        if tilde_rows.shape != rows.shape:
            raise ValueError(
                f"expected paired rows of one shape\n"
                f"but got {tuple(tilde_rows.shape)} and {tuple(rows.shape)}"
            )
        self.tilde.update(tilde_rows)
        self.original.update(rows)
        work = torch.float64 if rows.dtype == torch.float64 else torch.float32
        t = tilde_rows.detach().to(work) - self.tilde.shift.to(tilde_rows.device, work)
        x = rows.detach().to(work) - self.original.shift.to(rows.device, work)
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
