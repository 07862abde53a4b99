"""Tests of block input caching for corrective recovery (torch_lowrank/blocks.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_lowrank as tl
from torch_lowrank.blocks import find_chains
from torch_lowrank.linear import LowRankLinear


def deep_mlp(depth=5, width=32):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(width, 10)).eval()


class Block(nn.Module):
    """A pre-norm transformer-style block fed ``hidden_states`` by keyword, with a mask, and
    returning a tuple (as Hugging Face layers do)."""

    def __init__(self, d=16):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, hidden_states, mask=None, scale=1.0):
        h = self.ln(hidden_states)
        att = (self.q(h) @ self.k(h).transpose(-1, -2)) * scale + mask
        x = hidden_states + self.o(torch.softmax(att, -1) @ self.v(h))
        return (x + self.fc2(F.gelu(self.fc1(x))), att)


class Stack(nn.Module):
    def __init__(self, layers=3, d=16, share_mask=True):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Linear(8, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, 5)
        self.share_mask = share_mask

    def forward(self, x):
        h = self.embed(x)
        n = x.shape[1]
        mask = torch.triu(torch.full((n, n), -1e4), 1)
        for i, layer in enumerate(self.layers):
            m = mask if self.share_mask else mask * (i + 1)
            h = layer(hidden_states=h, mask=m, scale=0.25)[0]
        return self.head(h)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.features = nn.Sequential(
            nn.Conv2d(3, 12, 3, padding=1, bias=False),
            nn.BatchNorm2d(12),
            nn.ReLU(),
            nn.Conv2d(12, 16, 3),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10)
        )
        with torch.no_grad():
            self.features[1].running_mean.uniform_(-1, 1)
            self.features[1].running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.classifier(self.features(x))


def batches(shape, n=3, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(n)]


def compress_both(build, data, **kwargs):
    """Corrective recovery with and without the block cache, from the same seed."""
    out = {}
    for cache in (True, False):
        torch.manual_seed(0)
        model = copy.deepcopy(build).eval()
        _, report = tl.compress(model, data, cache_blocks=cache, **kwargs)
        out[cache] = (model, report)
    return out


@pytest.mark.parametrize("method", ["linear", "relu"])
@pytest.mark.parametrize(
    ("build", "shape"), [(deep_mlp, (64, 32)), (Stack, (4, 6, 8)), (CNN, (6, 3, 8, 8))]
)
def test_block_cache_gives_the_whole_model_result(build, shape, method):
    """Same factors (float tolerance) with far fewer whole-model passes."""
    data = batches(shape)
    held_out = batches(shape, n=1, seed=9)[0]
    runs = compress_both(build(), data, ratio=0.4, method=method)
    (cached, report), (plain, plain_report) = runs[True], runs[False]
    with torch.no_grad():
        a, b = cached(held_out), plain(held_out)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    for row, plain_row in zip(report.layers, plain_report.layers):
        assert row.rank == plain_row.rank
    assert report.info["block_passes"] > 0 and plain_report.info["block_passes"] == 0
    assert report.info["forward_passes"] < plain_report.info["forward_passes"]


def test_pass_counts_on_a_deep_sequential():
    """Depth 5 + head: 6 waves over 11 children. Whole-model: 1 + 2 passes per batch per wave.
    Cached: schedule + chain check + 2 stopped passes per batch; in blocks, every wave costs 2
    block runs per batch and every one of the 10 children before the last is run twice per batch
    to move the cache along."""
    data = batches((32, 32), n=4)
    runs = compress_both(deep_mlp(), data, ratio=0.4, method="linear")
    cached, plain = runs[True][1].info, runs[False][1].info
    assert plain["forward_passes"] == 1 + 6 * 2 * 4 and plain["waves"] == 6
    assert cached["forward_passes"] == 1 + 1 + 2 * 4
    assert cached["block_passes"] == 6 * 2 * 4 + 10 * 2 * 4


def test_finds_keyword_stream_tuple_outputs_and_shared_mask():
    model = tl.convert(Stack(), rank=4)
    linear = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    where, passes = find_chains(model, linear, torch.randn(2, 6, 8), tl.default_forward)
    assert passes == 1
    chain, _ = where[model.layers[1].fc2]
    assert chain.container is model.layers and chain.position == "hidden_states" and chain.unpack
    assert where[model.layers[2].q][1] == 2
    assert model.embed not in where and model.head not in where  # outside the chain


class Twice(nn.Module):
    """The same ModuleList run twice (weight sharing): not a chain."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

    def forward(self, x):
        for _ in range(2):
            for layer in self.layers:
                x = torch.relu(layer(x))
        return x


class Parallel(nn.Module):
    """Children fed the same input and summed: not a chain."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.branches = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(sum(torch.relu(b(x)) for b in self.branches))


class Counting(nn.Module):
    """A stateful block: its output depends on how often it ran, so replay differs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.relu(self.fc(x)) + self.calls


@pytest.mark.parametrize(
    "build",
    [
        Twice,
        Parallel,
        lambda: Stack(share_mask=False),
        lambda: nn.Sequential(Counting(), Counting(), nn.Linear(16, 4)),
    ],
    ids=["shared-weights", "parallel", "per-layer-mask", "stateful"],
)
def test_what_is_not_a_chain_runs_the_whole_model(build):
    torch.manual_seed(6)
    model = tl.convert(build(), rank=4)
    shape = (2, 6, 8) if isinstance(model, Stack) else (8, 16)
    linear = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    where, _ = find_chains(model, linear, torch.randn(*shape), tl.default_forward)
    if isinstance(model, nn.Sequential):  # stateful children: none of them is cached
        assert not any(chain.container is model for chain, _ in where.values())
    else:
        assert where == {}
