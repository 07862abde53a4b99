"""Block refinement (torch_lowrank/refine.py): never worse than the closed form on held-out
batches, changes only the factors, and refuses what it cannot do before anything changes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_lowrank as tl
from torch_lowrank.base import LowRankModule
from torch_lowrank.options import make_spec
from torch_lowrank.refine import RefineOptions, refine_block


class Block(nn.Module):
    """Pre-norm residual block: attention-like mixing and an MLP."""

    def __init__(self, d=16):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.ln1(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 4, -1)
        x = x + att @ self.v(h)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def model(blocks=2, d=16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, d), *[Block(d) for _ in range(blocks)], nn.Linear(d, 5))


def data(n=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 12, 8, generator=gen) for _ in range(n)]


def output_error(compressed, dense, batches):
    with torch.no_grad():
        num = sum(float((compressed(x) - dense(x)).square().sum()) for x in batches)
        den = sum(float(dense(x).square().sum()) for x in batches)
    return num / den


KW = dict(ratio=0.25, method="linear", progress=False, include="[12].*")


def test_refinement_lowers_the_block_and_model_error():
    """Every block's held-out error is never above the closed form's; on this model it falls
    for both blocks, and the compressed model's output error on held-out data falls too."""
    dense, batches, fresh = model(), data(), data(4, seed=7)
    torch.manual_seed(0)
    plain, _ = tl.compress(copy.deepcopy(dense), batches, **KW)
    torch.manual_seed(0)
    options = {"steps": 200, "lr": 3e-3, "held_out": 2, "eval_every": 10}
    refined, report = tl.compress(copy.deepcopy(dense), batches, refine=options, **KW)
    rows = report.info["refine"]
    assert [r["block"] for r in rows] == ["1", "2"]
    for r in rows:
        assert r["held_out_after"] <= r["held_out_before"]
        assert r["held_out_after"] < 0.95 * r["held_out_before"]
        assert 0 < r["best_step"] <= r["steps"] <= 200 and r["held_out_batches"] == 2
    assert output_error(refined, dense, fresh) < 0.95 * output_error(plain, dense, fresh)
    assert report.info["not_refined"] == []  # the end layers are not converted


def test_refinement_changes_only_the_factors_and_leaves_no_grad():
    dense, batches = model(), data()
    torch.manual_seed(0)
    plain, _ = tl.compress(copy.deepcopy(dense), batches, **KW)
    torch.manual_seed(0)
    refined, _ = tl.compress(copy.deepcopy(dense), batches, refine={"steps": 20}, **KW)
    for (name, a), (_, b) in zip(plain.named_parameters(), refined.named_parameters()):
        assert b.grad is None and b.requires_grad
        if ".down." in name or ".up." in name:
            continue
        assert torch.equal(a, b), name  # LayerNorms, unconverted layers: untouched


def test_a_target_already_met_keeps_the_closed_form_bitwise():
    """``refine_block`` with the optimum as the start: no step improves the held-out error, the
    best step is 0 and the parameters are given back exactly."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    pairs = []
    for _ in range(4):
        x = torch.randn(16, 4)
        pairs.append((((x,), {}), layer(x).detach()))
    before = [p.detach().clone() for p in layer.parameters()]
    options = RefineOptions(steps=50, lr=0.1, held_out=1, eval_every=5, patience=2)
    record = refine_block("fc", lambda c: layer(*c[0]), pairs, list(layer.parameters()), options)
    assert record.best_step == 0 and record.held_out_after == record.held_out_before
    assert record.steps == 0  # the error is zero: nothing to do
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))


def test_early_stopping_after_patience_evaluations():
    """A learning rate far too large makes every evaluation worse: the loop stops after
    ``patience`` evaluations and keeps the start."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    target = nn.Linear(4, 3)
    pairs = [(((x,), {}), target(x).detach()) for x in torch.randn(4, 16, 4)]
    before = [p.detach().clone() for p in layer.parameters()]
    options = RefineOptions(steps=500, lr=1e3, optimizer="sgd", held_out=1, eval_every=5)
    record = refine_block("fc", lambda c: layer(*c[0]), pairs, list(layer.parameters()), options)
    assert record.best_step == 0 and record.steps == 5 * options.patience
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))


def test_any_optimizer_by_name_class_or_callable():
    assert (
        make_spec(RefineOptions, {"optimizer": "AdamW"}, what="refine").optimizer
        is torch.optim.AdamW
    )
    assert (
        make_spec(RefineOptions, {"optimizer": "radam"}, what="refine").optimizer.__name__
        == "RAdam"
    )
    factory = lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)  # noqa: E731
    assert make_spec(RefineOptions, {"optimizer": factory}, what="refine").optimizer is factory


@pytest.mark.parametrize(
    ("refine", "error", "match"),
    [
        ({"stepz": 3}, TypeError, "unknown refine option 'stepz'"),
        ({"lr": -1.0}, ValueError, "lr must be a finite float > 0"),
        ({"lr": float("nan")}, ValueError, "lr must be a finite float > 0"),
        ({"steps": 2.5}, ValueError, "steps must be an int >= 0"),
        ({"held_out": 0}, ValueError, "held_out must be an int >= 1"),
        ({"optimizer": "nope"}, ValueError, "unknown optimizer name"),
        ("yes", TypeError, "refine must be a bool, a mapping or RefineOptions"),
    ],
)
def test_bad_refine_options_change_nothing(refine, error, match):
    dense, batches = model(), data(2)
    reference = copy.deepcopy(dense)
    with pytest.raises(error, match=match):
        tl.compress(dense, batches, refine=refine, **KW)
    assert all(type(a) is type(b) for a, b in zip(dense.modules(), reference.modules()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"corrective": False}, "refine needs corrective recovery"),
        ({"method": "svd"}, "refine needs corrective recovery"),
        ({"cache_blocks": False}, "refine runs on the block cache"),
    ],
)
def test_refine_needs_corrective_recovery_with_the_block_cache(kwargs, match):
    dense, batches = model(), data(2)
    with pytest.raises(ValueError, match=match):
        tl.compress(dense, batches, refine=True, **{**KW, **kwargs})
    assert not any(isinstance(m, LowRankModule) for m in dense.modules())


def test_recover_without_data_refuses_refine_and_keeps_the_statistics():
    dense = tl.convert(model(), ratio=0.25, include="[12].*")
    tl.calibrate(dense, data(2), progress=False)
    seen = dense[1].q.samples_seen
    with pytest.raises(ValueError, match="refine needs corrective recovery"):
        tl.recover_(dense, refine=True, progress=False)
    assert dense[1].q.calibrating and dense[1].q.samples_seen == seen


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize(
    "build",
    [Flat, lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))],
    ids=["no chain", "one layer per child"],
)
def test_a_model_without_blocks_says_nothing_was_refined(build):
    """Outside a chain, or as a chain child on its own, a layer's output is what its closed
    form fits already: nothing to refine, and the caller is told."""
    torch.manual_seed(0)
    mlp = build()
    with pytest.warns(UserWarning, match="nothing was refined"):
        _, report = tl.compress(
            mlp, [torch.randn(16, 8)], ratio=0.25, method="linear", refine=True, progress=False
        )
    assert report.info["refine"] == [] and len(report.info["not_refined"]) == 2
