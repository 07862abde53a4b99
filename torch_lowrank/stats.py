"""Streaming statistics of a layer's inputs.

Every sample row ``x`` (one token of a Linear layer, one receptive-field patch of a conv) adds to

    sum (x - s),   sum (x - s)(x - s)^T,   and the count N,

where the shift ``s`` is the mean of the first batch. Accumulating about a shift instead of about
zero keeps the covariance accurate when the mean is large compared to the spread (the textbook
"shifted data" algorithm). Batch products run in float32 (float64 for float64 inputs) and add up in
a stage of that dtype for at most ``stage_rows`` (8,192) rows; the running sums are float64, so
millions of rows and float16/bfloat16 activations lose nothing. The sums live on the device of
the rows they are fed. Sums merge exactly once re-centred on a common shift
(:func:`shifted_product`): ``merge_`` adds two accumulators, and ``all_reduce`` sums the
accumulators of every ``torch.distributed`` rank about their global mean.

The accumulator is a plain object, not a buffer: it is never part of a ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from ._grad import no_grad
from .eigen import symmetrise_

__all__ = ["CovarianceStats", "shifted_product"]


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
    #: From this width on the products form only their upper triangle of blocks: several
    #: matmuls instead of one, which cost more than they save on narrower rows.
    symmetric_from: int = 192
    #: The number of column blocks of a symmetric product: ``b`` blocks form ``(b + 1) / 2b`` of
    #: the full product (5/8 for 4). Four take less time than two from 192 to 2,048 features:
    #: the smaller share outweighs the extra matmuls.
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
        for _ in self.shifted_chunks(rows, defer=True):
            pass

    #: Rows are shifted and multiplied in chunks of at most this many elements (4 MiB of
    #: float32): a small scratch tensor is reused by the allocator, a large one costs fresh
    #: pages on every batch.
    chunk_elements: int = 1 << 20

    def check_rows(self, rows: Tensor) -> None:
        """Raise ``ValueError`` for rows that are not ``(..., n)`` or not on the sums' device."""
        if rows.dim() < 2 or rows.shape[-1] != self.features:
            raise ValueError(
                f"expected rows of shape (N, {self.features})\nbut got shape {tuple(rows.shape)}"
            )
        if self.shift is not None and self.store is None and rows.device != self.shift.device:
            raise ValueError(
                f"calibration rows arrived on {rows.device}\n"
                f"but the statistics live on {self.shift.device}; keep the model on one device"
            )

    def shifted_chunks(self, rows: Tensor, defer: bool = False) -> Iterator[Tensor]:
        """Add ``rows`` to the sums chunk by chunk, yielding each chunk shifted, ``(k, n)`` in
        the work dtype (float32, or float64 for float64 rows). ``defer`` lets a small chunk
        wait for the next ones before its product (see :attr:`_batch_rows`)."""
        self.check_rows(rows)
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

    def take_covariance(self) -> Tensor:
        """:attr:`covariance`, computed in the memory of the sums, which are given up: the
        accumulator is empty afterwards (no second ``n x n`` float64 copy, for large layers)."""
        self._require_data()
        cov = self.sum_sq.div_(self.count).addr_(self.sum, self.sum, alpha=-1.0 / self.count**2)
        self.__init__(self.features, self.store)
        return symmetrise_(cov)

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
        total, sum_sq = other.sums_about(self.shift)
        self.sum_sq += sum_sq
        self.sum += total
        self.count += other.count
        return self

    def sums_about(self, centre: Tensor) -> tuple[Tensor, Tensor]:
        """``(sum (x - c), sum (x - c)(x - c)^T)`` over the rows, for ``c = centre``: the sums
        re-centred from the shift, float64 on ``centre``'s device (zeros before any row).

        Example:
            >>> stats = CovarianceStats(2)
            >>> stats.update(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
            >>> total, sum_sq = stats.sums_about(stats.mean)
            >>> total.tolist(), sum_sq.tolist()
            ([0.0, 0.0], [[2.0, 4.0], [4.0, 8.0]])
        """
        if self.count == 0:
            return centre.new_zeros(self.features), centre.new_zeros(self.features, self.features)
        delta = self.shift.to(centre.device) - centre
        total = self.sum.to(centre.device)
        sum_sq = self.sum_sq.to(centre.device)
        sum_sq = shifted_product(sum_sq, self.count, total, delta, total, delta)
        return total + self.count * delta, sum_sq

    @classmethod
    @torch.no_grad()
    def all_reduce(
        cls, stats: CovarianceStats | None, features: int, device: torch.device
    ) -> CovarianceStats:
        """A new accumulator holding the rows of every rank of the default process group,
        summed about their global mean (``stats`` is left unchanged; ``None``: this rank saw no
        rows). N ranks that each saw a shard give the statistics of all the rows, to rounding.

        Collective: every rank must call it, in the same order. The sums travel on the device
        of ``stats``; ``device`` is where a rank without rows makes its zeros.
        """
        local = cls(features) if stats is None else stats
        if local.count:
            total = local.shift * local.count + local.sum  # sum x
        else:
            total = torch.zeros(features, dtype=torch.float64, device=device)
        packed = torch.cat([total, total.new_tensor([float(local.count)])])
        dist.all_reduce(packed)
        out = cls(features)
        count = int(round(packed[-1].item()))
        if count == 0:
            return out
        mean = packed[:-1] / count
        total, sum_sq = local.sums_about(mean)
        packed = torch.cat([total, sum_sq.flatten()])
        dist.all_reduce(packed)
        out.count, out.shift = count, mean
        out.sum, out.sum_sq = packed[:features], packed[features:].view_as(sum_sq)
        return out


def shifted_product(
    product: Tensor, count: int, sum_a: Tensor, delta_a: Tensor, sum_b: Tensor, delta_b: Tensor
) -> Tensor:
    """``sum (a - c_a)(b - c_b)^T`` over ``count`` pairs of rows, from ``product``, ``sum_a``
    and ``sum_b``, the sums about shifts ``s_a`` and ``s_b``, and ``delta = s - c`` for each
    side: ``a - c_a = (a - s_a) + delta_a``. A new tensor.

    Example:
        >>> a = torch.tensor([[1.0], [3.0]], dtype=torch.float64)  # about s = 0, to c = 2
        >>> delta = torch.tensor([-2.0], dtype=torch.float64)
        >>> shifted_product(a.T @ a, 2, a.sum(0), delta, a.sum(0), delta).item()
        2.0
    """
    return (
        product
        + torch.outer(sum_a, delta_b)
        + torch.outer(delta_a, sum_b)
        + count * torch.outer(delta_a, delta_b)
    )
