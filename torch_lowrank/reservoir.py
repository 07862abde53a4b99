"""A bounded uniform random sample of the rows a layer sees.

The activation-aware objectives of DESIGN section 2 (the ReLU objective of Zhang & Saab,
arXiv 2502.02766, Theorem 3) need sample rows, not only the covariance, so every layer keeps a
reservoir of at most ``capacity`` of its input rows, sampled uniformly without replacement from
everything it was fed.

Every row gets an independent uniform random key and the reservoir keeps the ``capacity`` rows
with the largest keys (Efraimidis and Spirakis, "Weighted random sampling with a reservoir", 2006,
with equal weights). The kept set is a uniform sample of the rows seen, whatever the batch sizes,
and two reservoirs merge *exactly*: the top ``capacity`` keys of the union are a uniform sample of
the union, which is what calibration split across processes needs.

Rows are built only when they can enter (:meth:`Reservoir.offer`): a batch's keys are drawn
first, a full reservoir screens them against its smallest kept key, and a batch of millions of
conv patches costs one key per position and at most ``capacity`` patches built. Candidates of a
full reservoir wait and are merged half the capacity at a time.

Keys come from :func:`torch.rand` (the global generator, on the rows' device), so results are
reproducible under :func:`torch.manual_seed`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Reservoir"]


class Reservoir:
    r"""A uniform random sample, without replacement, of at most ``capacity`` rows.

    Rows stay on the device they arrive on and are stored in float32 (float64 when the input is
    float64; float16 and bfloat16 are cast up). The width is fixed by the first batch.

    Args:
        capacity: the most rows kept, ``>= 1``.
        store: where the kept rows live (e.g. ``"cpu"`` to keep a GPU layer's sample in host
            memory); ``None``: on the device the rows arrive on. Rows are screened on their
            own device and only candidates are copied.

    Shape:
        - rows passed to :meth:`update`: :math:`(N, w)`.
        - :attr:`rows`: :math:`(\min(\text{count}, \text{capacity}), w)`, in random order.

    Raises:
        ValueError: for a capacity below 1, and (in :meth:`update` / :meth:`merge_`) for rows of
            the wrong width, dimension or device.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> sample = Reservoir(100)
        >>> for _ in range(10):
        ...     sample.update(torch.randn(64, 8))
        >>> sample.count, tuple(sample.rows.shape)
        (640, (100, 8))
    """

    def __init__(self, capacity: int, store: str | torch.device | None = None) -> None:
        try:
            size = -1 if isinstance(capacity, bool) else operator.index(capacity)
        except TypeError:
            size = -1
        if size < 1:
            raise ValueError(f"expected a capacity that is an integer >= 1\nbut got {capacity!r}")
        self.capacity = size
        self.store = None if store is None else torch.device(store)  # where kept rows live
        self.features: int | None = None  # the row width, fixed by the first batch
        self._count = 0
        # storage for the kept rows (float32 or float64) and their float64 keys: the first
        # ``_size`` entries are kept; it grows by doubling up to ``capacity``
        self._rows: Tensor | None = None
        self._keys: Tensor | None = None
        self._size = 0
        self._pending: list[tuple[Tensor, Tensor]] = []  # screened (rows, keys) not yet merged
        self._pending_count = 0
        self._threshold: Tensor | None = None  # the smallest kept key of a full reservoir

    @property
    def count(self) -> int:
        """The number of rows seen (fed to :meth:`update` or merged in).

        Example:
            >>> sample = Reservoir(2)
            >>> sample.update(torch.zeros(5, 3))
            >>> sample.count
            5
        """
        return self._count

    @property
    def rows(self) -> Tensor:
        """The kept rows, ``(min(count, capacity), w)``; ``(0, 0)`` before the width is known.

        Example:
            >>> sample = Reservoir(4)
            >>> sample.update(torch.arange(6.0).reshape(3, 2))
            >>> sorted(sample.rows[:, 0].tolist())
            [0.0, 2.0, 4.0]
        """
        self._flush()
        if self._rows is None:
            return torch.empty(0, self.features or 0)
        return self._rows[: self._size]

    @property
    def keys(self) -> Tensor:
        """The random keys of the kept rows, ``(min(count, capacity),)`` float64, row by row."""
        self._flush()
        if self._keys is None:
            return torch.empty(0, dtype=torch.float64)
        return self._keys[: self._size]

    @classmethod
    def from_sample(cls, capacity: int, rows: Tensor, keys: Tensor, count: int) -> Reservoir:
        """A reservoir holding an existing sample: ``rows`` with their ``keys``, drawn from
        ``count`` rows seen (e.g. a sample received from another process, to :meth:`merge_`).

        Example:
            >>> keys = torch.rand(2, dtype=torch.float64)
            >>> part = Reservoir.from_sample(4, torch.ones(2, 3), keys, 2)
            >>> part.count, tuple(part.rows.shape)
            (2, (2, 3))
        """
        sample = cls(capacity)
        sample.features = rows.shape[1]
        sample._count = count
        if rows.shape[0]:
            sample._keep(rows, keys)
        return sample

    @property
    def nbytes(self) -> int:
        """Memory held by the kept rows and their keys, in bytes.

        Example:
            >>> sample = Reservoir(10)
            >>> sample.update(torch.randn(3, 4, dtype=torch.float16))
            >>> sample.nbytes  # 3 rows of 4 float32 + 3 float64 keys
            72
        """
        if self._rows is None:
            return 0
        held = [self._rows, self._keys, *(t for pair in self._pending for t in pair)]
        return sum(t.numel() * t.element_size() for t in held)

    def _check_rows(self, rows: Tensor) -> None:
        if rows.dim() != 2 or (self.features is not None and rows.shape[1] != self.features):
            width = "w" if self.features is None else str(self.features)
            raise ValueError(
                f"expected rows of shape (N, {width})\nbut got shape {tuple(rows.shape)}"
            )
        if self.store is None and self._rows is not None and rows.device != self._rows.device:
            raise ValueError(
                f"expected rows on {self._rows.device}, where the reservoir lives\n"
                f"but got rows on {rows.device}"
            )

    def _keep(self, rows: Tensor, keys: Tensor) -> None:
        """Keep the top-``capacity`` keys of the kept rows together with ``(rows, keys)``, the
        screened candidates (:meth:`offer` builds at most ``capacity`` rows per batch)."""
        work = torch.float64 if rows.dtype == torch.float64 else torch.float32
        if self._rows is not None and self._rows.dtype != work:
            work = torch.float64  # float32 and float64 batches mixed: keep the precision
            self._rows = self._rows.to(work)
        take = min(self.capacity - self._size, rows.shape[0])
        if take > 0:  # fill up first; what does not fit then competes for the kept slots
            self._reserve(self._size + take, rows.shape[1], work, rows.device)
            self._rows[self._size : self._size + take] = rows[:take]
            self._keys[self._size : self._size + take] = keys[:take]
            self._size += take
            rows, keys = rows[take:], keys[take:]
            self._threshold = None
        if keys.shape[0]:
            self._replace(rows, keys, work)

    def _reserve(self, size: int, width: int, dtype: torch.dtype, device: torch.device) -> None:
        """Storage for at least ``size`` kept rows: doubling, so filling up copies each kept
        row at most about twice, and never more than ``capacity`` rows."""
        held = 0 if self._rows is None else self._rows.shape[0]
        if size <= held:
            return
        length = min(self.capacity, max(size, 2 * held))
        rows = torch.empty(length, width, dtype=dtype, device=device)
        keys = torch.empty(length, dtype=torch.float64, device=device)
        if self._size:
            rows[: self._size] = self._rows[: self._size]
            keys[: self._size] = self._keys[: self._size]
        self._rows, self._keys = rows, keys

    def _flush(self) -> None:
        """Merge the screened candidates waiting in ``_pending`` (see :meth:`offer`)."""
        if not self._pending:
            return
        rows = torch.cat([r for r, _ in self._pending])
        keys = torch.cat([k for _, k in self._pending])
        self._pending, self._pending_count = [], 0
        self._keep(rows, keys)

    def _replace(self, rows: Tensor, keys: Tensor, work: torch.dtype) -> None:
        """A full reservoir: the ``k`` new keys can only displace the ``k`` smallest kept ones,
        so those slots are overwritten in place (nothing else is copied)."""
        k = keys.shape[0]
        if k < self.capacity:
            # the k-th smallest key of the union splits it: kept keys at or below it leave,
            # new keys above it enter (as many, since random float64 keys do not tie)
            cut = torch.kthvalue(torch.cat([self._keys, keys]), k).values
            slots = torch.nonzero(self._keys <= cut).squeeze(1)
            chosen = torch.nonzero(keys > cut).squeeze(1)
            if slots.shape[0] == chosen.shape[0]:
                self._rows.index_copy_(0, slots, rows.index_select(0, chosen).to(work))
                self._keys.index_copy_(0, slots, keys.index_select(0, chosen))
                self._threshold = None
                return
        low = torch.topk(self._keys, min(k, self.capacity), largest=False).indices
        pool = torch.cat([self._keys[low], keys])
        winners = torch.topk(pool, low.shape[0]).indices
        from_new = winners >= low.shape[0]
        lost = torch.ones(low.shape[0], dtype=torch.bool, device=low.device)
        lost[winners[~from_new]] = False
        slots, chosen = low[lost], winners[from_new] - low.shape[0]
        self._rows[slots] = rows[chosen].to(work)
        self._keys[slots] = keys[chosen]
        self._threshold = None

    @torch.no_grad()
    def update(self, rows: Tensor) -> None:
        """Offer a batch of rows ``(N, w)``; each one is kept with the right probability.

        Example:
            >>> sample = Reservoir(3)
            >>> sample.update(torch.randn(2, 5))
            >>> sample.update(torch.randn(7, 5))
            >>> sample.count, tuple(sample.rows.shape)
            (9, (3, 5))
        """
        self._check_rows(rows)
        if self.features is None:
            self.features = rows.shape[1]
        rows = rows.detach()
        self.offer(
            rows.shape[0],
            lambda index: rows if index is None else rows.index_select(0, index),
            rows.device,
        )

    @torch.no_grad()
    def offer(
        self,
        count: int,
        rows_at: Callable[[Tensor], Tensor],
        device: str | torch.device = "cpu",
    ) -> None:
        """Offer ``count`` rows that are only built if they can enter the sample.

        Every row gets its key first; ``rows_at(index)`` is then called once, with the
        positions (a ``LongTensor`` on ``device``) of at most ``capacity`` rows that can still
        enter, or ``None`` when all ``count`` rows can, and must return those rows
        ``(len(index), w)`` (they are copied before ``offer`` returns). A conv offers its output
        positions this way and builds only the chosen patches.

        Example:
            >>> _ = torch.manual_seed(0)
            >>> sample, built = Reservoir(4), []
            >>> table = torch.arange(2000.0).reshape(1000, 2)
            >>> sample.offer(1000, lambda index: built.append(len(index)) or table[index])
            >>> sample.count, tuple(sample.rows.shape), built
            (1000, (4, 2), [4])
        """
        if count == 0:
            return
        device = torch.device(device)
        if self.store is None and self._rows is not None and device != self._rows.device:
            raise ValueError(
                f"expected rows on {self._rows.device}, where the reservoir lives\n"
                f"but got rows on {device}"
            )
        keys = torch.rand(count, device=device, dtype=torch.float64)
        full = self._size >= self.capacity
        if full:
            # A row whose key is below the smallest kept key can never enter: screen first.
            # The threshold may lag behind the waiting candidates; a lower one only lets more in.
            if self._threshold is None or self._threshold.device != device:
                self._threshold = self._keys.min().to(device)
            index = torch.nonzero(keys > self._threshold).squeeze(1)
        elif count > self.capacity:  # only the batch's own top keys can enter
            index = torch.topk(keys, self.capacity).indices
        else:
            index = None  # all of them
        rows = rows_at(index).detach() if index is None or index.shape[0] else None
        if rows is not None:
            self._check_rows(rows)
            if self.features is None:
                self.features = rows.shape[1]
        self._count += count
        if rows is None:
            return
        keys = keys if index is None else keys[index]
        if self.store is not None:  # only the candidates travel to the store
            rows, keys = rows.to(self.store), keys.to(self.store)
        if not full:
            self._keep(rows, keys)
            return
        # Candidates of a full reservoir wait and are merged together: one selection per
        # half capacity of them instead of one per batch.
        self._pending.append((rows, keys))
        self._pending_count += rows.shape[0]
        if self._pending_count >= max(1, self.capacity // 2):
            self._flush()

    @torch.no_grad()
    def merge_(self, other: Reservoir) -> Reservoir:
        """Fold ``other`` into this reservoir, exactly; returns ``self``.

        The result is a uniform sample of the union of both inputs, as if every row had been fed
        to one reservoir. ``other`` must have at least this reservoir's capacity (a smaller one
        has already discarded rows that could belong to the sample); it is left unchanged.

        Example:
            >>> a, b = Reservoir(4), Reservoir(4)
            >>> a.update(torch.zeros(10, 2)); b.update(torch.ones(30, 2))
            >>> merged = a.merge_(b)
            >>> merged.count, tuple(merged.rows.shape)
            (40, (4, 2))
        """
        if other is self:
            raise ValueError("expected another reservoir\nbut got the reservoir itself")
        if other.capacity < self.capacity:
            raise ValueError(
                f"expected a reservoir of capacity >= {self.capacity}\n"
                f"but got one of capacity {other.capacity}"
            )
        self._flush()
        other._flush()
        if other._size == 0:
            self._count += other._count
            return self
        if self.features is not None and other.features != self.features:
            raise ValueError(
                f"expected a reservoir of rows of width {self.features}\n"
                f"but got one of width {other.features}"
            )
        device = other._rows.device if self._rows is None else self._rows.device
        self.features = other.features
        self._keep(other.rows.to(device), other.keys.to(device))
        self._count += other._count
        return self
