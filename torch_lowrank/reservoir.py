"""A bounded uniform random sample of the rows a layer sees.

The activation-aware objectives of ``docs/methods.md`` (the ReLU objective of Zhang & Saab,
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
conv patches costs one key per position and at most ``capacity`` patches built.

Storage has ``capacity`` slots plus a quarter as many spare ones. The used slots come first, so a
batch's candidates are gathered straight into the free slots after them (one ``index_select``,
no intermediate copy). When the free slots run out, the rows outside the top ``capacity`` keys
are dropped: kept rows from the spare slots move into the places of dropped ones (at most one
spare's worth of rows), and the spare slots are free again.

Keys come from :func:`torch.rand` (the global generator, on the rows' device), so results are
reproducible under :func:`torch.manual_seed`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from ._grad import no_grad

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
        # slot storage: rows (float32 or float64) and their float64 keys; the first ``_held``
        # slots are in use. It doubles while filling, up to ``capacity`` plus a quarter spares.
        self._rows: Tensor | None = None
        self._keys: Tensor | None = None
        self._held = 0  # the first slots, in use: kept rows and candidates not yet screened
        self._threshold: Tensor | None = None  # the smallest kept key at the last settle

    @property
    def _slots(self) -> int:
        """The most slots the storage may hold: ``capacity`` plus a quarter as many spares."""
        return self.capacity + max(1, self.capacity // 4)

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
        if self._rows is None:
            return torch.empty(0, self.features or 0)
        self._settle()
        return self._rows[: self._held]

    @property
    def keys(self) -> Tensor:
        """The random keys of the kept rows, ``(min(count, capacity),)`` float64, row by row."""
        if self._keys is None:
            return torch.empty(0, dtype=torch.float64)
        self._settle()
        return self._keys[: self._held]

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
            sample._insert(rows, keys)
        return sample

    @property
    def nbytes(self) -> int:
        """Memory held by the storage (rows and keys, spare slots included), in bytes.

        While filling, the storage doubles (at most twice the rows held, 2.5 times on the
        step to full size); once full it has ``capacity`` slots plus a quarter as many spares.

        Example:
            >>> sample = Reservoir(8)
            >>> sample.update(torch.randn(100, 4, dtype=torch.float16))
            >>> sample.nbytes  # 8 + 2 slots, each a row of 4 float32 and a float64 key
            240
        """
        if self._rows is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self._rows, self._keys))

    def _check_rows(self, rows: Tensor) -> None:
        if rows.dim() != 2 or (self.features is not None and rows.shape[1] != self.features):
            width = "w" if self.features is None else str(self.features)
            raise ValueError(
                f"expected rows of shape (N, {width})\nbut got shape {tuple(rows.shape)}"
            )
        self._check_device(rows.device)

    def _insert(self, rows: Tensor, keys: Tensor, index: Tensor | None = None) -> None:
        """Copy candidate rows with their ``keys`` into the free slots, once each: ``rows`` and
        ``keys`` themselves, or ``rows[index]`` and ``keys[index]`` gathered straight into
        place; when the free slots run out, settle first."""
        work = torch.float64 if rows.dtype == torch.float64 else torch.float32
        if self._rows is not None and self._rows.dtype != work:
            work = torch.float64  # float32 and float64 batches mixed: keep the precision
            self._rows = self._rows.to(work)
        place = self.store or rows.device
        start, total = 0, (keys if index is None else index).shape[0]
        while start < total:
            take = min(self._room(total - start, rows.shape[1], work, place), total - start)
            slots = slice(self._held, self._held + take)
            part = slice(start, start + take)
            for source, dest in ((rows, self._rows[slots]), (keys, self._keys[slots])):
                if index is None:
                    dest.copy_(source[part])
                elif source.dtype == dest.dtype and source.device == dest.device:
                    torch.index_select(source, 0, index[part], out=dest)
                else:  # cast, or move to the store: gather on the rows' device first
                    dest.copy_(source.index_select(0, index[part]))
            self._held += take
            start += take

    def _room(self, want: int, width: int, dtype: torch.dtype, device: torch.device) -> int:
        """The number of free slots (at least one), growing or settling to make ``want``."""
        length = 0 if self._keys is None else self._keys.shape[0]
        if length - self._held >= want:
            return length - self._held
        if length < self._slots:  # double; straight to full size once past the capacity
            size = max(self._held + want, 2 * length)
            size = self._slots if size >= self.capacity else size
            rows = torch.empty(size, width, dtype=dtype, device=device)
            keys = torch.empty(size, dtype=torch.float64, device=device)
            if self._held:
                rows[: self._held] = self._rows[: self._held]
                keys[: self._held] = self._keys[: self._held]
            self._rows, self._keys = rows, keys
            length = size
        if length - self._held < want:
            self._settle()
        return length - self._held

    def _settle(self) -> None:
        """Keep the rows of the top ``capacity`` keys in the first ``capacity`` slots and free
        the others; note the smallest kept key as the screening threshold."""
        if self._held < self.capacity:
            return
        keys = self._keys[: self._held]
        if self._held == self.capacity:  # just full: screen against the smallest kept key
            if self._threshold is None:
                self._threshold = keys.min()
            return
        # the (held - capacity)-th smallest key splits the rows and is the new threshold;
        # random float64 keys do not tie, but should they, topk keeps exactly ``capacity``
        cut = torch.kthvalue(keys, self._held - self.capacity).values
        kept = keys > cut
        if int(kept.sum()) != self.capacity:
            kept = torch.zeros_like(kept)
            kept[torch.topk(keys, self.capacity).indices] = True
        # as many kept rows sit past the first ``capacity`` slots as dropped ones before them
        holes = torch.nonzero(~kept[: self.capacity]).squeeze(1)
        movers = torch.nonzero(kept[self.capacity :]).squeeze(1) + self.capacity
        self._rows.index_copy_(0, holes, self._rows.index_select(0, movers))
        self._keys.index_copy_(0, holes, self._keys.index_select(0, movers))
        self._held, self._threshold = self.capacity, cut

    @no_grad
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
        index, keys = self._candidates(rows.shape[0], rows.device)
        self._count += rows.shape[0]
        if index is None or index.shape[0]:
            self._insert(rows, keys, index=index)

    @no_grad
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
        self._check_device(device)
        index, keys = self._candidates(count, device)
        rows = rows_at(index).detach() if index is None or index.shape[0] else None
        if rows is not None:
            self._check_rows(rows)
            if self.features is None:
                self.features = rows.shape[1]
        self._count += count
        if rows is not None:
            self._insert(rows, keys if index is None else keys.index_select(0, index))

    def _check_device(self, device: torch.device) -> None:
        if self.store is None and self._rows is not None and device != self._rows.device:
            raise ValueError(
                f"expected rows on {self._rows.device}, where the reservoir lives\n"
                f"but got rows on {device}"
            )

    def _candidates(self, count: int, device: torch.device) -> tuple[Tensor | None, Tensor]:
        """Draw ``count`` keys on ``device``; return the positions of the rows that can enter
        (``None``: all of them) and all ``count`` keys."""
        keys = torch.rand(count, device=device, dtype=torch.float64)
        if self._held >= self.capacity:
            # A row whose key is below the smallest kept key can never enter: screen first.
            # The threshold dates from the last settle; lagging behind, it only lets more in.
            if self._threshold is None:
                self._settle()
            if self._threshold.device != device:
                self._threshold = self._threshold.to(device)
            index = torch.nonzero(keys > self._threshold).squeeze(1)
            if index.shape[0] > self.capacity:  # only the batch's own top keys can enter
                index = index[torch.topk(keys[index], self.capacity).indices]
        elif count > self.capacity:
            index = torch.topk(keys, self.capacity).indices
        else:
            return None, keys  # all of them
        return index, keys

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
        if other._held == 0:
            self._count += other._count
            return self
        if self.features is not None and other.features != self.features:
            raise ValueError(
                f"expected a reservoir of rows of width {self.features}\n"
                f"but got one of width {other.features}"
            )
        device = other._rows.device if self._rows is None else self._rows.device
        self.features = other.features
        self._insert(other.rows.to(device), other.keys.to(device))
        self._count += other._count
        return self

    @classmethod
    @torch.no_grad()
    def all_reduce(
        cls, reservoir: Reservoir | None, capacity: int, features: int, device: torch.device
    ) -> Reservoir:
        """A new reservoir: the ``capacity`` rows with the largest keys over every rank of the
        default process group, merged with :meth:`merge_` (``reservoir`` is left unchanged;
        ``None``: this rank saw no rows). Seed the ranks differently so that their keys are
        independent. Rows are float64 if any rank's are.

        Collective: every rank must call it, in the same order. Rows and keys travel, and the
        merged reservoir lives, on ``device`` (the layer's device).
        """
        world = dist.get_world_size()
        rows = torch.zeros(capacity, features, dtype=torch.float64, device=device)
        keys = torch.full((capacity,), -1.0, dtype=torch.float64, device=device)  # keys are >= 0
        count = torch.zeros(1, dtype=torch.float64, device=device)
        dtype = torch.float32
        if reservoir is not None and reservoir.count:
            kept = reservoir.rows.shape[0]
            rows[:kept], keys[:kept] = reservoir.rows.to(torch.float64), reservoir.keys
            count[0], dtype = reservoir.count, reservoir.rows.dtype
        flags = torch.tensor([float(dtype == torch.float64)], device=device)
        dist.all_reduce(flags)
        dtype = torch.float64 if flags.item() else torch.float32
        gathered = [[torch.empty_like(t) for _ in range(world)] for t in (rows, keys, count)]
        for parts, tensor in zip(gathered, (rows, keys, count)):
            dist.all_gather(parts, tensor)
        merged = cls.from_sample(capacity, rows[:0], keys[:0], 0)
        for part_rows, part_keys, part_count in zip(*gathered):
            valid = part_keys >= 0
            count = int(round(part_count.item()))
            merged.merge_(
                cls.from_sample(capacity, part_rows[valid].to(dtype), part_keys[valid], count)
            )
        return merged
