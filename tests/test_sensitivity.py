"""Loss-aware global allocation (torch_lowrank/sensitivity.py): layers whose errors move the
output more get more rank, the probes leave the model and its statistics alone, and a request
that cannot be served is refused before anything changes."""

import copy

import pytest
import torch
from torch import nn

import torch_lowrank as tl
from torch_lowrank.model import low_rank_modules
from torch_lowrank.sensitivity import output_distance, sensitivities
from torch_lowrank.settings import GlobalAllocation


class TwoBranches(nn.Module):
    """``0.01 quiet(x) + loud(x)``: an error in ``quiet`` barely reaches the output."""

    def __init__(self, d=32):
        super().__init__()
        torch.manual_seed(0)
        self.quiet, self.loud = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return 0.01 * self.quiet(x) + self.loud(x)


def data(n=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(64, 32, generator=gen) @ torch.randn(32, 32, generator=gen) for _ in range(n)
    ]


def output_error(model, dense, batches):
    with torch.no_grad():
        outs, refs = [model(x) for x in batches], [dense(x) for x in batches]
    return output_distance("mse", outs, refs)


@pytest.mark.parametrize("by", ["mse", "kl"])
def test_the_layer_that_moves_the_output_gets_the_rank(by):
    dense, batches = TwoBranches(), data()
    found = {}
    for allocate_by in ("spectra", by):
        torch.manual_seed(0)
        model, report = tl.compress(
            copy.deepcopy(dense), batches, ratio=0.3, method="linear", allocation="global",
            allocate_by=allocate_by, progress=False,
        )  # fmt: skip
        found[allocate_by] = (model, {row.name: row.rank for row in report.layers})
    spectra, measured = found["spectra"][1], found[by][1]
    assert measured["loud"] > spectra["loud"] and measured["quiet"] < spectra["quiet"]
    kept = {k: sum(r * 64 for r in ranks.values() if r) for k, (_, ranks) in found.items()}
    assert kept[by] <= kept["spectra"] * 1.02  # the same budget
    fresh = data(3, seed=9)
    errors = {k: output_error(model, dense, fresh) for k, (model, _) in found.items()}
    assert errors[by] < 0.7 * errors["spectra"]


def test_probes_change_neither_the_model_nor_its_statistics():
    dense, batches = TwoBranches(), data()
    model = tl.convert(copy.deepcopy(dense), ratio=0.3, allocation="global", allocate_by="mse")
    tl.calibrate(model, batches, progress=False)
    modules = list(low_rank_modules(model))
    before = [m.observer.observation().stats[0].covariance.clone() for m in modules]
    seen = [m.samples_seen for m in modules]
    observed = {m: m.observer.observation() for m in modules}
    spec = GlobalAllocation(0.3, allocate_by="mse")
    fold = {m: [] for m in modules}
    weights = sensitivities(model, modules, fold, observed, spec, batches, tl.default_forward)
    assert weights[model.loud] > 100 * weights[model.quiet] > 0
    assert [m.samples_seen for m in modules] == seen
    for m, cov in zip(modules, before):
        assert m.calibrating and torch.equal(m.observer.observation().stats[0].covariance, cov)
    assert model.quiet is modules[0] and model.loud is modules[1]


def test_recover_without_data_refuses_a_measured_allocation():
    model = tl.convert(TwoBranches(), ratio=0.3, allocation="global", allocate_by="kl")
    tl.calibrate(model, data(2), progress=False)
    with pytest.raises(ValueError, match="allocate_by='kl' measures each layer's effect"):
        tl.recover_(model, method="linear", progress=False)
    assert model.loud.calibrating and model.loud.samples_seen == 128


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"allocation": "global", "allocate_by": "loss"}, "allocate_by must be one of"),
        ({"allocate_by": "kl"}, "allocate_by='kl' needs allocation='global'"),
        ({"allocation": "global", "allocate_by": "kl", "corrective": False}, "corrective=True"),
    ],
)
def test_bad_allocate_by_changes_nothing(kwargs, match):
    dense = TwoBranches()
    with pytest.raises(ValueError, match=match):
        tl.compress(dense, data(2), ratio=0.3, method="linear", progress=False, **kwargs)
    assert type(dense.loud) is nn.Linear and type(dense.quiet) is nn.Linear


def test_output_distance_kl_is_the_mean_kl_per_position():
    p = torch.tensor([[[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    q = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 0.0]]])
    expected = (
        torch.nn.functional.kl_div(
            q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="sum"
        )
        / 2
    )
    assert output_distance("kl", [q], [p]) == pytest.approx(float(expected), rel=1e-6)
