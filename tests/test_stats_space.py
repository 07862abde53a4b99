"""Statistics in the narrower space (torch_lowrank/base.py ``stats_space``).

A layer that narrows (``m < n``) keeps the moments of its own outputs ``W x + b`` instead of its
inputs: the ``linear`` optimum needs only ``W C W^T`` and ``W mu``. These tests check that both
spaces give the same recovery, and that a conv's reservoir still samples real patches.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_lowrank as tl
from torch_lowrank import LowRankConv2d, LowRankLinear
from torch_lowrank.activations import FoldedBatchNorm


def both_spaces(make, data, method="linear", **options):
    """Recover the layer ``make()`` once per statistics space on the same data; returns the
    two recovered layers and their reports, input space first."""
    out = []
    for space in ("input", "output"):
        layer = make()
        layer.stats_space = space
        for x in data:
            layer(x)
        row = layer.recover_(method, **options)
        out.append((layer, row))
    return out


def effective(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The recovered layer as one dense weight and bias (zeros when it has none)."""
    dense = layer.to_dense()
    bias = dense.bias if dense.bias is not None else torch.zeros(dense.weight.shape[0])
    return dense.weight.detach(), bias.detach()


def test_default_space_is_the_narrower_one():
    assert LowRankLinear.from_linear(nn.Linear(64, 8), rank=2).stats_space == "output"
    assert LowRankLinear.from_linear(nn.Linear(8, 64), rank=2).stats_space == "input"
    assert LowRankLinear.from_linear(nn.Linear(16, 16), rank=2).stats_space == "input"
    assert LowRankConv2d.from_conv2d(nn.Conv2d(8, 16, 3), rank=2).stats_space == "output"  # 72>16
    assert LowRankConv2d.from_conv2d(nn.Conv2d(1, 32, 3), rank=2).stats_space == "input"  # 9<32


def test_output_statistics_are_the_moments_of_the_conv_output():
    """Mean and covariance of every output position's channels (float64, rel. 1e-10)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=(2, 1), padding=1, padding_mode="reflect").double()
    layer = LowRankConv2d.from_conv2d(conv, rank=2)
    xs = [torch.randn(3, 4, 9, 7, dtype=torch.float64), torch.randn(4, 9, 7, dtype=torch.float64)]
    for x in xs:
        layer(x)
    rows = torch.cat([conv(x).reshape(-1, 6, 5 * 7).transpose(1, 2).reshape(-1, 6) for x in xs])
    (stats,) = layer.stats
    assert stats.count == rows.shape[0] == 4 * 35
    torch.testing.assert_close(stats.mean, rows.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        stats.covariance, torch.cov(rows.T, correction=0), rtol=1e-10, atol=1e-12
    )


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 6),
    extra=st.integers(1, 8),
    bias=st.booleans(),
    add_bias=st.booleans(),
    energy=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_recovery_is_the_same_in_both_spaces(m, extra, bias, add_bias, energy, seed):
    """``linear`` from output moments equals ``linear`` from input moments: same effective weight
    and bias (rel. 1e-8 in float64), same error and spectrum. Inputs have a large mean, so the
    bias correction and the uncentred (no intercept) case matter."""
    n = m + extra
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Linear(n, m, bias=bias).double()
    with torch.no_grad():
        dense.weight.copy_(torch.randn(m, n, generator=gen, dtype=torch.float64))
    data = [torch.randn(40, n, generator=gen, dtype=torch.float64) + 3.0 for _ in range(2)]
    rank = {"energy": 0.9} if energy else {"rank": max(1, m // 2)}

    def make():
        return LowRankLinear.from_linear(copy.deepcopy(dense), add_bias=add_bias, **rank)

    (a, row_a), (b, row_b) = both_spaces(make, data)
    assert a.rank == b.rank
    wa, ba = effective(a)
    wb, bb = effective(b)
    scale = float(dense.weight.abs().max()) * (1 + 3.0 * n)
    torch.testing.assert_close(wb, wa, rtol=1e-8, atol=1e-8 * scale)
    torch.testing.assert_close(bb, ba, rtol=1e-8, atol=1e-8 * scale)
    assert row_b.relative_error == pytest.approx(row_a.relative_error, rel=1e-6, abs=1e-10)
    torch.testing.assert_close(
        torch.tensor(row_b.spectrum), torch.tensor(row_a.spectrum), rtol=1e-7, atol=1e-9
    )


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("method", ["linear", "svd", "relu"])
def test_conv_recovery_is_the_same_in_both_spaces(groups, method):
    """Grouped or not, for the closed forms and the projected-gradient ReLU objective (whose
    reservoir draws the same patches in both spaces): same recovered conv (rel. 1e-6)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups).double()
    data = [torch.randn(5, 4, 8, 8, dtype=torch.float64) + 0.5 for _ in range(2)]

    def make():
        torch.manual_seed(7)  # the reservoir keys
        return LowRankConv2d.from_conv2d(copy.deepcopy(conv), rank=2, activation="relu", samples=64)

    options = {"max_iter": 20} if method == "relu" else {}
    (a, row_a), (b, row_b) = both_spaces(make, data, method, **options)
    wa, ba = effective(a)
    wb, bb = effective(b)
    torch.testing.assert_close(wb, wa, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bb, ba, rtol=1e-6, atol=1e-7)
    assert row_b.relative_error == pytest.approx(row_a.relative_error, rel=1e-6)


def test_conv_reservoir_holds_real_patches_and_the_same_sample():
    """The output space builds patches only for the positions that can enter the reservoir;
    with the same keys the kept rows equal those of the input space, and each is a patch."""
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=(1, 2)).double()
    x = torch.randn(6, 3, 13, 15, dtype=torch.float64)
    kept = {}
    for space in ("input", "output"):
        layer = LowRankConv2d.from_conv2d(copy.deepcopy(conv), rank=2, samples=50)
        layer.stats_space = space
        torch.manual_seed(3)
        layer(x)
        layer(x[:2])
        kept[space] = layer.reservoirs[0]
    torch.testing.assert_close(kept["output"].rows, kept["input"].rows, rtol=0, atol=0)
    assert kept["output"].count == kept["input"].count == 8 * 7 * 7
    cols = F.unfold(F.pad(x, [1, 1, 1, 1]), 3, dilation=(1, 2), stride=2)
    patches = cols.transpose(1, 2).reshape(-1, 27)
    exact = "donot_use_mm_for_euclid_dist"
    distance = torch.cdist(kept["output"].rows, patches, compute_mode=exact).min(1).values
    assert distance.max() < 1e-12


def test_batchnorm_folding_and_global_allocation_agree_across_spaces():
    """A conv with an eval BatchNorm before its ReLU, under global allocation: the output-space
    moments are rescaled by the BatchNorm, and the allocated ranks and outputs match."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 20), nn.ReLU(), nn.Linear(20, 4),
    )  # fmt: skip
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 2)
    model.eval()
    data = [torch.randn(16, 3, 6, 6) for _ in range(3)]
    outputs, ranks = {}, {}
    for space in ("input", "output"):
        converted = tl.convert(copy.deepcopy(model), ratio=0.5, allocation="global")
        for name in ("0", "4", "6"):
            converted.get_submodule(name).stats_space = space
        tl.calibrate(converted, data, progress=False)
        tl.recover_(converted, method="linear")
        assert isinstance(converted[1], FoldedBatchNorm)  # folded
        ranks[space] = [getattr(converted.get_submodule(k), "rank", None) for k in ("0", "4", "6")]
        outputs[space] = converted(data[0])
    assert ranks["output"] == ranks["input"]
    torch.testing.assert_close(outputs["output"], outputs["input"], rtol=1e-4, atol=1e-5)


def test_stats_space_rejects_bad_values_and_late_changes():
    layer = LowRankLinear.from_linear(nn.Linear(10, 3), rank=1, name="head")
    with pytest.raises(ValueError, match="head: stats_space must be 'input' or 'output'"):
        layer.stats_space = "outputs"
    layer(torch.randn(4, 10))
    with pytest.raises(RuntimeError, match="head: the statistics already hold 4 rows"):
        layer.stats_space = "input"
    layer.stats_space = "output"  # no change: fine
    assert layer.stats[0].features == 3
