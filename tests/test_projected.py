"""Tests of activation-aware recovery (torch_lowrank/projected.py, nuclear.py): the paper's third
theorem on planted models, the never-worse guarantee, the projection, the optimizer hook, nuclear
norm."""

import math

import pytest
import torch
import torch.nn.functional as F
import torch_optimizer
from hypothesis import given, settings
from hypothesis import strategies as st
from planted import ACT, assert_orthonormal, f64, linear_start, output_variance, planted, post_error

from torch_lowrank import nuclear, projected, solvers

pytestmark = pytest.mark.usefixtures("single_thread")


def test_third_theorem_noise_free_relu_recovery_goes_to_zero():
    """Noise-free planted ReLU model (6 live units of rank 2 plus 6 dead units), rank 2,
    3 seeds. With N = 2000 samples the ReLU recovery's post-activation error on 4000 fresh
    rows is <= 1e-4 of the output variance for every seed (typically 1e-7 and below), while
    the linear start's is >= 0.5 of it; the median fresh error over the seeds shrinks from
    N = 20 to 200 to 2000 (strictly, until it reaches rounding level, 1e-20), and on the
    calibration rows the objective is <= 1e-6."""
    medians = []
    for rows in (20, 200, 2000):
        errors = []
        for seed in range(3):
            weight, bias, sample = planted(seed)
            x, fresh = sample(rows), sample(4000)
            start = linear_start(weight, bias, x, 2)
            fit = projected.activation_aware(weight, bias, x, start, "relu", max_iter=2000, tol=0)
            variance = output_variance(weight, bias, fresh)
            errors.append(post_error(weight, bias, fit, fresh) / variance)
            linear_error = post_error(weight, bias, start, fresh) / variance
            assert errors[-1] < linear_error
            if rows == 2000:
                assert errors[-1] <= 1e-4 and linear_error >= 0.5
                assert fit.error <= 1e-6 * output_variance(weight, bias, x)
        medians.append(sorted(errors)[1])
    assert medians[0] > medians[1] and (medians[1] > medians[2] or medians[1] <= 1e-20)


layer = st.tuples(
    st.integers(1, 6),  # live units
    st.integers(0, 4),  # dead units
    st.integers(2, 8),  # input width
    st.integers(1, 4),  # rank
)


@settings(max_examples=30, deadline=None)
@given(
    shape=layer,
    rows=st.integers(1, 80),
    sigma=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 9999),
)
def test_relu_is_never_worse_than_linear_on_its_objective(shape, rows, sigma, seed):
    """Over shapes, ranks, sample counts, noise levels: ``f(relu) <= f(linear)`` (to 1e-12
    relative), the post-activation error on the calibration rows is <= ``f`` (the upper bound),
    the rank is kept, ``up`` is orthonormal (1e-10) and the reported numbers are consistent."""
    alive, dead, n, r = shape
    weight, bias, sample = planted(seed, alive, dead, n, min(r, n), sigma=sigma)
    r = min(r, alive + dead, weight.shape[1])
    x = sample(rows)
    start = linear_start(weight, bias, x, r)
    fit = projected.activation_aware(weight, bias, x, start, "relu", max_iter=100)
    before = projected.objective(weight, bias, x, start, "relu")
    after = projected.objective(weight, bias, x, fit, "relu")
    scale = 1e-12 * (1.0 + before)
    assert after <= before + scale
    assert post_error(weight, bias, fit, x) <= after + scale
    assert fit.rank == r and fit.up.shape == (weight.shape[0], r) and fit.bias is not None
    assert all(torch.isfinite(t).all() for t in (fit.up, fit.down, fit.bias))
    assert_orthonormal(fit.up)
    assert fit.info["objective_before"] == pytest.approx(before, rel=1e-9, abs=1e-15)
    assert fit.info["objective_after"] == pytest.approx(after, rel=1e-9, abs=1e-15)
    assert fit.error == pytest.approx(after, rel=1e-9, abs=1e-15)
    assert fit.variance == pytest.approx(output_variance(weight, bias, x), rel=1e-9, abs=1e-15)
    assert fit.info["activation"] == "relu" and torch.equal(fit.spectrum, start.spectrum)


def test_noisy_relu_beats_linear_on_fresh_data_on_average():
    """Noise sigma = 0.2 on the pre-activations, 200 samples, rank 2, 8 seeds: the mean
    post-activation error of the dense layer's output on 2000 fresh rows is < 0.3 x that of
    the linear start (measured: about 0.07 x)."""
    relu_errors, linear_errors = [], []
    for seed in range(8):
        weight, bias, sample = planted(seed, sigma=0.2)
        x, fresh = sample(200), sample(2000)
        start = linear_start(weight, bias, x, 2)
        fit = projected.activation_aware(weight, bias, x, start, "relu")
        relu_errors.append(post_error(weight, bias, fit, fresh))
        linear_errors.append(post_error(weight, bias, start, fresh))
    assert sum(relu_errors) < 0.3 * sum(linear_errors)


@pytest.mark.parametrize("activation, margin", [("gelu", 3.0), ("silu", 6.0), ("tanh", 0.0)])
def test_smooth_activation_beats_linear_on_fresh_data(activation, margin):
    """Planted model with saturated units (GELU/SiLU ~ 0, tanh ~ -1 there), 500 samples, rank 2,
    5 seeds: on 4000 fresh rows the post-activation error is below the linear start's for
    every seed and below 0.85 x in total (measured 0.45-0.78 x per seed)."""
    act, fits, starts = ACT[activation], [], []
    for seed in range(5):
        weight, bias, sample = planted(seed, margin=margin)
        x, fresh = sample(500), sample(4000)
        start = linear_start(weight, bias, x, 2)
        fit = projected.activation_aware(weight, bias, x, start, activation)
        fits.append(post_error(weight, bias, fit, fresh, act))
        starts.append(post_error(weight, bias, start, fresh, act))
        assert fits[-1] < starts[-1]
        assert fit.error <= projected.objective(weight, bias, x, start, activation)
    assert sum(fits) < 0.85 * sum(starts)


@pytest.mark.parametrize("activation", [*ACT, "callable"])
def test_every_activation_is_never_worse_and_keeps_the_rank(activation):
    """Random dense layers (no planted structure), m > n and m < n: never worse on the
    objective, rank kept, orthonormal ``up``, the objective matching the formula."""
    act = (lambda a: torch.sin(a) + a) if activation == "callable" else activation
    fn = act if activation == "callable" else ACT[activation]
    for m, n in ((12, 7), (7, 12)):
        gen = torch.Generator().manual_seed(m)
        weight = torch.randn(m, n, generator=gen, dtype=f64)
        bias = torch.randn(m, generator=gen, dtype=f64)
        x = torch.randn(150, n, generator=gen, dtype=f64)
        start = linear_start(weight, bias, x, 3)
        fit = projected.activation_aware(weight, bias, x, start, act, max_iter=50)
        assert fit.rank == 3 and torch.linalg.matrix_rank(fit.up @ fit.down) <= 3
        assert_orthonormal(fit.up)
        assert fit.error <= projected.objective(weight, bias, x, start, act)
        if activation != "relu":  # the plain post-activation error
            a = x @ fit.down.T @ fit.up.T + fit.bias
            expected = (fn(a) - fn(x @ weight.T + bias)).square().sum(1).mean().item()
            assert fit.error == pytest.approx(expected, rel=1e-10)


def test_relu_objective_formula():
    """f = (1/N) [sum over t > 0 of (a - y)^2 + sum over t = 0 of max(0, a)^2], to 1e-12."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(5, 4, generator=gen, dtype=f64), torch.randn(5, dtype=f64)
    x = torch.randn(30, 4, generator=gen, dtype=f64)
    fit = solvers.svd(weight, bias, rank=2)
    y = x @ weight.T + bias
    a = x @ fit.down.T @ fit.up.T + fit.bias
    expected = torch.where(y > 0, a - y, a.clamp_min(0)).square().sum() / 30
    assert projected.objective(weight, bias, x, fit, "relu") == pytest.approx(
        expected.item(), rel=1e-12
    )


def test_corrective_targets_come_from_target_rows():
    """With ``target_rows`` the targets are act(W x + b) on those rows while the factors see
    ``rows``; the default is ``target_rows = rows``; never worse than the start either way."""
    weight, bias, sample = planted(0)
    x = sample(300)
    x_tilde = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=f64)
    start = linear_start(weight, bias, x_tilde, 2)
    fit = projected.activation_aware(weight, bias, x_tilde, start, "gelu", target_rows=x)
    a = x_tilde @ fit.down.T @ fit.up.T + fit.bias
    expected = (F.gelu(a) - F.gelu(x @ weight.T + bias)).square().sum(1).mean().item()
    assert fit.error == pytest.approx(expected, rel=1e-10)
    assert fit.error <= projected.objective(weight, bias, x_tilde, start, "gelu", target_rows=x)
    same = projected.activation_aware(weight, bias, x, start, "relu", target_rows=x)
    default = projected.activation_aware(weight, bias, x, start, "relu")
    torch.testing.assert_close(same.up @ same.down, default.up @ default.down, rtol=0, atol=0)


def test_subspace_projection_descends_and_keeps_rank():
    """One subspace-iteration step from the previous subspace U returns rank <= r, an
    orthonormal basis, and is never farther from Z than the projection on U itself (the
    property that makes every projected step a descent step); it matches the truncated SVD
    after repeated application (1e-8)."""
    gen = torch.Generator().manual_seed(0)
    for m, n, r in ((10, 6, 2), (6, 10, 3), (8, 8, 8)):
        U = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=f64)).Q
        Z = U @ torch.randn(r, n, generator=gen, dtype=f64)
        Z = Z + 0.3 * torch.randn(m, n, generator=gen, dtype=f64)
        new_up, new_down = projected._project(Z, U)
        assert_orthonormal(new_up)
        assert torch.linalg.matrix_rank(new_up @ new_down) <= r
        assert torch.dist(new_up @ new_down, Z) <= torch.dist(U @ (U.T @ Z), Z) + 1e-12
        for _ in range(300):
            new_up, new_down = projected._project(Z, new_up)
        left, s, right = torch.linalg.svd(Z)
        best = left[:, :r] * s[:r] @ right[:r]
        torch.testing.assert_close(new_up @ new_down, best, atol=1e-8, rtol=0)


def test_subspace_and_full_svd_projection_agree(monkeypatch):
    """The loop with the O(mnr) projection reaches the objective of the loop with a full SVD
    each iteration, within 1% of the start's objective (planted ReLU model, 500 iterations)."""
    weight, bias, sample = planted(3)
    x = sample(300)
    start = linear_start(weight, bias, x, 2)
    fast = projected.activation_aware(weight, bias, x, start, "relu", max_iter=500, tol=0)

    def svd_projection(Z, U, step=None):
        left, s, right = torch.linalg.svd(Z, full_matrices=False)
        return left[:, : U.shape[1]], s[: U.shape[1], None] * right[: U.shape[1]]

    monkeypatch.setattr(projected, "_project", svd_projection)
    exact = projected.activation_aware(weight, bias, x, start, "relu", max_iter=500, tol=0)
    assert abs(fast.error - exact.error) <= 0.01 * fast.info["objective_before"]


@pytest.mark.parametrize(
    "optimizer, activation",
    [
        (torch.optim.Adam, "relu"),
        (torch.optim.Adam, "gelu"),
        (torch_optimizer.RAdam, "relu"),
        (torch_optimizer.Lamb, "silu"),
    ],
)
def test_optimizer_hook(optimizer, activation):
    """Any torch.optim / torch_optimizer class: strictly better than the start on the objective,
    rank 2 kept (matrix rank of the product too), ``up`` orthonormal."""
    weight, bias, sample = planted(1, margin=4.0)
    x = sample(300)
    start = linear_start(weight, bias, x, 2)
    fit = projected.activation_aware(
        weight, bias, x, start, activation, optimizer=optimizer, lr=1e-2, max_iter=100
    )
    assert fit.info["objective_after"] < fit.info["objective_before"]
    assert fit.error <= projected.objective(weight, bias, x, start, activation)
    assert fit.rank == 2 and torch.linalg.matrix_rank(fit.up @ fit.down) <= 2
    assert_orthonormal(fit.up)


@pytest.mark.parametrize("optimizer, lr", [(torch.optim.SGD, 1e300), (torch.optim.Adam, 1e200)])
def test_non_finite_iterates_stop_and_keep_the_best(optimizer, lr):
    """A step that overflows ends the loop: the result is finite and no worse than the start."""
    weight, bias, sample = planted(2)
    x = sample(100)
    start = linear_start(weight, bias, x, 2)
    for activation in ("gelu", "tanh"):
        fit = projected.activation_aware(
            weight, bias, x, start, activation, optimizer=optimizer, lr=lr
        )
        assert all(torch.isfinite(t).all() for t in (fit.up, fit.down, fit.bias))
        assert math.isfinite(fit.error) and fit.info["iterations"] <= 3
        assert fit.error <= projected.objective(weight, bias, x, start, activation)


def test_returns_the_start_when_nothing_improves():
    """``max_iter=0`` gives back the start's factors themselves; an exact start stays exact
    (objective <= 1e-20, the same product to 1e-10)."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(6, 4, generator=gen, dtype=f64), torch.randn(6, dtype=f64)
    x = torch.randn(40, 4, generator=gen, dtype=f64)
    start = linear_start(weight, bias, x, 2)
    fit = projected.activation_aware(weight, bias, x, start, "gelu", max_iter=0)
    assert fit.info["iterations"] == 0
    assert torch.equal(fit.up, start.up) and torch.equal(fit.down, start.down)
    assert torch.equal(fit.bias, start.bias)
    exact = linear_start(weight, bias, x, 4)
    fit = projected.activation_aware(weight, bias, x, exact, "relu")
    torch.testing.assert_close(fit.up @ fit.down, exact.up @ exact.down, atol=1e-10, rtol=0)
    assert fit.error <= 1e-20


def test_low_precision_inputs_and_no_bias():
    """float32 weight, float16 rows, no bias: float64 factors with a bias, no worse."""
    weight, _, sample = planted(0)
    x = sample(200)
    start = linear_start(weight, None, x, 2)
    fit = projected.activation_aware(weight.float(), None, x.half(), start, "relu")
    assert fit.up.dtype == fit.down.dtype == fit.bias.dtype == f64 and fit.bias.shape == (12,)
    assert fit.error <= projected.objective(weight.float(), None, x.half(), start, "relu")


def test_global_random_state_is_untouched():
    weight, bias, sample = planted(0)
    x = sample(50)
    start = linear_start(weight, bias, x, 2)
    state = torch.get_rng_state()
    projected.activation_aware(weight, bias, x, start, "relu", max_iter=5)
    assert torch.equal(state, torch.get_rng_state())


def test_errors():
    weight, bias, sample = planted(0)
    x = sample(20)
    start = linear_start(weight, bias, x, 2)
    run = projected.activation_aware
    with pytest.raises(ValueError, match=r"expected an activation in .*\nbut got 'softmax'"):
        run(weight, bias, x, start, "softmax")
    with pytest.raises(ValueError, match=r"expected rows of shape \(N, 8\) with N >= 1\nbut got"):
        run(weight, bias, x[:, :5], start, "relu")
    with pytest.raises(ValueError, match=r"expected bias of shape \(12,\)\nbut got shape \(3,\)"):
        run(weight, bias[:3], x, start, "relu")
    with pytest.raises(ValueError, match=r"expected target_rows of shape \(20, 8\)\nbut got"):
        run(weight, bias, x, start, "relu", target_rows=x[:10])
    with pytest.raises(
        ValueError, match=r"expected start.up of shape \(5, r\)\nbut got shape \(12, 2\)"
    ):
        run(weight[:5], bias[:5], x, start, "relu")
    bad = x.clone()
    bad[3, 1] = math.nan
    with pytest.raises(ValueError, match=r"expected finite rows\nbut got 1 non-finite"):
        run(weight, bias, bad, start, "relu")
    with pytest.raises(ValueError, match=r"expected a learning rate lr with an optimizer\n"):
        run(weight, bias, x, start, "relu", optimizer=torch.optim.Adam)
    with pytest.raises(ValueError, match=r"expected at most one of lam or rank\nbut got both"):
        nuclear.nuclear(weight, bias, x, start, lam=1.0, rank=2)
    with pytest.raises(ValueError, match=r"expected a rank in \[1, 8\]\nbut got 9"):
        nuclear.nuclear(weight, bias, x, start, rank=9)
    with pytest.raises(ValueError, match=r"expected lam >= 0\nbut got -1"):
        nuclear.nuclear(weight, bias, x, start, lam=-1.0)
