"""Tests of the pure solvers (torch_lowrank/solvers.py): the recovery guarantees themselves."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_lowrank import solvers

f64 = torch.float64


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), torch.cov(x.T, correction=0).reshape(x.shape[1], x.shape[1])


def data_error(weight, bias, factors, x) -> float:
    """Mean squared output error measured directly on the rows of ``x``."""
    y = x @ weight.T + (0 if bias is None else bias)
    y_hat = x @ factors.down.T @ factors.up.T + (0 if factors.bias is None else factors.bias)
    return (y - y_hat).square().sum(1).mean().item()


def brute_force_linear(weight, bias, x, r):
    """The optimum from the m x m output covariance of the data, no tricks."""
    y = x @ weight.T
    yc = y - y.mean(0)
    evals, evecs = torch.linalg.eigh(yc.T @ yc / len(x))
    p = evecs[:, -r:]
    return p @ p.T @ weight, evals.flip(0).clamp_min(0)


layer_shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))


@settings(max_examples=60, deadline=None)
@given(
    shape=layer_shapes,
    rank_frac=st.floats(0, 1),
    rows=st.integers(1, 60),
    seed=st.integers(0, 9999),
)
def test_linear_error_is_the_eigenvalue_tail_and_never_above_svd(shape, rank_frac, rows, seed):
    """On the calibration data the linear error equals the tail of the output-covariance
    spectrum (abs. tol 1e-9 of the output variance) and is <= truncated SVD's error."""
    m, n = shape
    r = 1 + int(rank_frac * (min(m, n) - 1))
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen, dtype=f64)
    x = torch.randn(rows, n, generator=gen, dtype=f64) @ mix + torch.randn(
        n, generator=gen, dtype=f64
    )
    weight = torch.randn(m, n, generator=gen, dtype=f64)
    bias = torch.randn(m, generator=gen, dtype=f64)
    mean, cov = moments(x)

    fit = solvers.linear(weight, bias, mean, cov, rank=r)
    base = solvers.svd(weight, bias, rank=r, mean=mean, cov=cov)
    _, spectrum = brute_force_linear(weight, bias, x, r)
    scale = 1e-9 * (1.0 + float(spectrum.sum()))

    measured = data_error(weight, bias, fit, x)
    assert fit.rank == r
    assert abs(measured - fit.error) <= scale
    assert abs(measured - float(spectrum[r:].sum())) <= scale
    assert measured <= data_error(weight, bias, base, x) + scale
    assert abs(data_error(weight, bias, base, x) - base.error) <= scale


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)])
def test_linear_matches_brute_force_product_on_both_paths(shape):
    """m <= n solves in output space, m > n in input space: both give the optimum's Z."""
    torch.manual_seed(0)
    m, n = shape
    x = torch.randn(500, n, dtype=f64) @ torch.randn(n, n, dtype=f64)
    weight = torch.randn(m, n, dtype=f64)
    mean, cov = moments(x)
    for r in range(1, min(m, n) + 1):
        fit = solvers.linear(weight, None, mean, cov, rank=r)
        z, _ = brute_force_linear(weight, None, x, r)
        torch.testing.assert_close(fit.up @ fit.down, z, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(fit.up.T @ fit.up, torch.eye(r, dtype=f64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("shape", [(5, 9), (9, 5)])
def test_full_rank_reproduces_the_layer(shape):
    torch.manual_seed(1)
    m, n = shape
    x = torch.randn(200, n, dtype=f64)
    weight, bias = torch.randn(m, n, dtype=f64), torch.randn(m, dtype=f64)
    fit = solvers.linear(weight, bias, *moments(x), rank=min(m, n))
    torch.testing.assert_close(fit.up @ fit.down, weight, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fit.bias, bias, rtol=1e-9, atol=1e-9)
    assert fit.error == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("shape", [(7, 11), (11, 7)])
def test_identity_covariance_reproduces_truncated_svd(shape):
    """With C = I the data-driven optimum is the truncated SVD (distinct singular values)."""
    torch.manual_seed(2)
    m, n = shape
    weight = torch.randn(m, n, dtype=f64)
    mean, cov = torch.zeros(n, dtype=f64), torch.eye(n, dtype=f64)
    for r in (1, 3, min(m, n)):
        fit = solvers.linear(weight, None, mean, cov, rank=r)
        base = solvers.svd(weight, None, rank=r, mean=mean, cov=cov)
        torch.testing.assert_close(fit.up @ fit.down, base.up @ base.down, rtol=1e-8, atol=1e-8)
        assert fit.error == pytest.approx(base.error, rel=1e-8, abs=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(2, 16),
    n=st.integers(2, 16),
    r=st.integers(1, 4),
    extra_rows=st.integers(0, 40),
    seed=st.integers(0, 9999),
)
def test_first_theorem_noise_free_planted_recovery_is_exact(m, n, r, extra_rows, seed):
    """Inputs on an r-dimensional subspace make the layer's outputs exactly rank r: the linear
    recovery at rank r reproduces them (rel. error < 1e-9) on the calibration rows and on fresh
    rows of the same model, from as few as r + 1 samples; SVD of the weights does not."""
    r = min(r, m, n)
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(n, r, generator=gen, dtype=f64)
    offset = torch.randn(n, generator=gen, dtype=f64)
    weight = torch.randn(m, n, generator=gen, dtype=f64)
    bias = torch.randn(m, generator=gen, dtype=f64)

    def sample(rows):
        return torch.randn(rows, r, generator=gen, dtype=f64) @ basis.T + offset

    x = sample(r + 1 + extra_rows)
    fit = solvers.linear(weight, bias, *moments(x), rank=r)
    fresh = sample(100)
    variance = (fresh @ weight.T).var(0, correction=0).sum().item()
    assert data_error(weight, bias, fit, x) <= 1e-9 * variance
    assert data_error(weight, bias, fit, fresh) <= 1e-9 * variance
    assert fit.relative_error <= 1e-9


def test_first_theorem_svd_is_not_exact_on_the_same_data():
    """The contrast for the test above: the weights alone do not know the data's subspace."""
    torch.manual_seed(3)
    m, n, r = 12, 12, 3
    x = torch.randn(50, r, dtype=f64) @ torch.randn(n, r, dtype=f64).T
    weight = torch.randn(m, n, dtype=f64)
    base = solvers.svd(weight, None, rank=r, mean=x.mean(0), cov=moments(x)[1])
    assert base.relative_error > 0.05


def test_second_theorem_noisy_recovery_error_shrinks_with_samples():
    """Observations y = Z* x + noise (the noise enters as extra inputs with an identity map):
    the recovered map of x approaches the planted rank-r Z* as the sample count grows, roughly
    like 1/sqrt(N): from N=100 to N=10,000 the median error over 5 seeds drops >= 4x."""
    m, n, r, sigma = 10, 8, 2, 0.5
    errors = []
    for rows in (100, 1000, 10000):
        per_seed = []
        for seed in range(5):
            gen = torch.Generator().manual_seed(seed)
            z_star = torch.randn(m, r, generator=gen, dtype=f64) @ torch.randn(
                r, n, generator=gen, dtype=f64
            )
            weight = torch.cat([z_star, torch.eye(m, dtype=f64)], dim=1)  # y = Z* x + eps
            x = torch.randn(rows, n, generator=gen, dtype=f64)
            eps = sigma * torch.randn(rows, m, generator=gen, dtype=f64)
            fit = solvers.linear(weight, None, *moments(torch.cat([x, eps], 1)), rank=r)
            z = (fit.up @ fit.down)[:, :n]
            per_seed.append(
                (torch.linalg.matrix_norm(z - z_star) / torch.linalg.matrix_norm(z_star)).item()
            )
        errors.append(sorted(per_seed)[2])
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] <= errors[0] / 4


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_singular_covariance_is_fine(shape):
    """Dead inputs and fewer samples than features: finite factors, error = tail, <= svd."""
    torch.manual_seed(4)
    m, n = shape
    x = torch.randn(3, n, dtype=f64)
    x[:, 0] = 0.0  # a dead input
    weight, bias = torch.randn(m, n, dtype=f64), torch.randn(m, dtype=f64)
    mean, cov = moments(x)
    for r in range(1, min(m, n) + 1):
        fit = solvers.linear(weight, bias, mean, cov, rank=r)
        assert all(torch.isfinite(t).all() for t in (fit.up, fit.down, fit.bias))
        measured = data_error(weight, bias, fit, x)
        assert measured == pytest.approx(fit.error, abs=1e-9)
        base = solvers.svd(weight, bias, rank=r, mean=mean, cov=cov)
        assert measured <= data_error(weight, bias, base, x) + 1e-9


def test_bias_free_layer_without_added_bias_solves_the_uncentred_problem():
    torch.manual_seed(5)
    x = torch.randn(400, 9, dtype=f64) + 2.0
    weight = torch.randn(7, 9, dtype=f64)
    mean, cov = moments(x)
    fit = solvers.linear(weight, None, mean, cov, rank=3, add_bias=False)
    assert fit.bias is None
    assert data_error(weight, None, fit, x) == pytest.approx(fit.error, rel=1e-9)
    # Optimum without intercept: the tail of the uncentred output second moment.
    y = x @ weight.T
    tail = torch.linalg.eigvalsh(y.T @ y / len(x)).flip(0)[3:].sum().item()
    assert fit.error == pytest.approx(tail, rel=1e-9)
    with_bias = solvers.linear(weight, None, mean, cov, rank=3, add_bias=True)
    assert with_bias.bias is not None and with_bias.error <= fit.error
    assert fit.variance == pytest.approx(with_bias.variance, rel=1e-9)


def test_select_rank_by_energy():
    spectrum = torch.tensor([5.0, 3.0, 1.5, 0.5], dtype=f64)  # cumulative 0.5, 0.8, 0.95, 1.0
    assert solvers.select_rank(spectrum, energy=0.5) == 1
    assert solvers.select_rank(spectrum, energy=0.51) == 2
    assert solvers.select_rank(spectrum, energy=0.95) == 3
    assert solvers.select_rank(spectrum, energy=1.0) == 4
    assert solvers.select_rank(torch.tensor([1.0, 0.0, 0.0]), energy=1.0) == 1
    assert solvers.select_rank(torch.zeros(3), energy=0.5) == 1
    x = torch.randn(100, 6, dtype=f64)
    fit = solvers.linear(torch.randn(5, 6, dtype=f64), None, *moments(x), energy=0.9)
    kept = fit.spectrum[: fit.rank].sum() / fit.spectrum.sum()
    assert kept >= 0.9 and (
        fit.rank == 1 or fit.spectrum[: fit.rank - 1].sum() / fit.spectrum.sum() < 0.9
    )


def test_select_rank_errors():
    with pytest.raises(ValueError, match="exactly one of rank or energy"):
        solvers.select_rank(torch.ones(3))
    with pytest.raises(ValueError, match=r"rank must be in \[1, 3\]\nbut got 4"):
        solvers.select_rank(torch.ones(3), rank=4)


@settings(max_examples=40, deadline=None)
@given(
    shape=layer_shapes,
    rows=st.integers(2, 40),
    seed=st.integers(0, 2**16),
    paired=st.booleans(),
    biases=st.booleans(),
)
def test_output_error_is_the_error_on_the_rows(shape, rows, seed, paired, biases):
    """``output_error`` from moments equals ``mean || (T x + b) - (P x~ + c) ||^2`` measured on
    the rows (``x~ = x`` unless paired), and the variance ``mean || T x - E T x ||^2``; both to
    1e-9 of the scale ``1 + mean || T x ||^2 + mean || P x~ ||^2``."""
    m, n = shape
    g = torch.Generator().manual_seed(seed)
    T, P = torch.randn(m, n, generator=g, dtype=f64), torch.randn(m, n, generator=g, dtype=f64)
    x = torch.randn(rows, n, generator=g, dtype=f64) + torch.randn(n, generator=g, dtype=f64)
    x_t = x + 0.3 * torch.randn(rows, n, generator=g, dtype=f64) if paired else x
    b = torch.randn(m, generator=g, dtype=f64) if biases else None
    c = torch.randn(m, generator=g, dtype=f64) if biases else None
    mean, cov = moments(x)
    pairs = None
    if paired:
        mean_t, cov_t = moments(x_t)
        pairs = (mean_t, cov_t, (x_t - mean_t).T @ (x - mean) / rows)
    error, variance = solvers.output_error(T, P, b, c, mean, cov, pairs)
    y = x @ T.T + (0 if b is None else b)
    y_hat = x_t @ P.T + (0 if c is None else c)
    scale = 1 + (x @ T.T).square().sum(1).mean() + (x_t @ P.T).square().sum(1).mean()
    assert error == pytest.approx((y - y_hat).square().sum(1).mean().item(), abs=1e-9 * scale)
    centred = x @ T.T - (x @ T.T).mean(0)
    assert variance == pytest.approx(centred.square().sum(1).mean().item(), abs=1e-9 * scale)
