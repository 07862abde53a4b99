"""Loss-aware output weighting (torch_lowrank/weighting.py, sensitivity.output_fisher): the
weighted closed forms are the weighted optima, report plain errors, reduce to the plain solve
under heavy damping, and the measurement of ``G`` changes nothing in the model."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_lowrank as tl
from torch_lowrank import solvers
from torch_lowrank.options import make_spec
from torch_lowrank.problem import GroupData
from torch_lowrank.sensitivity import output_fisher
from torch_lowrank.weighting import FisherWeighting, output_scale, solve_weighted

f64 = torch.float64


def moments(x):
    return x.mean(0), torch.cov(x.T, correction=0).reshape(x.shape[1], x.shape[1])


def planted(seed, m, n, rows=200):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen, dtype=f64) @ torch.randn(n, n, generator=gen, dtype=f64)
    x = x + torch.randn(n, generator=gen, dtype=f64)
    w = torch.randn(m, n, generator=gen, dtype=f64)
    b = torch.randn(m, generator=gen, dtype=f64)
    a = torch.randn(m, m, generator=gen, dtype=f64)
    return x, w, b, a @ a.T / m  # G: positive semi-definite


def weighted_group(w, b, x, G, damping, x_tilde=None):
    S, S_inv = output_scale(G, damping)
    mean, cov = moments(x)
    if x_tilde is None:
        return GroupData(w, b, mean, cov, scale=S, unscale=S_inv), S
    both = torch.cat([x_tilde, x], 1)
    n = x.shape[1]
    full = torch.cov(both.T, correction=0)
    group = GroupData(
        w, b, mean, cov, x_tilde.mean(0), full[:n, :n], full[:n, n:], scale=S, unscale=S_inv
    )
    return group, S


def error_on(x_in, x_out, w, b, f, S=None):
    """``E || S ((W x + b) - (Z x~ + c)) ||^2`` measured on the rows."""
    e = x_out @ w.T + b - (x_in @ f.down.T @ f.up.T + (0 if f.bias is None else f.bias))
    e = e if S is None else e @ S.T
    return float(e.square().sum(1).mean())


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 10), n=st.integers(2, 10), seed=st.integers(0, 999), frac=st.floats(0, 1))
def test_weighted_linear_is_the_weighted_optimum_and_reports_the_plain_error(m, n, seed, frac):
    """``Z = S^-1 P_r S W`` with ``P_r`` the top eigenvectors of ``S W C W^T S`` (to 1e-8);
    its weighted error is <= the plain solution's (1e-9 relative), its plain error >= the plain
    solution's, and the reported error is the plain error on the data (1e-8 relative)."""
    r = 1 + int(frac * (min(m, n) - 1))
    x, w, b, G = planted(seed, m, n)
    group, S = weighted_group(w, b, x, G, 0.1)
    plain_solve = lambda g: solvers.linear(g.weight, g.bias, g.mean, g.cov, rank=r)  # noqa: E731
    fit = solve_weighted(plain_solve, group, outputs=False, corrective=False)
    plain = solvers.linear(w, b, group.mean, group.cov, rank=r)

    mean, cov = moments(x)
    values, vectors = torch.linalg.eigh(S @ w @ cov @ w.T @ S)
    top = vectors[:, -r:]
    expected = torch.linalg.solve(S, top @ top.T @ S @ w)
    scale = 1.0 + float(w.abs().max())
    assert torch.allclose(fit.up @ fit.down, expected, atol=1e-8 * scale)
    assert torch.allclose(fit.up.T @ fit.up, torch.eye(r, dtype=f64), atol=1e-10)
    total = 1.0 + error_on(x, x, w, b, plain, S)
    assert error_on(x, x, w, b, fit, S) <= error_on(x, x, w, b, plain, S) + 1e-9 * total
    assert error_on(x, x, w, b, fit) >= plain.error - 1e-9 * (1.0 + plain.variance)
    assert fit.error == pytest.approx(error_on(x, x, w, b, fit), rel=1e-8, abs=1e-9)
    assert fit.variance == pytest.approx(plain.variance, rel=1e-10)
    assert fit.info["weighted"]


@pytest.mark.parametrize("seed", range(4))
def test_weighted_corrective_and_output_space_solves(seed):
    """Corrective: the weighted factors beat the plain ones on the weighted corrective error
    and report the plain corrective error measured on the rows (1e-8 relative). A narrowing
    layer solved from the moments of ``W x`` gives the same weighted factors as from ``x``."""
    m, n, r = 4, 9, 2
    x, w, b, G = planted(seed, m, n)
    gen = torch.Generator().manual_seed(seed + 100)
    x_tilde = x + 0.3 * torch.randn(x.shape, generator=gen, dtype=f64)
    group, S = weighted_group(w, b, x, G, 0.1, x_tilde)

    def corrective(g):
        return solvers.corrective(
            g.weight, g.bias, g.mean_tilde, g.cov_tilde, g.mean, g.cov, g.cross, rank=r
        )

    fit = solve_weighted(corrective, group, outputs=False, corrective=True)
    plain = corrective(group)
    assert error_on(x_tilde, x, w, b, fit, S) < error_on(x_tilde, x, w, b, plain, S)
    assert fit.error == pytest.approx(error_on(x_tilde, x, w, b, fit), rel=1e-8)

    inputs, _ = weighted_group(w, b, x, G, 0.1)
    y_mean, y_cov = moments(x @ w.T)
    outputs = GroupData(w, b, y_mean, y_cov, scale=inputs.scale, unscale=inputs.unscale)
    by_x = solve_weighted(
        lambda g: solvers.linear(g.weight, g.bias, g.mean, g.cov, rank=r), inputs, False, False
    )
    by_y = solve_weighted(
        lambda g: solvers.linear_from_outputs(g.weight, g.bias, g.mean, g.cov, rank=r),
        outputs, True, False,
    )  # fmt: skip
    assert torch.allclose(by_x.up @ by_x.down, by_y.up @ by_y.down, atol=1e-8)
    assert by_x.error == pytest.approx(by_y.error, rel=1e-8)


def test_heavy_damping_is_the_plain_solve_and_no_gradient_is_the_identity():
    x, w, b, G = planted(0, 6, 8)
    S, S_inv = output_scale(G, 0.1)
    damped = G + 0.1 * torch.trace(G) / 6 * torch.eye(6, dtype=f64)
    assert torch.allclose(S @ S, damped, atol=1e-10) and torch.allclose(
        S @ S_inv, torch.eye(6, dtype=f64), atol=1e-10
    )
    group, _ = weighted_group(w, b, x, G, 1e8)
    fit = solve_weighted(
        lambda g: solvers.linear(g.weight, g.bias, g.mean, g.cov, rank=3), group, False, False
    )
    plain = solvers.linear(w, b, group.mean, group.cov, rank=3)
    assert torch.allclose(fit.up @ fit.down, plain.up @ plain.down, atol=1e-6)
    eye, same = output_scale(torch.zeros(5, 5), 0.1)
    assert torch.equal(eye, torch.eye(5, dtype=f64)) and torch.equal(same, eye)


def test_output_fisher_is_the_gradient_second_moment_and_changes_nothing():
    """With ``loss = 0.5 sum ||out||^2`` the gradient at the last layer's output is the output
    itself: ``G = E[y y^T]`` (1e-5 relative). No parameter's ``.grad`` is set and the
    observers count no rows."""
    torch.manual_seed(0)
    model = tl.convert(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), rank=2)
    batches = [torch.randn(32, 6) for _ in range(3)]
    spec = FisherWeighting(loss=lambda out, batch: 0.5 * out.square().sum())
    layers = [model[0], model[2]]
    fisher = output_fisher(model, layers, batches, tl.default_forward, spec)
    assert all(m.observer.observation().samples_seen == 0 for m in layers)
    with torch.no_grad():
        y = torch.cat([model(x) for x in batches])
    assert torch.allclose(fisher[model[2]], (y.T @ y / len(y)).double(), rtol=1e-5, atol=1e-7)
    assert fisher[model[0]].shape == (8, 8)
    assert all(p.grad is None for p in model.parameters())


def test_output_fisher_of_a_conv_is_over_channels_and_counts_every_position():
    torch.manual_seed(0)
    model = tl.convert(
        nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(5 * 36, 4)), rank=2
    )
    batches = [torch.randn(8, 3, 8, 8)]
    spec = FisherWeighting(loss=lambda out, batch: 0.5 * out.square().sum())
    fisher = output_fisher(model, [model[0], model[2]], batches, tl.default_forward, spec)
    assert fisher[model[0]].shape == (5, 5)
    assert torch.all(torch.linalg.eigvalsh(fisher[model[0]]) > -1e-9)


def classifier(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 36, 16), nn.ReLU(), nn.Linear(16, 5),
    ).eval()  # fmt: skip


def test_compress_with_fisher_weighting_on_convs_grouped_and_folded():
    """Every layer is solved weighted (a folded BatchNorm, a grouped conv, Linears); the
    report gives plain relative errors in [0, 1] and the weighting it used."""
    model = classifier()
    with torch.no_grad():  # a BatchNorm that is not the identity
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].running_mean.uniform_(-1, 1)
    data = [torch.randn(16, 2, 6, 6) for _ in range(3)]
    low, report = tl.compress(
        copy.deepcopy(model), data, ratio=0.5, method="linear", weighting="fisher", progress=False
    )
    assert report.info["weighting"] == {"damping": 0.1, "layers": 4}
    assert all(0.0 <= row.relative_error <= 1.0 for row in report.layers if row.rank)
    x = torch.randn(8, 2, 6, 6)
    with torch.no_grad():
        assert torch.isfinite(low(x)).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"weighting": "fisher", "corrective": False}, ValueError, "corrective"),
        ({"weighting": "fisher", "method": "svd"}, ValueError, "svd"),
        ({"weighting": {"damping": -1.0}}, ValueError, "damping"),
        ({"weighting": {"damping": float("nan")}}, ValueError, "damping"),
        ({"weighting": {"batches": 0}}, ValueError, "batches"),
        ({"weighting": {"dampng": 1.0}}, TypeError, "dampng"),
        ({"weighting": "kfac"}, TypeError, "kfac"),
    ],
)
def test_bad_weighting_changes_nothing(kwargs, error, match):
    model = classifier()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        tl.compress(model, [torch.randn(4, 2, 6, 6)], ratio=0.5, progress=False, **kwargs)
    assert all(isinstance(m, (nn.Conv2d, nn.Linear)) for m in (model[0], model[3], model[6]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_recover_refuses_weighting_without_data():
    model = tl.convert(nn.Sequential(nn.Linear(4, 4)), rank=1)
    tl.calibrate(model, [torch.randn(8, 4)], progress=False)
    with pytest.raises(ValueError, match="data="):
        tl.recover_(model, method="linear", weighting="fisher", progress=False)
    assert model[0].calibrating
    assert make_spec(FisherWeighting, None, what="weighting") is None
    assert make_spec(FisherWeighting, "fisher", what="w", names=("fisher",)) == FisherWeighting()
