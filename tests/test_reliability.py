"""Numerical edge cases and faults: finite, correct results or clear errors, nothing lost."""

import copy

import pytest
import torch
from torch import nn

import torch_lowrank as tl
from torch_lowrank import LowRankLinear, solvers


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


@pytest.mark.parametrize("method", ["linear", "relu", "svd", "nuclear"])
@pytest.mark.parametrize(
    ("inputs", "exact"),
    [
        pytest.param(lambda: [torch.randn(1, 12)], 5, id="single-sample"),
        pytest.param(lambda: [torch.full((32, 12), 3.0)], 5, id="constant"),
        pytest.param(lambda: [torch.zeros(32, 12)], 5, id="all-zero"),
        pytest.param(lambda: [torch.randn(32, 2) @ torch.randn(2, 12)], 1, id="rank-2"),
    ],
)
def test_degenerate_calibration_data_gives_finite_exact_on_data_results(inputs, exact, method):
    """Whatever the data, the recovered model is finite. For the data-driven methods the layers
    whose inputs have rank <= 2 on the data (all of them for a single, constant or zero input;
    the first for rank-2 inputs, which the ReLU then spreads) match the dense ones there, up to
    1e-4 relative."""
    model = mlp().eval()
    data = inputs()
    with torch.no_grad():
        expected = model[:exact](data[0])
    options = {"max_iter": 20} if method in ("relu", "nuclear") else None
    compressed, _ = tl.compress(copy.deepcopy(model), data, rank=3, method=method, options=options)
    with torch.no_grad():
        got = compressed[:exact](data[0])
        fresh = compressed(torch.randn(5, 12))
    assert torch.isfinite(compressed(data[0])).all() and torch.isfinite(fresh).all()
    if method != "svd":
        scale = expected.abs().max().clamp_min(1.0)
        assert ((got - expected).abs().max() / scale).item() < 1e-4


@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_huge_and_tiny_weight_scales(scale):
    """The relative error of the linear optimum does not depend on the weight's scale."""
    torch.manual_seed(1)
    x = torch.randn(256, 12, dtype=torch.float64)
    weight = torch.randn(8, 12, dtype=torch.float64)
    mean, cov = x.mean(0), torch.cov(x.T, correction=0)
    reference = solvers.linear(weight, None, mean, cov, rank=3)
    scaled = solvers.linear(weight * scale, None, mean, cov, rank=3)
    assert scaled.relative_error == pytest.approx(reference.relative_error, rel=1e-8)
    torch.testing.assert_close(scaled.up @ scaled.down / scale, reference.up @ reference.down)


def test_large_float16_activations_do_not_overflow_the_statistics():
    torch.manual_seed(2)
    layer = LowRankLinear.from_linear(nn.Linear(16, 16).half(), rank=4)
    x = (torch.randn(512, 16) * 2e4).clamp(-6e4, 6e4).half()  # x^2 overflows float16
    layer(x)
    row = layer.recover_("linear")
    assert layer.stats is None and 0.0 <= row.relative_error < 1.0


def test_an_interrupt_during_parallel_recovery_changes_nothing(monkeypatch):
    model = tl.convert(mlp(), rank=3)
    tl.calibrate(model, [torch.randn(64, 12)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    real = solvers.linear

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(solvers, "linear", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tl.recover_(model, method="linear")
    monkeypatch.setattr(solvers, "linear", real)
    assert all(m.calibrating for m in model.modules() if isinstance(m, LowRankLinear))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    tl.recover_(model, method="linear")  # and the statistics are still there to recover from
    assert not any(m.calibrating for m in model.modules() if isinstance(m, LowRankLinear))


def test_non_finite_data_in_a_corrective_run_is_named_and_changes_nothing():
    model = tl.convert(mlp(), rank=3)
    good = [torch.randn(32, 12) for _ in range(2)]
    tl.calibrate(model, good)
    bad = [*good, torch.full((4, 12), float("nan"))]
    with pytest.raises(ValueError, match="0: the calibration inputs contained NaN or Inf"):
        tl.recover_(model, data=bad)
    assert all(m.calibrating for m in model.modules() if isinstance(m, LowRankLinear))
