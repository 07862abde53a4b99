"""Tests of global rank allocation (torch_lowrank/allocation.py) and its use by convert/recover_."""

import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_lowrank as tl
from torch_lowrank.allocation import LayerBudget, allocate, budget_total


def normalised_error(layers, ranks):
    total = 0.0
    for layer in layers:
        r = ranks[layer.name]
        s = layer.spectrum
        total += 0.0 if r is None else float(s[r:].sum() / s.sum())
    return total


@st.composite
def random_layers(draw, max_layers=4, max_size=12):
    layers = []
    for i in range(draw(st.integers(1, max_layers))):
        m, n = draw(st.integers(2, max_size)), draw(st.integers(2, max_size))
        k = min(m, n)
        decay = draw(st.floats(0.1, 3.0))
        spectrum = torch.tensor([float(j + 1) ** -decay for j in range(k)], dtype=torch.float64)
        layers.append(LayerBudget(f"l{i}", (m, n), spectrum, positions=draw(st.integers(1, 9))))
    return layers


@settings(max_examples=80, deadline=None)
@given(
    random_layers(),
    st.floats(0.2, 1.0),
    st.sampled_from(["params", "flops"]),
    st.sampled_from([1, 2, 4]),
)
def test_budget_is_met_and_every_rank_saves(layers, ratio, budget, round_to):
    total = sum(layer.dense_cost(budget) for layer in layers)
    try:
        ranks = allocate(layers, ratio, budget, round_to)
    except ValueError as err:  # only when the smallest ranks alone exceed the budget
        assert "below what the smallest ranks already keep" in str(err)
        return
    assert budget_total(ranks, layers, budget) <= ratio * total + 1e-9
    for layer in layers:
        r = ranks[layer.name]
        m, n = layer.shape
        if r is not None:
            assert r * (m + n) < m * n and r % round_to == 0 and 1 <= r <= min(m, n)
        else:
            assert layer.largest_saving_rank < max(1, round_to)  # dense only when nothing saves


def brute_force(layers, ratio, budget):
    choices = []
    for layer in layers:
        top = layer.largest_saving_rank
        choices.append([None] if top == 0 else list(range(1, top + 1)))
    allowed = ratio * sum(layer.dense_cost(budget) for layer in layers)
    best = None
    for combo in itertools.product(*choices):
        ranks = {layer.name: r for layer, r in zip(layers, combo)}
        if budget_total(ranks, layers, budget) <= allowed + 1e-9:
            err = normalised_error(layers, ranks)
            best = err if best is None else min(best, err)
    return best


@settings(max_examples=40, deadline=None)
@given(random_layers(max_layers=3, max_size=8), st.floats(0.3, 0.9))
def test_greedy_is_within_one_step_of_the_brute_force_optimum(layers, ratio):
    """Greedy water-filling is optimal for fractional ranks; with whole ranks it can miss at most
    one step per layer (a knapsack remainder): its error is at most the optimum plus the largest
    single-step gain, and equal to it when all layers have the same shape."""
    try:
        ranks = allocate(layers, ratio)
    except ValueError:
        return
    optimum = brute_force(layers, ratio, "params")
    got = normalised_error(layers, ranks)
    largest_step = max(float(layer.spectrum.max() / layer.spectrum.sum()) for layer in layers)
    assert optimum - 1e-12 <= got <= optimum + largest_step + 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_equal_shapes_match_brute_force_exactly(seed):
    rng = random.Random(seed)
    layers = [
        LayerBudget(
            f"l{i}",
            (6, 6),
            torch.tensor(
                sorted((rng.random() ** 3 for _ in range(6)), reverse=True), dtype=torch.float64
            ),
        )
        for i in range(3)
    ]
    ratio = rng.uniform(0.35, 0.9)
    assert normalised_error(layers, allocate(layers, ratio)) == pytest.approx(
        brute_force(layers, ratio, "params"), abs=1e-12
    )


@settings(max_examples=30, deadline=None)
@given(random_layers(), st.floats(0.3, 1.0), st.randoms())
def test_order_of_layers_does_not_matter(layers, ratio, rnd):
    try:
        ranks = allocate(layers, ratio)
    except ValueError:
        return
    shuffled = layers[:]
    rnd.shuffle(shuffled)
    assert allocate(shuffled, ratio) == ranks


def test_errors():
    layer = LayerBudget("a", (8, 8), torch.ones(8))
    with pytest.raises(ValueError, match="budget must be 'params' or 'flops'\nbut got 'bytes'"):
        allocate([layer], 0.5, budget="bytes")
    with pytest.raises(ValueError, match="round_to must be an int >= 1\nbut got 0"):
        allocate([layer], 0.5, round_to=0)
    with pytest.raises(ValueError, match="ratio=0.1 is below what the smallest ranks already keep"):
        allocate([layer], 0.1)


class TwoBranches(nn.Module):
    """Two layers reading different halves of the input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return torch.cat([self.a(x[:, :32]), self.b(x[:, 32:])], 1)


def test_global_allocation_in_a_model_meets_the_budget_and_follows_the_spectra():
    """Branch a sees nearly rank-2 inputs, branch b full-rank ones: global allocation gives a a
    small rank and b the rest, and loses less summed error than the uniform ratio."""
    torch.manual_seed(1)
    low = torch.randn(512, 2) @ torch.randn(2, 32) + 0.01 * torch.randn(512, 32)
    x = torch.cat([low, torch.randn(512, 32)], 1)
    model = tl.convert(TwoBranches(), ratio=0.3, allocation="global", activation=None)
    tl.calibrate(model, [x])
    report = tl.recover_(model, method="linear")
    assert sum(row.rank * 64 for row in report.layers) <= 0.3 * 2 * 32 * 32
    assert report["a"].rank < report["b"].rank
    assert report.info["allocation"]["ratio"] == 0.3
    uniform = tl.compress(TwoBranches(), [x], ratio=0.3, method="linear", corrective=False)[1]
    assert report["a"].rank < uniform["a"].rank == uniform["b"].rank < report["b"].rank
    total = sum(r.relative_error for r in report.layers)
    assert total < 0.8 * sum(r.relative_error for r in uniform.layers)


def test_global_allocation_rounds_and_works_correctively():
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 48))
    data = [torch.randn(128, 48) for _ in range(2)]
    model, report = tl.compress(model, data, ratio=0.4, allocation="global", round_to=8)
    assert all(row.rank % 8 == 0 for row in report.layers)
    assert sum(row.rank * 112 for row in report.layers) <= 0.4 * 2 * 48 * 64
    assert report.info["mode"] == "corrective"


def test_global_allocation_needs_a_ratio():
    with pytest.raises(ValueError, match="allocation='global' needs ratio="):
        tl.convert(TwoBranches(), rank=4, allocation="global")
    with pytest.raises(
        ValueError, match="allocation must be 'uniform' or 'global'\nbut got 'greedy'"
    ):
        tl.convert(TwoBranches(), ratio=0.5, allocation="greedy")


def test_report_plot_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    model, report = tl.compress(
        nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)),
        [torch.randn(64, 16)],
        rank=4,
    )
    path = tmp_path / "report.png"
    report.plot(str(path))
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_rank_overrides_by_name_pattern():
    torch.manual_seed(2)
    low = torch.randn(512, 2) @ torch.randn(2, 32) + 0.01 * torch.randn(512, 32)
    x = torch.cat([low, torch.randn(512, 32)], 1)
    uniform = tl.convert(TwoBranches(), ratio=0.3, overrides={"a": 9})
    assert uniform.a.rank == 9 and uniform.b.rank == 4
    model = tl.convert(TwoBranches(), ratio=0.3, allocation="global", overrides={"a": 6})
    tl.calibrate(model, [x])
    report = tl.recover_(model, method="linear")
    assert report["a"].rank == 6  # fixed, although its spectrum would give it 2
    assert sum(row.rank * 64 for row in report.layers) <= 0.3 * 2 * 32 * 32
    assert report["b"].rank == int(0.3 * 2 * 32 * 32) // 64 - 6
