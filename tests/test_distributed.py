"""Distributed calibration with torch.distributed (gloo, 2-3 processes on one machine).

Every rank calibrates on its shard of the batches; the recovered factors must equal the
single-process result on all the batches (float tolerance), on every rank."""

import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import torch_lowrank as tl
from torch_lowrank import distributed
from torch_lowrank.cross import CrossStats
from torch_lowrank.reservoir import Reservoir
from torch_lowrank.stats import CovarianceStats

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10)
    ).eval()


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 24, 3)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3)))


def batches(kind, n=6):
    gen = torch.Generator().manual_seed(5)
    shape = (32, 24) if kind == "mlp" else (4, 3, 8, 8)
    return [torch.randn(*shape, generator=gen) + 0.5 for _ in range(n)]


def half_square(output, batch):
    """A loss without sampling, so that pooled output weights match one process exactly."""
    return 0.5 * output.square().sum()


#: name -> (model, compress keyword arguments, whether the single-process result must match)
SCENARIOS = {
    "parallel-linear": ("mlp", {"method": "linear", "corrective": False}),
    "corrective-linear": ("mlp", {"method": "linear"}),
    "parallel-conv": ("cnn", {"method": "linear", "corrective": False}),
    "corrective-conv": ("cnn", {"method": "linear"}),
    "global-allocation": ("mlp", {"method": "linear", "corrective": False, "allocation": "global"}),
    "parallel-relu": ("mlp", {"method": "relu", "corrective": False}),
    "corrective-relu": ("mlp", {"method": "relu"}),
    "corrective-fisher": ("mlp", {"method": "linear", "weighting": {"loss": half_square}}),
}
EXACT = ("parallel-linear", "corrective-linear", "parallel-conv", "corrective-conv",
         "global-allocation", "corrective-fisher")  # fmt: skip


def run(name, data, wrap=None):
    kind, kwargs = SCENARIOS[name]
    model = mlp() if kind == "mlp" else CNN().eval()
    target = wrap(model) if wrap else model
    _, report = tl.compress(target, data, ratio=0.4, progress=False, **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, report


def worker(rank, world, store, out, names):
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    torch.set_num_threads(1)
    torch.manual_seed(100 + rank)  # independent reservoir keys per rank
    results = {}
    for name in names:
        if name == "ddp":
            data = batches("mlp")[rank::world]
            ddp = lambda m: nn.parallel.DistributedDataParallel(tl.convert(m, ratio=0.4))  # noqa: E731
            state, report = run("corrective-linear", data, wrap=ddp)
            results[name] = (state, report.info)
        elif name == "failure":
            model = tl.convert(mlp(), ratio=0.4)
            data = batches("mlp")[rank::world]
            if rank == world - 1:
                data[0] = data[0].clone()
                data[0][0, 0] = float("nan")
            tl.calibrate(model, data, progress=False)
            before = copy.deepcopy(model.state_dict())
            try:
                tl.recover_(model, method="linear", progress=False)
                results[name] = "no error"
            except (ValueError, RuntimeError) as err:
                unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
                results[name] = (type(err).__name__, str(err), unchanged, model[0].calibrating)
        else:
            kind = SCENARIOS[name][0]
            state, report = run(name, batches(kind)[rank::world])
            results[name] = (state, report.info, [row.rank for row in report.layers])
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def spawn(tmp_path, world, names):
    mp.spawn(worker, args=(world, str(tmp_path / "store"), str(tmp_path), names), nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def effective(state):
    """Each layer's weight ``up @ down`` and bias (factors are unique only up to a rotation)."""
    out = {}
    for key, value in state.items():
        if key.endswith("down.weight"):
            prefix = key[: -len("down.weight")]
            up = state[prefix + "up.weight"].flatten(1)
            out[prefix + "weight"] = up @ value.flatten(1)
        elif not key.endswith("up.weight"):
            out[key] = value
    return out


def assert_states_close(got, expected, tol=2e-5):
    got, expected = effective(got), effective(expected)
    assert got.keys() == expected.keys()
    for key in expected:
        scale = max(expected[key].abs().max().item(), 1.0)
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=tol * scale, msg=key)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_give_the_single_process_result(tmp_path, world):
    names = list(SCENARIOS) + ["ddp", "failure"]
    results = spawn(tmp_path, world, names)
    for name in EXACT:
        kind = SCENARIOS[name][0]
        expected, report = run(name, batches(kind))
        for rank in range(world):
            state, info, ranks = results[rank][name]
            assert ranks == [row.rank for row in report.layers], name
            assert info["world_size"] == world
            per_rank = info["solves_per_rank"]
            assert sum(per_rank) == len(ranks), per_rank
            if "corrective" not in name:  # parallel: the solves were shared out
                assert min(per_rank) >= 1, per_rank
            assert_states_close(state, expected)
    for name in ("parallel-relu", "corrective-relu"):  # a different sample: ranks agree exactly
        for rank in range(1, world):
            first, other = results[0][name][0], results[rank][name][0]
            assert all(torch.equal(first[k], other[k]) for k in first), name
    expected, _ = run("corrective-linear", batches("mlp"))
    for rank in range(world):
        state, info = results[rank]["ddp"]
        assert_states_close({k.removeprefix("module."): v for k, v in state.items()}, expected)
    for rank in range(world):  # NaN on the last rank: every rank raises, nothing changes
        kind, message, unchanged, calibrating = results[rank]["failure"]
        assert "NaN or Inf" in message and unchanged and calibrating, results[rank]["failure"]


def test_reduce_helpers_in_a_one_rank_group(tmp_path):
    """The re-centring algebra on one rank: the reduced sums are about the global mean and give
    the same moments; an empty accumulator reduces to an empty one; a reservoir keeps its rows."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 's'}", rank=0, world_size=1)
    try:
        assert not distributed.active()  # one rank: recover_ takes the ordinary path
        torch.manual_seed(0)
        x = torch.randn(300, 4, dtype=torch.float64) * 3 + 10
        stats, cross = CovarianceStats(4), CrossStats(4)
        for part in x.split(70):
            stats.update(part)
            cross.update(part * 2 + 1, part)
        reduced = CovarianceStats.all_reduce(stats, 4, x.device)
        assert reduced.count == 300 and stats.count == 300
        torch.testing.assert_close(reduced.shift, x.mean(0))
        torch.testing.assert_close(reduced.covariance, stats.covariance, rtol=1e-12, atol=1e-12)
        both = CrossStats.all_reduce(cross, 4, x.device)
        for attr in ("mean_tilde", "mean", "covariance_tilde", "covariance", "cross"):
            torch.testing.assert_close(getattr(both, attr), getattr(cross, attr))
        empty = CovarianceStats.all_reduce(None, 4, x.device)
        assert empty.count == 0 and empty.sum_sq is None
        sample = Reservoir(50)
        sample.update(x.float())
        merged = Reservoir.all_reduce(sample, 50, 4, x.device)
        assert merged.count == 300 and torch.equal(merged.rows, sample.rows)
    finally:
        dist.destroy_process_group()
