"""Tests of corrective recovery (torch_lowrank/corrective.py, solvers.corrective)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_lowrank as tl
from torch_lowrank import LowRankLinear, solvers
from torch_lowrank.activations import FoldedBatchNorm
from torch_lowrank.cross import CrossStats

f64 = torch.float64


def moments(x):
    return x.mean(0), torch.cov(x.T, correction=0)


@pytest.mark.parametrize("shape", [(6, 9), (9, 6)])
def test_identical_inputs_reduce_to_linear(shape):
    torch.manual_seed(0)
    m, n = shape
    x = torch.randn(300, n, dtype=f64) @ torch.randn(n, n, dtype=f64) + 1.0
    weight, bias = torch.randn(m, n, dtype=f64), torch.randn(m, dtype=f64)
    stats = CrossStats(n)
    stats.update(x, x)
    for r in (1, 3):
        fit = solvers.corrective(
            weight, bias, stats.mean_tilde, stats.covariance_tilde, stats.mean,
            stats.covariance, stats.cross, rank=r,
        )  # fmt: skip
        plain = solvers.linear(weight, bias, *moments(x), rank=r)
        torch.testing.assert_close(fit.up @ fit.down, plain.up @ plain.down, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(fit.bias, plain.bias, rtol=1e-8, atol=1e-8)
        assert fit.error == pytest.approx(plain.error, rel=1e-6, abs=1e-9)


def test_second_layer_undoes_the_first_layers_error_where_rank_permits():
    """Inputs on a 3-dimensional subspace; layer 1 truncated by SVD at rank 3 loses directions
    the data uses, but its output still determines the input. The corrective layer 2 at rank 3
    then reproduces the original two-layer output exactly (rel. error < 1e-6: rounding), while the
    parallel (per-layer) solution does not."""
    torch.manual_seed(1)
    n, h, m, k = 10, 10, 8, 3
    x = torch.randn(400, k, dtype=f64) @ torch.randn(k, n, dtype=f64)  # (N, n) rank-3 data
    w1, w2 = torch.randn(h, n, dtype=f64), torch.randn(m, h, dtype=f64)
    first = solvers.svd(w1, None, rank=k)
    hidden, hidden_tilde = x @ w1.T, x @ (first.up @ first.down).T
    target = hidden @ w2.T

    stats = CrossStats(h)
    stats.update(hidden_tilde, hidden)
    moments_ = (stats.mean_tilde, stats.covariance_tilde, stats.mean, stats.covariance, stats.cross)
    variance = (target - target.mean(0)).square().sum(1).mean()
    for damping, tolerance in ((1e-12, 1e-6), (1e-2, 1e-3)):
        fit = solvers.corrective(w2, None, *moments_, rank=k, damping=damping)
        out = hidden_tilde @ fit.down.T @ fit.up.T + fit.bias
        assert ((out - target).square().sum(1).mean() / variance).item() < tolerance
        assert fit.relative_error < tolerance

    parallel = solvers.linear(w2, None, *moments(hidden), rank=k)
    out_parallel = hidden_tilde @ parallel.down.T @ parallel.up.T + parallel.bias
    assert ((out_parallel - target).square().sum(1).mean() / variance).item() > 1e-2


def test_corrective_error_is_the_measured_error():
    torch.manual_seed(2)
    x = torch.randn(500, 7, dtype=f64)
    x_tilde = x + 0.3 * torch.randn(500, 7, dtype=f64) @ torch.randn(7, 7, dtype=f64)
    weight, bias = torch.randn(5, 7, dtype=f64), torch.randn(5, dtype=f64)
    stats = CrossStats(7)
    stats.update(x_tilde, x)
    fit = solvers.corrective(
        weight, bias, stats.mean_tilde, stats.covariance_tilde, stats.mean, stats.covariance,
        stats.cross, rank=2,
    )  # fmt: skip
    target = x @ weight.T + bias
    out = x_tilde @ fit.down.T @ fit.up.T + fit.bias
    assert (out - target).square().sum(1).mean().item() == pytest.approx(fit.error, rel=1e-8)


def deep_relu_mlp(width=48, depth=5, seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10)).eval()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.c3 = (
            nn.Conv2d(3, 24, 3, padding=1),
            nn.Conv2d(24, 32, 3),
            nn.Conv2d(32, 32, 3),
        )
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


def correlated(n, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) * 1.5 for _ in range(n)]


@pytest.mark.parametrize("method", ["linear", "relu"])
@pytest.mark.parametrize(
    ("build", "shape", "ratio"),
    [(deep_relu_mlp, (128, 48), 0.25), (SmallCNN, (8, 3, 10, 10), 0.3)],
)
def test_corrective_beats_parallel_on_final_output(build, shape, ratio, method):
    """On held-out inputs. (With too little data, ~3,000 patches for 216-wide conv inputs, the
    activation-aware corrective fit can over-fit and lose; 12 batches are enough here.)"""
    model = build().eval()
    data = correlated(12, shape, seed=3)
    held_out = torch.cat(correlated(2, shape, seed=4))
    with torch.no_grad():
        expected = model(held_out)
    errors = {}
    for corrective in (False, True):
        compressed, report = tl.compress(
            copy.deepcopy(model), data, ratio=ratio, method=method, corrective=corrective
        )
        with torch.no_grad():
            errors[corrective] = (compressed(held_out) - expected).square().mean().item()
        assert report.info["mode"] == ("corrective" if corrective else "parallel")
    assert errors[True] < errors[False]


def test_passes_waves_and_a_shared_input_wave():
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(16, 16) for _ in range(3))
            self.out = nn.Linear(16, 16)

        def forward(self, x):
            q, k, v = self.q(x), self.k(x), self.v(x)
            attn = torch.softmax(q @ k.transpose(-1, -2) / 4, -1)
            return self.out(attn @ v)

    data = [torch.randn(2, 5, 16) for _ in range(3)]
    model, report = tl.compress(QKV(), data, rank=4)
    assert report.info["waves"] == 2  # {q, k, v}, {out}
    assert report.info["forward_passes"] == 1 + 2 * 2 * 3  # schedule + 2 passes per batch per wave
    assert all(
        isinstance(m, LowRankLinear) and not m.calibrating for m in (model.q, model.k, model.out)
    )
    assert "corrective recovery: 2 waves, 13 forward passes" in str(report)


@pytest.mark.parametrize("cache_blocks", [True, False])
def test_failure_in_a_later_wave_leaves_the_model_as_it_was(cache_blocks):
    model = deep_relu_mlp(depth=3)
    tl.convert(model, rank=8)
    data = correlated(2, (64, 48), seed=5)
    tl.calibrate(model, data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    children = list(model)
    seen = model[0].samples_seen

    class Boom(RuntimeError):
        pass

    def fail_after_two_waves(module, args):  # the data "breaks" once layers 0 and 2 are solved
        if isinstance(model[2], nn.Sequential):  # layer 2's staged factors stand in for it
            raise Boom("data loader failed")

    handle = model[4].register_forward_pre_hook(fail_after_two_waves)
    with pytest.raises(Boom):
        tl.recover_(model, data=data, cache_blocks=cache_blocks)
    handle.remove()
    low_rank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert list(model) == children  # every stand-in is gone
    assert all(m.calibrating and m.observer.enabled for m in low_rank)
    assert model[0].samples_seen == seen
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model(torch.randn(1, 48))  # no capture hook of ours is left: a forward adds rows as before
    assert model[0].samples_seen == seen + 1
    report = tl.recover_(model, data=data)  # and it still recovers afterwards
    assert report.info["mode"] == "corrective"


def test_one_shot_iterators_are_refused():
    model = tl.convert(deep_relu_mlp(depth=1), rank=4)
    data = correlated(2, (16, 48), seed=6)
    tl.calibrate(model, data)
    with pytest.raises(TypeError, match="iterates the calibration data several times"):
        tl.recover_(model, data=iter(data))


def test_batchnorm_folding_works_correctively():
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    data = correlated(3, (4, 3, 8, 8), seed=8)
    with torch.no_grad():
        expected = model(data[0])
    compressed, report = tl.compress(copy.deepcopy(model), data, ratio=0.6)
    assert isinstance(compressed[1], FoldedBatchNorm) and "BatchNorm folded in" in report["0"].note
    with torch.no_grad():
        rel = ((compressed(data[0]) - expected).norm() / expected.norm()).item()
    assert rel < 0.5


def test_a_shared_input_wave_computes_its_moments_once_with_the_same_result():
    """q, k and v fed one tensor share one set of paired moments (one third of the statistics)
    and get the factors they get from moments of their own (inputs fed as copies), to 1e-12."""

    class QKV(nn.Module):
        def __init__(self, copies: bool):
            super().__init__()
            torch.manual_seed(0)
            self.copies = copies
            self.q, self.k, self.v = (nn.Linear(24, 24) for _ in range(3))
            self.out = nn.Linear(24, 24)

        def forward(self, x):
            h = torch.relu(x)
            feeds = [h.clone() for _ in range(3)] if self.copies else [h] * 3
            q, k, v = self.q(feeds[0]), self.k(feeds[1]), self.v(feeds[2])
            return self.out(torch.softmax(q @ k.transpose(-1, -2) / 5, -1) @ v)

    gen = torch.Generator().manual_seed(3)
    data = [torch.randn(2, 7, 24, generator=gen) for _ in range(3)]
    shared, own = (
        tl.compress(QKV(copies), data, rank=5, method="linear", progress=False)
        for copies in (False, True)
    )
    assert shared[1].info["waves"] == 2 and own[1].info["waves"] == 4
    # the q/k/v wave holds one set of moments: no more than a wave of one layer
    assert shared[1].info["peak_stat_bytes"] <= own[1].info["peak_stat_bytes"]
    for name in ("q", "k", "v", "out"):
        torch.testing.assert_close(
            getattr(shared[0], name).weight, getattr(own[0], name).weight, rtol=1e-12, atol=1e-12
        )


def test_only_layers_an_activation_follows_keep_sample_rows(monkeypatch):
    """The activation-aware solve fits only layers followed by an activation; the others are
    solved in closed form, so their waves keep no reservoir of paired rows."""
    from torch_lowrank import corrective

    torch.manual_seed(0)
    model = tl.convert(
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4)), rank=3
    )
    data = [torch.randn(32, 8) for _ in range(3)]
    tl.calibrate(model, data, progress=False)
    kept = []
    real = corrective.accumulate_wave

    def recording(wave, runs, with_samples, *args):
        paired = real(wave, runs, with_samples, *args)
        kept.extend((m, pairs[0].rows is not None) for m, pairs in paired.items())
        return paired

    monkeypatch.setattr(corrective, "accumulate_wave", recording)
    report = tl.recover_(model, data=data, progress=False)
    assert kept == [(model[0], True), (model[2], False), (model[3], False)]
    assert [layer.activation for layer in report.layers] == ["relu", "-", "-"]
