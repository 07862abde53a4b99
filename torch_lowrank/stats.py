"""Streaming statistics of a layer's inputs.

Every sample row ``x`` (one token of a Linear layer, one receptive-field patch of a conv) adds to

    sum (x - s),   sum (x - s)(x - s)^T,   and the count N,

where the shift ``s`` is the mean of the first batch. Accumulating about a shift instead of about
zero keeps the covariance accurate when the mean is large compared to the spread (the textbook
"shifted data" algorithm). Batch products run in float32 (float64 for float64 inputs) and add up in
a stage of that dtype for at most ``stage_rows`` (8,192) rows; the running sums are float64, so
millions of rows and float16/bfloat16 activations lose nothing. The sums live on the device of
the rows they are fed, and ``merge_`` adds two accumulators exactly.

The accumulator is a plain object, not a buffer: it is never part of a ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ._grad import no_grad

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
        self._sum: Tensor | None = None  # (n,) float64, sum of (x - shift)
        self._sum_sq: Tensor | None = None  # (n, n) float64, sum of (x - shift)(x - shift)^T
        self._shift_work: Tensor | None = None  # the shift in the work dtype, on the rows' device
        self._waiting: Tensor | None = None  # (rows, n) float32: small shifted batches that
        self._pending_rows = 0  # wait in its first rows for one product together
        self._stage: Tensor | None = None  # (n, n) products in the work dtype, not yet in _sum_sq
        self._staged_rows = 0

    @property
    def sum(self) -> Tensor | None:
        """``sum (x - shift)``, ``(n,)`` float64 (``None`` before any row)."""
        self._settle()
        return self._sum

    @sum.setter
    def sum(self, value: Tensor | None) -> None:
        self._settle()
        self._sum = value

    @property
    def sum_sq(self) -> Tensor | None:
        """``sum (x - shift)(x - shift)^T``, ``(n, n)`` float64 (``None`` before any row)."""
        self._settle()
        return self._sum_sq

    @sum_sq.setter
    def sum_sq(self, value: Tensor | None) -> None:
        self._settle()
        self._sum_sq = value

    def _settle(self) -> None:
        """Bring every waiting row and staged product into the float64 sums."""
        self._flush()
        self._promote()

    @property
    def _batch_rows(self) -> int:
        """Batches of fewer rows wait for company: one product over about this many rows runs
        near the matmul's full speed, one per small batch does not. The wait holds at most
        1,024 rows of float32: from 512 features on no more memory than the ``n x n`` float64
        sums themselves, and at most 2 MiB below that."""
        n = self.features
        return max(1, min(1024, max(2 * n, self.chunk_elements // n)))

    def _flush(self) -> None:
        if not self._pending_rows:
            return
        x = self._waiting[: self._pending_rows]
        self._pending_rows = 0
        self._add_rows(x)

    def _add_rows(self, x: Tensor) -> None:
        """Add shifted rows ``(k, n)`` in the work dtype: their sum (taken in that dtype) to the
        float64 ``_sum``, their product to the stage."""
        self._sum += x.sum(0).to(self._sum.device, torch.float64)
        self._add_product(x)

    def _wait_slot(self, count: int, device: torch.device) -> Tensor:
        """``count`` free rows of the waiting buffer (flushing it first when they do not fit)."""
        if self._waiting is None or self._waiting.device != device:
            self._flush()
            self._waiting = torch.empty(
                self._batch_rows, self.features, dtype=torch.float32, device=device
            )
        if self._pending_rows + count > self._waiting.shape[0]:
            self._flush()
        start = self._pending_rows
        self._pending_rows += count
        return self._waiting[start : start + count]

    #: Batch products accumulate in a ``(n, n)`` stage in the work dtype (``addmm_`` adds them
    #: as it multiplies) and move to the float64 sums every this many rows and whenever the
    #: sums are read: one float64 pass per stage instead of one per product.
    stage_rows: int = 8192
    #: From this width on the products form only their upper triangle of blocks (several
    #: matmuls instead of one: slower below it on 2 CPU cores, measured in 2026-11).
    symmetric_from: int = 192
    #: The number of column blocks of a symmetric product: ``b`` blocks form ``(b + 1) / 2b`` of
    #: the full product (5/8 for 4). Four was fastest from 192 to 2,048 features on 2 CPU cores
    #: (2026-11): 0.66 to 0.84 of the time of the full product, against 0.77 to 0.92 for two.
    symmetric_blocks: int = 4

    def _block_edges(self) -> list[int]:
        n, b = self.features, self.symmetric_blocks
        return [n * i // b for i in range(b + 1)]

    def _add_product(self, x: Tensor) -> None:
        """``sum_sq += x^T x``, through the stage. The product is symmetric: from
        :attr:`symmetric_from` features on, the columns are cut into
        :attr:`symmetric_blocks` blocks ``x = [x_1 ... x_b]`` and only the block rows
        ``x_i^T [x_i ... x_b]`` on and above the diagonal are formed (the blocks below it are
        filled from their mirror images when the stage is promoted)."""
        n = self.features
        if self._stage is None or self._stage.device != x.device or self._stage.dtype != x.dtype:
            self._promote()
            self._stage = torch.zeros(n, n, dtype=x.dtype, device=x.device)
        stage = self._stage
        if n < self.symmetric_from:
            stage.addmm_(x.T, x)
        else:
            edges = self._block_edges()
            for lo, hi in zip(edges[:-1], edges[1:]):
                stage[lo:hi, lo:].addmm_(x[:, lo:hi].T, x[:, lo:])
        self._staged_rows += x.shape[0]
        # sums kept off the rows' device (``store``) promote at once: no stage stays there
        if self._staged_rows >= self.stage_rows or stage.device != self._sum_sq.device:
            self._promote()

    def _promote(self) -> None:
        """Add the staged products to the float64 ``_sum_sq`` and clear the stage."""
        if not self._staged_rows:
            return
        stage = self._stage
        if self.features >= self.symmetric_from:  # mirror the blocks above the diagonal
            edges = self._block_edges()
            for lo, hi in zip(edges[1:-1], edges[2:]):
                stage[lo:hi, :lo] = stage[:lo, lo:hi].T
        self._sum_sq.add_(stage.to(self._sum_sq.device))  # float64 += float32: no float64 copy
        self._staged_rows = 0
        if stage.device == self._sum_sq.device:
            stage.zero_()
        else:
            self._stage = None

    @property
    def device(self) -> torch.device | None:
        """The device the sums live on (``None`` before the first batch)."""
        return None if self.shift is None else self.shift.device

    @property
    def nbytes(self) -> int:
        """Memory held by the running sums, in bytes."""
        if self._sum_sq is None:
            return 0
        held = [self.shift, self._sum, self._sum_sq]
        held += [t for t in (self._waiting, self._stage) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    @no_grad
    def update(self, rows: Tensor) -> None:
        """Add a batch of rows ``(N, n)`` to the sums.

        Any ``(..., n)`` view is taken as its rows, so a conv's output ``(B, H, W, C)`` (a
        ``movedim`` view) needs no copy of its own: the shift is subtracted straight into the
        row layout, a chunk of at most :attr:`chunk_elements` elements at a time.
        """
        for _ in self._shifted_chunks(rows, defer=True):
            pass

    #: Rows are shifted and multiplied in chunks of at most this many elements (4 MiB of
    #: float32): a small scratch tensor is reused by the allocator, a large one costs fresh
    #: pages on every batch.
    chunk_elements: int = 1 << 20

    def _check(self, rows: Tensor) -> None:
        if rows.dim() < 2 or rows.shape[-1] != self.features:
            raise ValueError(
                f"expected rows of shape (N, {self.features})\nbut got shape {tuple(rows.shape)}"
            )
        if self.shift is not None and self.store is None and rows.device != self.shift.device:
            raise ValueError(
                f"calibration rows arrived on {rows.device}\n"
                f"but the statistics live on {self.shift.device}; keep the model on one device"
            )

    def _shifted_chunks(self, rows: Tensor, defer: bool = False) -> Iterator[Tensor]:
        """Add ``rows`` to the sums chunk by chunk, yielding each chunk shifted, ``(k, n)`` in
        the work dtype (float32, or float64 for float64 rows). ``defer`` lets a small chunk
        wait for the next ones before its product (see :attr:`_batch_rows`)."""
        self._check(rows)
        if rows.numel() == 0:
            return
        work = torch.float64 if rows.dtype == torch.float64 else torch.float32
        rows = rows.detach()
        if self.shift is None:
            leading = tuple(range(rows.dim() - 1))  # any centre near the mean will do
            self.shift = rows.mean(leading, dtype=work).to(self.store or rows.device, torch.float64)
            self._sum = torch.zeros_like(self.shift)
            self._sum_sq = torch.zeros(
                self.features, self.features, dtype=torch.float64, device=self.shift.device
            )
        shift = self._shift_work
        if shift is None or shift.device != rows.device or shift.dtype != work:
            shift = self._shift_work = self.shift.to(rows.device, work)
        step = max(1, self.chunk_elements // (rows.numel() // rows.shape[0]))
        wait_below = self._batch_rows if defer and work == torch.float32 else 0
        for part in (rows,) if rows.shape[0] <= step else rows.split(step):
            count = part.numel() // self.features
            wait = count < wait_below
            if wait:  # shifted straight into the waiting buffer
                x = self._wait_slot(count, rows.device)
            else:
                x = torch.empty(count, self.features, dtype=work, device=rows.device)
            # one pass: cast, shift, row layout (a view of x in the shape of a (B, H, W, C) part)
            torch.sub(part, shift, out=x if part.dim() == 2 else x.view(part.shape))
            self.count += count
            if not wait:
                self._add_rows(x)
            elif self._pending_rows == self._waiting.shape[0]:
                self._flush()
            yield x

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
            self._shift_work = None
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

    @no_grad
    def update(self, tilde_rows: Tensor, rows: Tensor) -> None:
        """Add paired batches ``(N, n)``: row ``i`` of both comes from the same sample."""
        if tilde_rows.shape != rows.shape:
            raise ValueError(
                f"expected paired rows of one shape\n"
                f"but got {tuple(tilde_rows.shape)} and {tuple(rows.shape)}"
            )
        self.tilde._check(tilde_rows)  # both sides first: a bad batch adds nothing
        self.original._check(rows)
        pairs = zip(self.tilde._shifted_chunks(tilde_rows), self.original._shifted_chunks(rows))
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
