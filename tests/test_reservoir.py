"""Tests of the row reservoir (torch_lowrank/reservoir.py): a uniform sample, exact merges."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_lowrank.reservoir import Reservoir

pytestmark = pytest.mark.usefixtures("single_thread")


def labelled(start: int, count: int, width: int = 2) -> torch.Tensor:
    """Rows whose every entry is the row's label, ``start .. start + count - 1``."""
    return torch.arange(start, start + count, dtype=torch.float32)[:, None].expand(count, width)


def kept_labels(reservoir: Reservoir) -> list[int]:
    return sorted(int(v) for v in reservoir.rows[:, 0].tolist())


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 20),
    batches=st.lists(st.integers(0, 30), min_size=1, max_size=6),
    width=st.integers(1, 4),
    seed=st.integers(0, 9999),
)
def test_keeps_min_of_count_and_capacity_distinct_input_rows(capacity, batches, width, seed):
    """Exactly min(count, capacity) rows are kept, each one a real input row, none twice."""
    torch.manual_seed(seed)
    reservoir, seen = Reservoir(capacity), 0
    for size in batches:
        reservoir.update(labelled(seen, size, width))
        seen += size
    assert reservoir.count == seen
    if seen == 0:
        assert reservoir.rows.shape[0] == 0 and reservoir.nbytes == 0
        return
    assert tuple(reservoir.rows.shape) == (min(seen, capacity), width)
    labels = kept_labels(reservoir)
    assert len(set(labels)) == len(labels)  # without replacement
    assert all(0 <= v < seen for v in labels)
    assert torch.equal(reservoir.rows, reservoir.rows[:, :1].expand(-1, width))  # whole rows
    # storage: whole slots (a float32 row and a float64 key each), at least the kept rows, at
    # most capacity and one scratch slot, and while filling at most twice the rows kept
    slots, rest = divmod(reservoir.nbytes, 4 * width + 8)
    kept = min(seen, capacity)
    assert rest == 0 and kept <= slots <= capacity + 1
    assert slots <= 2 * kept or slots == capacity + 1


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 12),
    batches=st.lists(st.integers(0, 40), min_size=1, max_size=10),
    reads=st.sets(st.integers(0, 9)),
    seed=st.integers(0, 9999),
)
def test_kept_rows_are_exactly_the_top_keys(capacity, batches, reads, seed):
    """The reservoir keeps exactly the rows of the ``capacity`` largest keys drawn so far, each
    row with its own key, whatever the batch sizes and wherever ``rows`` is read in between
    (a settle moves kept rows out of the spare slots). The keys are redrawn from the seed: one
    ``torch.rand(count, float64)`` per batch."""
    torch.manual_seed(seed)
    reservoir, seen = Reservoir(capacity), 0
    for i, size in enumerate(batches):
        reservoir.update(labelled(seen, size))
        seen += size
        if i in reads:
            _ = reservoir.rows
    torch.manual_seed(seed)
    drawn = [torch.rand(size, dtype=torch.float64) for size in batches if size]
    if not drawn:
        assert reservoir.rows.shape[0] == 0
        return
    every = torch.cat(drawn)
    best = torch.topk(every, min(capacity, seen)).indices
    assert sorted(kept_labels(reservoir)) == sorted(best.tolist())
    labels = reservoir.rows[:, 0].long()
    assert torch.equal(reservoir.keys, every[labels])


def test_a_full_reservoir_builds_at_most_capacity_rows_per_offer():
    """Just after filling up, the threshold is the smallest of only 4 keys; a batch of a million
    positions still builds at most 4 rows (the batch's own top keys)."""
    torch.manual_seed(0)
    reservoir, built = Reservoir(4), []
    reservoir.update(labelled(0, 4))
    table = labelled(4, 1_000_000)
    reservoir.offer(1_000_000, lambda index: built.append(len(index)) or table[index])
    assert built == [4] and reservoir.count == 1_000_004
    assert all(v >= 4 for v in kept_labels(reservoir))  # a million rows against 4: none stay


def test_every_row_is_kept_with_equal_probability():
    """20 rows in 4 batches of 5 into capacity 5, 4000 trials: each row is kept with frequency
    0.25 +- 0.03 (the binomial standard deviation is 0.007), whatever its batch."""
    torch.manual_seed(0)
    trials, hits = 4000, torch.zeros(20)
    for _ in range(trials):
        reservoir = Reservoir(5)
        for batch in range(4):
            reservoir.update(labelled(5 * batch, 5))
        hits[reservoir.rows[:, 0].long()] += 1
    frequency = hits / trials
    assert (frequency - 0.25).abs().max() <= 0.03, frequency


def test_uneven_batches_are_uniform_too():
    """Batches of 1, 2, 14 and 3 rows into capacity 4: each of the 20 rows kept with
    frequency 0.2 +- 0.03 over 4000 trials."""
    torch.manual_seed(1)
    trials, hits = 4000, torch.zeros(20)
    for _ in range(trials):
        reservoir, seen = Reservoir(4), 0
        for size in (1, 2, 14, 3):
            reservoir.update(labelled(seen, size))
            seen += size
        hits[reservoir.rows[:, 0].long()] += 1
    assert (hits / trials - 0.2).abs().max() <= 0.03


def test_deterministic_under_manual_seed():
    x = torch.randn(1000, 3)

    def sample(seed):
        torch.manual_seed(seed)
        reservoir = Reservoir(10)
        for chunk in x.split(128):
            reservoir.update(chunk)
        return reservoir.rows

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


def test_merge_is_a_uniform_sample_of_the_union():
    """A sees rows 0..9, B rows 10..29 (capacity 5 each). The merged reservoir holds 5 rows of
    the 30 and each row, from A or from B, is in it with frequency 1/6 +- 0.03 (4000 trials);
    a merge that took rows in proportion to the reservoirs' sizes would give A's rows 1/4."""
    torch.manual_seed(2)
    trials, hits = 4000, torch.zeros(30)
    for _ in range(trials):
        a, b = Reservoir(5), Reservoir(5)
        a.update(labelled(0, 4))
        a.update(labelled(4, 6))
        b.update(labelled(10, 20))
        merged = a.merge_(b)
        assert merged is a and merged.count == 30 and merged.rows.shape[0] == 5
        hits[merged.rows[:, 0].long()] += 1
    assert (hits / trials - 1 / 6).abs().max() <= 0.03


def test_merge_edge_cases():
    """Merging never exceeds capacity; small reservoirs merge to all their rows; empty ones
    change nothing but the count; the other reservoir is left as it was."""
    torch.manual_seed(3)
    a, b = Reservoir(8), Reservoir(8)
    a.update(labelled(0, 3))
    b.update(labelled(3, 4))
    b_rows = b.rows.clone()
    a.merge_(b)
    assert kept_labels(a) == list(range(7)) and a.count == 7
    assert torch.equal(b.rows, b_rows) and b.count == 4
    a.merge_(Reservoir(8))
    assert a.count == 7 and kept_labels(a) == list(range(7))
    empty = Reservoir(8)
    empty.merge_(a)
    assert kept_labels(empty) == list(range(7)) and empty.features == 2
    big = Reservoir(100)  # a larger other reservoir is fine
    big.update(labelled(7, 50))
    a.merge_(big)
    assert a.count == 57 and a.rows.shape[0] == 8 and len(set(kept_labels(a))) == 8


def test_large_batch_keeps_memory_bounded():
    """A million float16 rows: 64 rows kept as float32; the storage holds 64 slots and a scratch
    one, nbytes = 65 * (4 * 4 + 8)."""
    torch.manual_seed(4)
    reservoir = Reservoir(64)
    for _ in range(2):
        reservoir.update(torch.randn(500_000, 4, dtype=torch.float16))
    assert reservoir.count == 1_000_000
    assert reservoir.rows.shape == (64, 4) and reservoir.rows.dtype == torch.float32
    assert reservoir.nbytes == 65 * (4 * 4 + 8)


@pytest.mark.parametrize(
    "dtype, stored",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.int64, torch.float32),
    ],
)
def test_storage_dtype(dtype, stored):
    reservoir = Reservoir(3)
    x = torch.arange(10).reshape(5, 2).to(dtype)
    reservoir.update(x)
    assert reservoir.rows.dtype == stored
    assert all(row.tolist() in x.to(stored).tolist() for row in reservoir.rows)


def test_float64_batch_promotes_the_storage():
    reservoir = Reservoir(10)
    reservoir.update(torch.ones(2, 3))
    reservoir.update(torch.ones(2, 3, dtype=torch.float64) / 3)
    assert reservoir.rows.dtype == torch.float64 and reservoir.rows.shape == (4, 3)


def test_empty_batch_and_fresh_reservoir():
    reservoir = Reservoir(3)
    assert reservoir.count == 0 and reservoir.rows.shape == (0, 0) and reservoir.nbytes == 0
    reservoir.update(torch.empty(0, 5))
    assert reservoir.count == 0 and reservoir.features == 5 and reservoir.nbytes == 0
    assert reservoir.rows.shape == (0, 5)


@pytest.mark.parametrize("capacity", [0, -3, 2.5, True, "4"])
def test_bad_capacity(capacity):
    with pytest.raises(ValueError, match=r"expected a capacity that is an integer >= 1\nbut got"):
        Reservoir(capacity)


def test_errors():
    reservoir = Reservoir(4)
    with pytest.raises(ValueError, match=r"expected rows of shape \(N, w\)\nbut got shape \(5,\)"):
        reservoir.update(torch.ones(5))
    reservoir.update(torch.ones(2, 3))
    with pytest.raises(
        ValueError, match=r"expected rows of shape \(N, 3\)\nbut got shape \(4, 2\)"
    ):
        reservoir.update(torch.ones(4, 2))
    other = Reservoir(4)
    other.update(torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"of width 3\nbut got one of width 2"):
        reservoir.merge_(other)
    with pytest.raises(ValueError, match=r"capacity >= 4\nbut got one of capacity 2"):
        reservoir.merge_(Reservoir(2))
    with pytest.raises(ValueError, match=r"expected another reservoir\nbut got the reservoir"):
        reservoir.merge_(reservoir)
    assert reservoir.count == 2  # failed calls change nothing
