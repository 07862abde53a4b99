"""Calibration never waits for the device (issue 21): the hooks' steady-state batches make no
call that reads a tensor's value on the host.

A :class:`~torch.overrides.TorchFunctionMode` (``benchmarks/bench_gpu.py``'s counter, the one
the GPU check uses) sees every torch function and tensor method the hooks call. On a GPU each
of the calls counted here blocks the host until the device has caught up; on the CPU they are
harmless, which is why only a test finds them.
"""

import pytest
import torch
from torch import nn

import torch_lowrank as tl
from benchmarks.bench_gpu import CallCounter as SyncCounter
from torch_lowrank.pairing import accumulate_wave, original_width
from torch_lowrank.reservoir import Reservoir

pytestmark = pytest.mark.usefixtures("single_thread")


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)
    )  # fmt: skip


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 10 * 10, 10),
    )  # fmt: skip


@pytest.mark.parametrize(
    "build, shape, stats_space",
    [
        (mlp, (48, 32), None),
        (mlp, (48, 32), "output"),
        (cnn, (20, 3, 12, 12), None),
        (cnn, (20, 3, 12, 12), "output"),
    ],
)
def test_steady_state_calibration_makes_no_sync_call(build, shape, stats_space):
    """18 batches after the reservoirs (capacity 100) are full: no syncing call at all, in
    either statistics space, for Linear and (grouped) conv layers."""
    torch.manual_seed(0)
    model = tl.convert(build(), ratio=0.5, samples=100)
    if stats_space is not None:
        for module in model.modules():
            if isinstance(module, (tl.LowRankLinear, tl.LowRankConv2d)):
                module.stats_space = stats_space
    data = [torch.randn(shape) for _ in range(24)]
    for x in data[:6]:  # the first forward observes the activations; the reservoirs fill up
        model(x)
    assert all(
        r.count > r.capacity
        for m in model.modules()
        if isinstance(m, (tl.LowRankLinear, tl.LowRankConv2d))
        for r in m.reservoirs
    )
    with SyncCounter() as counter:
        for x in data[6:]:
            model(x)
    assert dict(counter.syncs) == {}


def test_reservoir_update_and_offer_make_no_sync_call():
    """Filling, the step to full, and full: neither ``update`` nor ``offer`` nor ``merge_``
    syncs, whatever the batch size against the capacity."""
    torch.manual_seed(0)
    table = torch.randn(1000, 3)
    with SyncCounter() as counter:
        reservoir = Reservoir(16)
        for size in (5, 7, 9, 1, 40, 3, 16, 200):
            reservoir.update(torch.randn(size, 3))
            reservoir.offer(
                size, lambda index, s=size: table[:s] if index is None else table[index]
            )
        other = Reservoir(16)
        other.update(torch.randn(50, 3))
        reservoir.merge_(other)
    assert dict(counter.syncs) == {}
    assert reservoir.rows.shape == (16, 3)


@pytest.mark.parametrize("positions", [None, 7])
def test_corrective_pairing_makes_no_sync_call(positions):
    """A corrective wave's pairing (every layer of ``cnn``: patches at sampled or at all
    positions, pairs with ``x`` or with ``W x``, reservoirs of ``[x~, x]`` rows) syncs on no
    batch, the first included."""
    torch.manual_seed(0)
    model = tl.convert(cnn(), ratio=0.5, samples=100)
    layers = [m for m in model.modules() if isinstance(m, (tl.LowRankLinear, tl.LowRankConv2d))]
    layers[0].stats_space = "input"  # narrowing layers pair with W x, this one with x
    model(torch.randn(20, 3, 12, 12))  # the first forward observes the activations
    assert {original_width(m) == m.matrix_shape[0] for m in layers} == {True, False}
    batches = [torch.randn(20, 3, 12, 12) for _ in range(8)]
    runs = [lambda compressed, x=x: model(x) for x in batches]
    with SyncCounter() as counter:
        for layer in layers:
            paired = accumulate_wave([layer], runs, with_samples={layer}, positions=positions)
    assert dict(counter.syncs) == {}
    assert paired[layers[-1]][0].moments.count == 8 * 20
