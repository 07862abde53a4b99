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
first and only the rows of its top ``capacity`` keys are built, so a batch of millions of conv
patches costs one key per position and at most ``capacity`` patches built.

Every selection has a size known from shapes alone, so calibration never waits for the device
(no ``nonzero``, no ``item``): a full reservoir pairs the batch's ``k`` largest keys with its
``k`` smallest kept ones and keeps the larger of each pair (:func:`exchange_slots`); one
``index_copy_`` moves the candidates into place, those that do not enter into a scratch slot.
Storage is ``capacity`` slots plus the scratch slot once full.

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

__all__ = ["Reservoir", "exchange_slots"]


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
        # slots are in use. It doubles while filling, up to exactly ``capacity`` slots.
        self._rows: Tensor | None = None
        self._keys: Tensor | None = None
        self._held = 0  # the slots in use: min(count, capacity), known from shapes alone

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
        return self._rows[: self._held]

    @property
    def keys(self) -> Tensor:
        """The random keys of the kept rows, ``(min(count, capacity),)`` float64, row by row."""
        if self._keys is None:
            return torch.empty(0, dtype=torch.float64)
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
        if rows.shape[0]:
            sample._take(
                keys,
                lambda index: rows if index is None else rows.index_select(0, index),
                rows.device,
            )
        sample._count = count
        return sample

    @property
    def nbytes(self) -> int:
        """Memory held by the storage (rows and keys), in bytes.

        While filling, the storage doubles (at most twice the rows held); once full it has
        ``capacity`` slots and one scratch slot.

        Example:
            >>> sample = Reservoir(8)
            >>> sample.update(torch.randn(100, 4, dtype=torch.float16))
            >>> sample.nbytes  # 8 slots and a scratch one: a row of 4 float32, a float64 key
            216
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

    def _check_device(self, device: torch.device) -> None:
        if self.store is None and self._rows is not None and device != self._rows.device:
            raise ValueError(
                f"expected rows on {self._rows.device}, where the reservoir lives\n"
                f"but got rows on {device}"
            )

    def _storage(self, want: int, width: int, dtype: torch.dtype, device: torch.device) -> None:
        """Make room for ``want`` more rows, doubling up to ``capacity`` slots (and the scratch
        slot); rows are float64 as soon as one batch was (``dtype``: the batch's work dtype)."""
        if self._rows is not None and self._rows.dtype != dtype:
            self._rows = self._rows.to(torch.float64)  # float32 and float64 mixed
        length = 0 if self._keys is None else self._keys.shape[0]
        if min(length, self.capacity) >= self._held + want:
            return
        size = min(self.capacity, max(self._held + want, 2 * length))
        size += size == self.capacity  # full: the scratch slot of :meth:`_exchange`
        dtype = dtype if self._rows is None else self._rows.dtype
        rows = torch.empty(size, width, dtype=dtype, device=device)
        keys = torch.empty(size, dtype=torch.float64, device=device)
        if self._held:
            rows[: self._held] = self._rows[: self._held]
            keys[: self._held] = self._keys[: self._held]
        self._rows, self._keys = rows, keys

    def _take(
        self, keys: Tensor, rows_at: Callable[[Tensor | None], Tensor], device: torch.device
    ) -> None:
        """Take the rows of ``keys`` (one per row offered) that belong to the sample: build
        them with ``rows_at`` once (``None``: every row), append them while there is room and
        exchange them for kept rows with smaller keys after. Sizes depend on shapes only."""
        count, room = keys.shape[0], self.capacity - self._held
        if count <= room:
            index, order = None, keys
        else:  # only the batch's top keys can enter; the top ``room`` of them always do
            order, index = torch.topk(keys, min(count, self.capacity))
        rows = rows_at(index).detach()
        self._check_rows(rows)
        if self.features is None:
            self.features = rows.shape[1]
        work = torch.float64 if rows.dtype == torch.float64 else torch.float32
        place = self.store or rows.device
        fill = min(room, order.shape[0])
        self._storage(fill, rows.shape[1], work, place)
        if fill:
            slots = slice(self._held, self._held + fill)
            self._rows[slots] = rows[:fill]
            self._keys[slots] = order[:fill]
            self._held += fill
        if order.shape[0] > fill:  # the rest are exchanged for kept rows of smaller keys
            keys = order[fill:].to(self._keys.device)
            slots = exchange_slots(self._keys[: self.capacity], keys, scratch=self.capacity)
            self._rows.index_copy_(0, slots, rows[fill:].to(self._rows))
            self._keys.index_copy_(0, slots, keys)

    def _fits_in_place(self, rows: Tensor) -> bool:
        """A full reservoir can take ``rows`` as they are: no more than ``capacity`` of them,
        of the storage's dtype and device."""
        return (
            self._held == self.capacity
            and rows.shape[0] <= self.capacity
            and rows.dtype == self._rows.dtype
            and rows.device == self._rows.device
        )

    def _exchange_in_place(self, rows: Tensor, keys: Tensor) -> None:
        """The exchange of :meth:`_take`, copying every row of the batch once, straight into its
        slot (or the scratch slot): no gathered copy of the candidates."""
        order, index = torch.topk(keys, keys.shape[0])
        slots = exchange_slots(self._keys[: self.capacity], order, scratch=self.capacity)
        slots = torch.empty_like(slots).index_copy_(0, index, slots)  # row i -> its slot
        self._rows.index_copy_(0, slots, rows)
        self._keys.index_copy_(0, slots, keys)

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
        if rows.shape[0]:
            keys = torch.rand(rows.shape[0], device=rows.device, dtype=torch.float64)
            if self._fits_in_place(rows):
                self._exchange_in_place(rows, keys)
                self._count += rows.shape[0]
                return
            self._take(
                keys,
                lambda index: rows if index is None else rows.index_select(0, index),
                rows.device,
            )
        self._count += rows.shape[0]

    @no_grad
    def offer(
        self,
        count: int,
        rows_at: Callable[[Tensor | None], Tensor],
        device: str | torch.device = "cpu",
    ) -> None:
        """Offer ``count`` rows that are only built if they can enter the sample.

        Every row gets its key first; ``rows_at(index)`` is then called once, with the
        positions (a ``LongTensor`` on ``device``) of the ``min(count, capacity)`` rows of the
        largest keys, or ``None`` when all ``count`` rows fit, and must return those rows
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
        self._take(torch.rand(count, device=device, dtype=torch.float64), rows_at, device)
        self._count += count

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
        rows, keys = other.rows.to(device), other.keys.to(device)
        self._take(
            keys, lambda index: rows if index is None else rows.index_select(0, index), device
        )
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


def exchange_slots(held: Tensor, offered: Tensor, scratch: int) -> Tensor:
    """Where ``offered`` keys go in a full sample of ``held`` keys so that the sample keeps the top
    ``len(held)`` keys of both: a slot of ``held`` or ``scratch`` (does not enter), one per
    offered key, found with sizes known from shapes alone (no host synchronisation).

    ``offered`` must be in decreasing order, at most ``len(held)`` of them. Its ``k`` keys are
    paired with the ``k`` smallest held keys in increasing order; ``offered[i] - held_i``
    decreases along the pairs, so the offered keys that win their pair are a prefix, and
    replacing the losers of every pair leaves exactly the largest keys (the smallest kept key,
    ``min(offered[j], held_{j+1})``, exceeds the largest dropped one, ``max(held_j,
    offered[j+1])``).

    Example:
        >>> held = torch.tensor([0.5, 0.1, 0.9, 0.3], dtype=torch.float64)
        >>> offered = torch.tensor([0.8, 0.2], dtype=torch.float64)
        >>> exchange_slots(held, offered, scratch=4).tolist()
        [1, 4]
    """
    smallest, slots = torch.topk(held, offered.shape[0], largest=False)
    return torch.where(offered > smallest, slots, scratch)
