"""Tests of the streaming statistics (torch_lowrank/stats.py)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_lowrank.stats import CovarianceStats


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    return x.mean(0), torch.cov(x.T, correction=0).reshape(x.shape[1], x.shape[1])


@settings(max_examples=40, deadline=None)
@given(
    features=st.integers(1, 12),
    batches=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-1e3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_streaming_matches_batch_covariance(features, batches, scale, offset, seed):
    """Summing batch by batch gives the covariance of all rows (relative tol 1e-9 in float64)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(batches), features, generator=gen, dtype=torch.float64) * scale + offset
    stats = CovarianceStats(features)
    for chunk in x.split(batches):
        stats.update(chunk)
    mean, cov = reference(x)
    assert stats.count == len(x)
    torch.testing.assert_close(stats.mean, mean, rtol=1e-9, atol=1e-9 * (abs(offset) + scale))
    torch.testing.assert_close(stats.covariance, cov, rtol=1e-7, atol=1e-9 * scale**2)
    torch.testing.assert_close(
        stats.second_moment, cov + torch.outer(mean, mean), rtol=1e-7, atol=1e-9 * scale**2
    )


def test_large_mean_keeps_covariance_accurate_in_float32():
    """Rows with mean 1e4 and spread 1: float32 batch products about the shift keep the
    covariance within 1e-3 relative (a naive uncentred float32 sum loses it entirely)."""
    torch.manual_seed(0)
    x = torch.randn(20000, 4) + 1e4
    stats = CovarianceStats(4)
    for chunk in x.split(1000):
        stats.update(chunk)
    _, cov = reference(x)
    torch.testing.assert_close(stats.covariance, cov, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_activations_do_not_overflow(dtype):
    """Activations near float16's limit (x^2 overflows float16) give finite, correct statistics:
    equal to float64's up to float32 accumulation over 512 rows (bound ``512 eps`` = 3e-5
    relative; the summation order, and so the rounding, depends on the CPU's vector width)."""
    torch.manual_seed(0)
    x = (torch.randn(512, 8) * 3e4).clamp(-6e4, 6e4).to(dtype)
    stats = CovarianceStats(8)
    stats.update(x)
    assert stats.is_finite()
    _, cov = reference(x.float())
    torch.testing.assert_close(stats.covariance, cov, rtol=1e-4, atol=1e-3)


def test_merge_equals_single_accumulator():
    torch.manual_seed(1)
    x = torch.randn(300, 6, dtype=torch.float64) * 5 + 2
    a, b, both = CovarianceStats(6), CovarianceStats(6), CovarianceStats(6)
    a.update(x[:100] + 0)
    b.update(x[100:])
    both.update(x)
    a.merge_(b)
    assert a.count == 300
    torch.testing.assert_close(a.mean, both.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.covariance, both.covariance, rtol=1e-10, atol=1e-10)
    empty = CovarianceStats(6)
    empty.merge_(both)
    torch.testing.assert_close(empty.covariance, both.covariance)


def test_non_finite_rows_are_detected():
    stats = CovarianceStats(3)
    stats.update(torch.randn(10, 3))
    assert stats.is_finite()
    bad = torch.randn(10, 3)
    bad[4, 1] = float("nan")
    stats.update(bad)
    assert not stats.is_finite()


def test_errors():
    stats = CovarianceStats(3)
    with pytest.raises(ValueError, match="no rows have been accumulated"):
        _ = stats.mean
    with pytest.raises(
        ValueError, match=r"expected rows of shape \(N, 3\)\nbut got shape \(4, 2\)"
    ):
        stats.update(torch.randn(4, 2))
    with pytest.raises(ValueError, match="cannot merge statistics of width 2 into 3"):
        stats.merge_(CovarianceStats(2))


def test_statistics_stay_on_the_rows_device_and_report_memory():
    stats = CovarianceStats(5)
    assert stats.device is None and stats.nbytes == 0
    stats.update(torch.randn(7, 5))
    assert stats.device == torch.device("cpu")
    assert stats.sum_sq.dtype == torch.float64
    # the sums (float64), plus a buffer of 1,024 float32 rows where small batches wait for one
    # product together, and an (n, n) float32 stage for the products
    assert stats.nbytes == (5 + 5 + 25) * 8 + 1024 * 5 * 4 + 5 * 5 * 4
    wide = CovarianceStats(2048)
    wide.update(torch.randn(3, 2048))
    _ = wide.covariance  # a product has run: the stage exists
    # wide rows: the buffer adds 512 / n of the sums, the stage half of them
    sums = (2048 * 2048 + 2 * 2048) * 8
    assert wide.nbytes == sums + 1024 * 2048 * 4 + 2048 * 2048 * 4


@settings(max_examples=30, deadline=None)
@given(
    features=st.integers(1, 9),
    batches=st.lists(st.integers(1, 25), min_size=1, max_size=8),
    reads=st.sets(st.integers(0, 7)),
    stage_rows=st.integers(1, 60),
    seed=st.integers(0, 2**16),
)
def test_waiting_batches_never_change_the_result(features, batches, reads, stage_rows, seed):
    """Small float32 batches wait in a buffer for one product together, and products wait in a
    float32 stage for the float64 sums; reading the moments at any point in between (which
    flushes both) and any stage size give the same sums as one batch (rel. 1e-5 in float32)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(batches), features, generator=gen) * 3 + 1
    stats = CovarianceStats(features)
    stats.stage_rows = stage_rows
    for i, chunk in enumerate(x.split(batches)):
        stats.update(chunk)
        if i in reads:
            _ = stats.covariance
    mean, cov = reference(x)
    assert stats.count == len(x)
    torch.testing.assert_close(stats.mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.covariance, cov, rtol=1e-5, atol=1e-4)


def test_rows_from_another_device_are_refused():
    stats = CovarianceStats(3)
    stats.update(torch.randn(4, 3))
    with pytest.raises(
        ValueError, match="calibration rows arrived on meta\nbut the statistics live on cpu"
    ):
        stats.update(torch.randn(4, 3, device="meta"))


def test_wide_rows_use_the_symmetric_product():
    """From 192 features the product is formed from its blocks on and above the diagonal; for
    any number of blocks (uneven ones too: 401 columns), waiting and immediate batches both match
    the float64 reference (rel. 1e-5) and the result is exactly symmetric."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1200, 401, generator=gen) + 2
    mean, cov = reference(x)
    for blocks, stage_rows in ((4, 1), (4, 8192), (2, 8192), (3, 1), (7, 8192)):
        stats = CovarianceStats(401)
        stats.stage_rows = stage_rows  # 1: promoted after every product; 8192: once, when read
        stats.symmetric_blocks = blocks
        for chunk in x.split([100, 900, 200]):  # 900 rows: more than the buffer holds
            stats.update(chunk)
        torch.testing.assert_close(stats.covariance, cov, rtol=1e-5, atol=1e-5)
        assert torch.equal(stats.sum_sq, stats.sum_sq.T)
