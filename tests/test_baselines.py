"""Tests of the benchmark baselines (benchmarks/baselines.py): SVD, ASVD and SVD-LLM.

They check the properties the papers claim and the comparisons the benchmark suite relies on,
on small seeded problems in float64.
"""

import copy

import pytest
import torch
from torch import nn

import torch_lowrank as tl
from benchmarks import baselines
from torch_lowrank import solvers

f64 = torch.float64


def problem(m=12, n=9, rows=400, seed=0, centred=False):
    """A weight and correlated inputs (zero-mean ones when ``centred``)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, n, generator=gen, dtype=f64)
    mix = torch.randn(n, n, generator=gen, dtype=f64) * torch.linspace(3, 0.1, n, dtype=f64)
    x = torch.randn(rows, n, generator=gen, dtype=f64) @ mix + torch.randn(n, generator=gen)
    if centred:
        x = x - x.mean(0)
    return weight, x


def moments_of(x):
    moments = baselines.Moments()
    moments.update(x)
    return moments


def output_error(weight, up, down, x):
    """Mean squared output error on the rows of ``x`` (no bias change, as the baselines)."""
    return (x @ (weight - up @ down).T).square().sum(1).mean().item()


def test_svd_llm_on_white_inputs_is_truncated_svd():
    weight, _ = problem()
    q, _ = torch.linalg.qr(
        torch.randn(300, 9, dtype=f64, generator=torch.Generator().manual_seed(1))
    )
    x = q * 300**0.5  # X^T X = 300 I exactly (up to rounding): white inputs
    up, down, info = baselines.svd_llm_factors(weight, moments_of(x).gram, rank=4)
    s_up, s_down = baselines.svd_factors(weight, rank=4)
    assert info["jitter_tries"] == 0
    torch.testing.assert_close(up @ down, s_up @ s_down, rtol=0, atol=1e-9)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_svd_llm_error_is_below_svd_and_equals_linear_on_zero_mean_inputs(rank):
    weight, x = problem(centred=True, seed=rank)
    up, down, _ = baselines.svd_llm_factors(weight, moments_of(x).gram, rank)
    s_up, s_down = baselines.svd_factors(weight, rank)
    llm_error = output_error(weight, up, down, x)
    assert llm_error <= output_error(weight, s_up, s_down, x) + 1e-9
    # SVD-LLM's truncation is optimal for the uncentred error; with zero-mean inputs that is
    # the centred error our `linear` minimises (its mean correction is then zero).
    ours = solvers.linear(weight, None, x.mean(0), torch.cov(x.T, correction=0), rank=rank)
    assert llm_error == pytest.approx(ours.error, rel=1e-8, abs=1e-10)


def test_svd_llm_drops_exactly_the_truncated_singular_values():
    weight, x = problem(seed=3)
    gram = moments_of(x).gram
    S, _ = baselines.whitening(gram)
    sigma = torch.linalg.svdvals(weight @ S)
    up, down, _ = baselines.svd_llm_factors(weight, gram, rank=5)
    error = output_error(weight, up, down, x) * len(x)  # the sum over rows
    assert error == pytest.approx(float(sigma[5:].square().sum()), rel=1e-8)


def test_asvd_with_alpha_zero_is_svd():
    weight, x = problem(seed=4)
    up, down = baselines.asvd_factors(weight, moments_of(x).abs_mean, rank=4, alpha=0.0)
    s_up, s_down = baselines.svd_factors(weight, rank=4)
    torch.testing.assert_close(up @ down, s_up @ s_down, rtol=0, atol=1e-9)


def test_asvd_scales_by_the_mean_absolute_input():
    weight, x = problem(seed=5)
    scale = x.abs().mean(0).sqrt() + baselines.ASVD_EPS
    up, down = baselines.asvd_factors(weight, moments_of(x).abs_mean, rank=3)
    s_up, s_down = baselines.svd_factors(weight * scale, rank=3)
    torch.testing.assert_close(up @ down, (s_up @ s_down) / scale, rtol=0, atol=1e-9)


def test_full_rank_reproduces_the_weight():
    weight, x = problem(m=7, n=10, seed=6)
    moments = moments_of(x)
    for up, down in (
        baselines.svd_factors(weight, 7),
        baselines.asvd_factors(weight, moments.abs_mean, 7),
        baselines.svd_llm_factors(weight, moments.gram, 7)[:2],
    ):
        torch.testing.assert_close(up @ down, weight, rtol=0, atol=1e-8)


def test_jitter_retry_on_rank_deficient_inputs():
    weight, x = problem(seed=7)
    x[:, 2] = 0.0  # a dead input: X^T X is singular and its Cholesky fails
    x = x[:5]  # and fewer rows than features
    gram = moments_of(x).gram
    assert int(torch.linalg.cholesky_ex(gram).info) != 0
    S, info = baselines.whitening(gram)
    assert info["jitter_tries"] >= 1 and info["shift"] > 0
    torch.testing.assert_close(S @ S.T, gram + info["shift"] * torch.eye(9, dtype=f64))
    up, down, _ = baselines.svd_llm_factors(weight, gram, rank=4)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    # rank 5 covers the 5 rows: the outputs on the calibration data are kept (nearly) exactly
    up, down, _ = baselines.svd_llm_factors(weight, gram, rank=5)
    assert output_error(weight, up, down, x) < 1e-6 * (x @ weight.T).square().sum(1).mean()


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 3 * 3, 24), nn.ReLU(), nn.Linear(24, 5),
    ).eval()  # fmt: skip


def test_conv_moments_match_the_library_patch_statistics():
    model = small_cnn()
    data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    moments = baselines.collect_moments(model, data, ["0", "2", "5"])
    converted = tl.convert(copy.deepcopy(model), rank=2, activation=None, samples=0)
    for name in ("0", "2", "5"):
        converted.get_submodule(name).stats_space = "input"
    tl.calibrate(converted, data, progress=False)
    for name in ("0", "2", "5"):
        stats = converted.get_submodule(name).stats[0]
        assert moments[name].count == stats.count
        second = moments[name].gram / stats.count  # float32 batch products in both
        torch.testing.assert_close(second, stats.second_moment, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", baselines.BASELINES)
def test_apply_baseline_uses_the_given_ranks_and_full_rank_is_exact(method):
    model = small_cnn()
    data = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    moments = baselines.collect_moments(model, data, ["0", "2", "5"])
    _, report = tl.compress(
        copy.deepcopy(model), data, ratio=0.5, method="linear", corrective=False,
        exclude="7", progress=False,
    )  # fmt: skip
    ranks = {row.name: row.rank for row in report.layers if row.rank is not None}
    low = copy.deepcopy(model)
    result = baselines.apply_baseline(low, method, ranks, moments)
    assert {name: low.get_submodule(name).rank for name in ranks} == ranks
    assert set(result.layers) == set(ranks)
    full = {"0": 8, "2": 16, "5": 24}
    exact = copy.deepcopy(model)
    baselines.apply_baseline(exact, method, full, moments)
    assert isinstance(exact.get_submodule("0"), tl.LowRankConv2d)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(exact(x), model(x), rtol=1e-4, atol=1e-4)
