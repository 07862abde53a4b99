"""Tests of the paired statistics of corrective recovery (torch_lowrank/pairing.py, cross.py):
the sampled patch positions and the pairs with ``W x`` of narrowing layers."""

import copy

import pytest
import torch
from torch import nn

import torch_lowrank as tl
from torch_lowrank import solvers
from torch_lowrank.base import LowRankModule
from torch_lowrank.cross import CrossStats
from torch_lowrank.pairing import accumulate_wave, original_width

pytestmark = pytest.mark.usefixtures("single_thread")

f64 = torch.float64


def stack(pairs):
    pairs = list(pairs)
    return torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv2d(3, 4, 3, padding=1, groups=1), (5, 3, 6, 7)),
    (nn.Conv2d(4, 6, (2, 3), stride=2, dilation=(1, 2), groups=2), (3, 4, 9, 11)),
    (nn.Conv1d(2, 3, 4, padding="same"), (4, 2, 13)),
])  # fmt: skip
def test_a_bound_at_or_above_the_positions_gives_every_patch_exactly(conv, shape):
    """``positions`` >= the positions of an image: the very rows of ``positions=None``, in the
    same order, and the same sums bit for bit."""
    torch.manual_seed(0)
    layer = tl.convert(nn.Sequential(conv), rank=1)[0]
    x, x_tilde = torch.randn(shape), torch.randn(shape)
    every = stack(layer.paired_rows(x, x_tilde))
    per_image = every[0].shape[0] // shape[0]
    for bound in (per_image, per_image + 1, 10**9):
        bounded = stack(layer.paired_rows(x, x_tilde, positions=bound))
        assert torch.equal(bounded[0], every[0]) and torch.equal(bounded[1], every[1])
    exact, bounded = CrossStats(every[0].shape[1]), CrossStats(every[0].shape[1])
    for stats, bound in ((exact, None), (bounded, per_image)):
        for a, b in layer.paired_rows(x, x_tilde, positions=bound):
            stats.update(b, a)
    for name in ("mean", "mean_tilde", "covariance", "covariance_tilde", "cross"):
        assert torch.equal(getattr(exact, name), getattr(bounded, name))


def test_sampled_positions_are_a_uniform_sample_per_image_at_the_same_places():
    """Each image gives exactly ``k`` distinct positions, the same for ``x`` and ``x~``; every
    position is kept with probability ``k / P`` (400 draws: within 5 standard errors), so the
    sampled second moment is an unbiased estimate of the exact one."""
    torch.manual_seed(0)
    layer = tl.convert(nn.Sequential(nn.Conv2d(1, 2, 2)), rank=1)[0]
    images, k = 3, 4
    # each patch's first entry is its flat position: rows name their positions
    x = torch.arange(images * 25, dtype=torch.float32).reshape(images, 1, 5, 5)
    positions = torch.arange(images * 25).reshape(images, 5, 5)[:, :4, :4].flatten()
    exact = stack(layer.paired_rows(x, x))[0]
    seen = torch.zeros(images * 25)
    moment = torch.zeros(4, 4, dtype=f64)
    draws = 400
    for _ in range(draws):
        rows, rows_tilde = stack(layer.paired_rows(x, 2 * x, positions=k))
        assert rows.shape == (images * k, 4) and torch.equal(rows_tilde, 2 * rows)
        picked = rows[:, 0].long()
        assert len(set(picked.tolist())) == images * k
        assert ((picked // 25).bincount(minlength=images) == k).all()  # k per image
        seen[picked] += 1
        moment += rows.double().T @ rows.double() / rows.shape[0]
    p = k / 16
    frequency = seen[positions] / draws
    assert (frequency - p).abs().max() < 5 * (p * (1 - p) / draws) ** 0.5
    expected = exact.double().T @ exact.double() / exact.shape[0]
    assert ((moment / draws - expected).norm() / expected.norm()).item() < 0.02


def narrow_models():
    torch.manual_seed(1)
    conv_bn = nn.Sequential(
        nn.Conv2d(4, 12, 3, padding=1), nn.ReLU(),
        nn.Conv2d(12, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1),
    )  # fmt: skip
    with torch.no_grad():
        conv_bn[3].running_mean.uniform_(-1, 1)
        conv_bn[3].running_var.uniform_(0.5, 2)
    grouped = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2), nn.ReLU(),
        nn.Conv2d(4, 2, 1),
    )  # fmt: skip
    linear = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 6), nn.ReLU(),
                           nn.Linear(6, 3, bias=False))  # fmt: skip
    return {"conv_bn": (conv_bn, (3, 4, 7, 7)), "grouped": (grouped, (3, 4, 7, 7)),
            "linear": (linear, (3, 5, 24))}  # fmt: skip


@pytest.mark.parametrize("name", ["conv_bn", "grouped", "linear"])
@pytest.mark.parametrize("method, add_bias, weighting", [
    ("linear", True, None), ("linear", False, None), ("linear", True, "fisher"),
    ("relu", True, None),
])  # fmt: skip
def test_pairs_with_w_x_give_the_factors_of_pairs_with_x(name, method, add_bias, weighting):
    """A narrowing layer paired with ``W x`` (its default) and the same layer paired with ``x``
    (``stats_space="input"``) get the same factors and biases, to 1e-9 in float64: folded
    BatchNorm, grouped convs, no intercept, output weighting and the activation-aware start."""
    model, shape = narrow_models()[name]
    model = model.double().eval()
    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(shape, generator=gen, dtype=f64) for _ in range(3)]
    got = {}
    for space in ("output", "input"):
        torch.manual_seed(0)
        converted = tl.convert(copy.deepcopy(model), ratio=0.5, add_bias=add_bias, samples=64)
        layers = [m for m in converted.modules() if isinstance(m, LowRankModule)]
        narrow = [m for m in layers if m.matrix_shape[0] < m.matrix_shape[1]]
        assert narrow
        for module in layers:
            module.stats_space = space
        assert all(original_width(m) == (m.matrix_shape[0] if space == "output" else
                                         m.matrix_shape[1]) for m in narrow)  # fmt: skip
        tl.calibrate(converted, data[:1])
        torch.manual_seed(0)  # the same reservoirs
        options = {"max_iter": 3} if method == "relu" else {}
        tl.recover_(converted, data=data, method=method, weighting=weighting,
                    positions=None, options=options, progress=False)  # fmt: skip
        got[space] = converted
    for a, b in zip(got["output"].modules(), got["input"].modules()):
        if isinstance(a, LowRankModule):
            torch.testing.assert_close(a.weight, b.weight, rtol=1e-9, atol=1e-9)
            if a.bias is not None:
                torch.testing.assert_close(a.bias, b.bias, rtol=1e-9, atol=1e-9)


def test_solver_outputs_matches_input_moments_without_intercept():
    torch.manual_seed(3)
    n, m = 9, 4
    x = torch.randn(400, n, dtype=f64) @ torch.randn(n, n, dtype=f64) + 0.5
    x_tilde = x + 0.3 * torch.randn(400, n, dtype=f64)
    w = torch.randn(m, n, dtype=f64)
    wide, narrow = CrossStats(n), CrossStats(n, original_features=m)
    wide.update(x_tilde, x)
    narrow.update(x_tilde, x @ w.T)
    assert narrow.original_features == m and narrow.cross.shape == (n, m)
    for add_bias in (True, False):
        fits = [
            solvers.corrective(w, None, s.mean_tilde, s.covariance_tilde, s.mean, s.covariance,
                               s.cross, rank=2, add_bias=add_bias, outputs=s is narrow)
            for s in (wide, narrow)
        ]  # fmt: skip
        torch.testing.assert_close(fits[0].up @ fits[0].down, fits[1].up @ fits[1].down)
        assert fits[0].error == pytest.approx(fits[1].error, rel=1e-9)
        assert fits[0].variance == pytest.approx(fits[1].variance, rel=1e-9)


def test_a_wave_pairs_the_sampled_positions_and_narrowing_layers_with_w_x():
    torch.manual_seed(0)
    model = tl.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 1)), rank=1)
    x = torch.randn(5, 3, 8, 8)  # 36 positions per image
    runs = [lambda compressed, x=x: model(x)] * 2
    paired = accumulate_wave([model[0]], runs, with_samples={model[0]}, positions=10)
    (group,) = paired[model[0]]
    cross, reservoir = group.moments, group.rows
    assert cross.count == 2 * 5 * 10 and reservoir.count == 2 * 5 * 10
    assert cross.original_features == 4 and cross.cross.shape == (27, 4)
    paired = accumulate_wave([model[2]], runs, with_samples=(), positions=10)
    assert paired[model[2]][0].moments.original_features == 4  # widening: pairs with x


@pytest.mark.parametrize("where", ["compress", "recover_"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8", [4]])
def test_bad_positions_are_refused_before_anything_changes(where, bad):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    data = [torch.randn(2, 3, 9, 9) for _ in range(2)]
    if where == "recover_":
        model = tl.convert(model, rank=2)
        tl.calibrate(model, data)
    before = {name: (type(m), list(m.parameters())) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match=rf"{where}: positions must be None or an int >= 1"):
        if where == "compress":
            tl.compress(model, data, positions=bad, progress=False)
        else:
            tl.recover_(model, data=data, positions=bad, progress=False)
    after = {name: (type(m), list(m.parameters())) for name, m in model.named_modules()}
    assert before.keys() == after.keys()
    for name, (kind, params) in before.items():
        assert after[name][0] is kind and all(p is q for p, q in zip(params, after[name][1]))
    if where == "recover_":
        assert all(m.calibrating for m in model if isinstance(m, LowRankModule))
