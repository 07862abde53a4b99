"""Bounded memory: corrective recovery holds statistics for one wave at a time, and
``offload=`` keeps dense weights and statistics in host memory."""

import copy

import pytest
import torch
from torch import nn

import torch_lowrank as tl
from torch_lowrank.cross import CrossStats
from torch_lowrank.stats import CovarianceStats


def deep_mlp(depth=12, width=64):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10)).eval()


def data(n=4, width=64):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(64, width, generator=gen) for _ in range(n)]


def test_corrective_peak_statistics_are_one_wave():
    """Whole-model (parallel) calibration holds all 13 layers' statistics and reservoirs at once;
    corrective recovery holds one wave's paired statistics, its reservoir and the block cache."""
    width, batches = 64, data()
    _, parallel = tl.compress(deep_mlp(), batches, ratio=0.3, corrective=False, progress=False)
    _, corrective = tl.compress(deep_mlp(), batches, ratio=0.3, progress=False)
    rows = sum(b.shape[0] for b in batches)
    one_layer = 8 * (width * width + 2 * width) + (4 + 8 / width) * width * rows  # sums + sample
    assert parallel.info["peak_stat_bytes"] >= 13 * one_layer * 0.9
    one_wave = (
        8 * (3 * width * width + 4 * width)  # CrossStats: three n x n sums, two shifts, two sums
        + 2 * 4 * width * width  # and the float32 product stages of its two sides
        + (4 * 2 * width + 8) * rows  # reservoir of [x~, x] rows and their keys
        + 2 * 4 * width * rows  # the block cache: both inputs of one block
    )
    assert corrective.info["peak_stat_bytes"] <= one_wave
    assert corrective.info["peak_stat_bytes"] * 3 < parallel.info["peak_stat_bytes"]


def test_corrective_compress_keeps_no_first_pass_statistics():
    model = tl.convert(deep_mlp(depth=2), ratio=0.3)
    seen = []
    for module in model.modules():
        if isinstance(module, tl.LowRankLinear):
            module.register_forward_pre_hook(lambda m, args: seen.append(m.samples_seen))
    model, report = tl.compress(model, data(), ratio=0.3, progress=False)
    assert report.info["mode"] == "corrective" and set(seen) == {0}


@pytest.mark.parametrize("corrective", [False, True])
def test_offload_to_the_host_gives_the_same_model(corrective):
    """On a CPU-only machine the host is the device; this checks the offload path end to end."""
    batches = data(3)
    results = []
    for offload in (None, "cpu"):
        torch.manual_seed(0)
        model = tl.convert(deep_mlp(depth=3), ratio=0.3, offload=offload)
        low_rank = [m for m in model.modules() if isinstance(m, tl.LowRankLinear)]
        assert all((m.offload is None) == (offload is None) for m in low_rank)
        tl.compress(model, batches, ratio=0.3, corrective=corrective, progress=False)
        results.append(model(batches[0]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_statistics_kept_in_a_store_match():
    x = torch.randn(200, 5, dtype=torch.float64)
    plain, stored, cross = CovarianceStats(5), CovarianceStats(5, store="cpu"), CrossStats(5, "cpu")
    for part in x.split(64):
        plain.update(part)
        stored.update(part)
        cross.update(part, part)
    assert stored.store == torch.device("cpu") and stored.device == torch.device("cpu")
    torch.testing.assert_close(stored.covariance, plain.covariance, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cross.cross, plain.covariance, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_keeps_a_cuda_models_weights_and_statistics_on_the_host():
    dense = deep_mlp(depth=3).cuda()
    batches = [b.cuda() for b in data(3)]
    expected = copy.deepcopy(dense)
    tl.compress(expected, batches, ratio=0.3, progress=False)
    model = tl.convert(dense, ratio=0.3, offload="cpu")
    first = model[0]
    assert first.dense.weight.device.type == "cpu"
    tl.calibrate(model, batches, progress=False)
    assert first.stats[0].device.type == "cpu" and first.reservoirs[0].rows.device.type == "cpu"
    tl.recover_(model, data=batches, progress=False)
    assert all(p.device.type == "cuda" for p in model.parameters())
    torch.testing.assert_close(model(batches[0]), expected(batches[0]), rtol=1e-3, atol=1e-3)


def test_frozen_paired_moments_hold_one_copy_and_match():
    """``freeze_`` turns the sums into the moments in their own memory: the same moments (1e-12)
    in three n x n float64 matrices and two means, stages freed; it takes no more rows."""
    n = 300  # wide enough for the symmetric block products
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, n, generator=gen) + 3.0
    x_tilde = x + 0.1 * torch.randn(1000, n, generator=gen)
    stats = CrossStats(n)
    for part, part_tilde in zip(x.split(256), x_tilde.split(256)):
        stats.update(part_tilde, part)
    expected = [stats.mean_tilde, stats.covariance_tilde, stats.mean, stats.covariance, stats.cross]
    assert stats.nbytes > 8 * 3 * n * n  # float64 sums and float32 stages
    stats.freeze_()
    got = [stats.mean_tilde, stats.covariance_tilde, stats.mean, stats.covariance, stats.cross]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(stats.covariance, stats.covariance.T) and stats.count == 1000
    assert stats.nbytes == 8 * (3 * n * n + 2 * n)
    with pytest.raises(RuntimeError, match="frozen"):
        stats.update(x_tilde[:4], x[:4])


def test_memory_parts_in_the_report():
    """Staged plans hold their factor layers only (no float64 factors): ``staged_bytes`` is the
    factor layers' float32 parameters; the other parts are there and positive."""
    model, report = tl.compress(
        deep_mlp(depth=3), data(), ratio=0.3, method="linear", progress=False
    )
    layers = [m for m in model.modules() if isinstance(m, tl.LowRankLinear)]
    factor_bytes = sum(
        p.numel() * 4 for m in layers for p in (*m.down.parameters(), *m.up.parameters())
    )
    # besides the layers, a plan keeps only its report's float64 bias and spectrum
    extra = sum(8 * (m.out_features + min(m.out_features, m.in_features)) for m in layers)
    assert factor_bytes <= report.info["staged_bytes"] <= factor_bytes + extra
    for key in ("dense_bytes", "block_cache_bytes", "solve_bytes", "peak_stat_bytes"):
        assert report.info[key] > 0, key
    phases = sum(report.info[f"seconds_{p}"] for p in ("passes", "statistics", "solves"))
    assert 0 < phases <= report.info["seconds"] * 1.01
