"""Tests of corrective waves run from cached node values of a GraphModule (graphs.py)."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import torch_lowrank as tl
from torch_lowrank.graphs import GraphCache

pytestmark = pytest.mark.usefixtures("single_thread")


class Net(nn.Module):
    """Residual convs with BatchNorm, an in-place ReLU, a conv called twice and a keyword
    argument with a default."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.shared = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x, scale: float = 1.0):
        h = F.relu(self.bn(self.stem(x)), inplace=True)
        h = h + self.b(torch.relu(self.a(h)))
        h = self.shared(F.relu(self.shared(h)))
        return self.head(h.mean((2, 3)) * scale)


def model_and_data():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    gen = torch.Generator().manual_seed(1)
    return fx.symbolic_trace(model), [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("method", ["linear", "relu"])
def test_waves_from_cached_values_give_the_factors_of_whole_model_passes(method):
    graph, data = model_and_data()
    got = {}
    for cache in (True, False):
        torch.manual_seed(0)
        got[cache] = tl.compress(copy.deepcopy(graph), data, ratio=0.5, method=method,
                                 cache_blocks=cache, progress=False, options={"max_iter": 5}
                                 if method == "relu" else None)  # fmt: skip
    (cached, report), (whole, whole_report) = got[True], got[False]
    assert report.info["forward_passes"] < whole_report.info["forward_passes"] / 3
    assert report.info["block_passes"] > 0 == whole_report.info["block_passes"]
    for a, b in zip(cached.modules(), whole.modules()):
        for p, q in zip(a.parameters(recurse=False), b.parameters(recurse=False)):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_the_cache_holds_only_the_values_live_across_the_cut():
    graph, data = model_and_data()
    graph = tl.convert(graph, ratio=0.5)
    cache = GraphCache.of(graph, data, tl.default_forward, lambda c: contextlib.nullcontext())
    names = {}
    for layer in ("a", "b", "head"):
        cache.seek(cache.cut([graph.get_submodule(layer)]))
        names[layer] = sorted(node.name for node in cache.entries[0][False])
        assert len(cache.entries) == len(data)
    assert names == {"a": ["relu", "scale"], "b": ["relu", "relu_1", "scale"],
                     "head": ["mul"]}  # fmt: skip


def test_models_it_would_not_reproduce_run_whole():
    graph, data = model_and_data()
    plain = lambda c: contextlib.nullcontext()  # noqa: E731
    assert GraphCache.of(Net(), data, tl.default_forward, plain) is None  # not a graph

    def twice(model, batch):
        return model(batch) + model(batch)

    assert GraphCache.of(graph, data, twice, plain) is None
    torch.manual_seed(0)
    _, report = tl.compress(copy.deepcopy(graph), data, ratio=0.5, method="linear",
                            forward_fn=twice, progress=False)  # fmt: skip
    assert report.info["block_passes"] == 0


def test_layers_inside_a_leaf_module_of_the_trace_cut_at_its_call():
    """A trace that keeps a block as one leaf call: a wave inside it starts at that call."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return x + self.b(torch.relu(self.a(x)))

    class Leaves(fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, Block) or super().is_leaf_module(module, name)

    torch.manual_seed(0)
    root = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), Block(), nn.Linear(8, 3)).eval()
    graph = fx.GraphModule(root, Leaves().trace(root))
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 6, generator=gen) for _ in range(3)]
    got = {}
    for cache in (True, False):
        got[cache] = tl.compress(copy.deepcopy(graph), data, rank=3, method="linear",
                                 cache_blocks=cache, progress=False)  # fmt: skip
    # no wave ran the whole model: the schedule, the check, one capture per batch
    assert got[True][1].info["forward_passes"] <= 2 + 1 + len(data)
    assert all(row.rank == 3 for row in got[True][1].layers if row.name.startswith("2."))
    for a, b in zip(got[True][0].modules(), got[False][0].modules()):
        for p, q in zip(a.parameters(recurse=False), b.parameters(recurse=False)):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
