"""Tests of LowRankLinear (torch_lowrank/modules.py): phases, dtypes, state dicts, errors."""

import math

import pytest
import torch
from torch import nn

from torch_lowrank import LowRankLinear

DTYPE_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 3e-2,
    torch.float16: 5e-3,
}


def calibrated(linear: nn.Linear, rows: int = 256, seed: int = 0, **kwargs) -> LowRankLinear:
    gen = torch.Generator().manual_seed(seed)
    layer = LowRankLinear.from_linear(linear, **kwargs)
    x = torch.randn(rows, linear.in_features, generator=gen).to(linear.weight.dtype)
    layer(x)
    return layer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", list(DTYPE_TOL))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ["linear", "svd"])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_full_rank_recovery_reproduces_the_layer(dtype, bias, method, shape):
    """At full rank the recovered module equals the dense layer (tolerance by dtype) and keeps
    its dtype, device and output shape."""
    torch.manual_seed(0)
    out_f, in_f = shape
    dense = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    layer = calibrated(dense, rank=min(shape))
    x = torch.randn(3, 5, in_f).to(dtype)
    expected = dense(x)
    layer.recover_(method)
    got = layer(x)
    assert got.shape == expected.shape and got.dtype == dtype
    assert layer.up.weight.dtype == dtype and layer.down.weight.dtype == dtype
    assert rel_err(got, expected) < DTYPE_TOL[dtype]


def test_calibrating_forward_is_exactly_the_dense_layer():
    torch.manual_seed(1)
    dense = nn.Linear(16, 8)
    layer = LowRankLinear.from_linear(dense, rank=2)
    x = torch.randn(4, 7, 16)
    assert torch.equal(layer(x), dense(x))
    assert layer.samples_seen == 28
    assert layer.weight is dense.weight and layer.bias is dense.bias
    assert layer.to_linear() is dense


def test_recovery_drops_dense_weight_statistics_and_hook():
    torch.manual_seed(2)
    layer = calibrated(nn.Linear(16, 8), rank=3)
    handles = layer.observer.handles
    layer.recover_("linear")
    assert not layer.calibrating and layer.stats is None and layer.samples_seen == 0
    assert not hasattr(layer, "dense")
    assert {name for name, _ in layer.named_parameters()} == {"down.weight", "up.weight", "up.bias"}
    # The hook is gone: further forward passes accumulate nothing and the handle is dead.
    layer(torch.randn(5, 16))
    assert layer.stats is None
    assert layer.observer is None and len(handles) == 2
    assert all(h.id not in h.hooks_dict_ref() for h in handles)  # the handles' own view


def test_recovered_weight_is_the_product_and_to_linear_matches():
    torch.manual_seed(3)
    layer = calibrated(nn.Linear(10, 6), rank=2)
    layer.recover_("linear")
    torch.testing.assert_close(layer.weight, layer.up.weight @ layer.down.weight)
    assert layer.bias is layer.up.bias
    x = torch.randn(4, 10)
    dense = layer.to_linear()
    assert isinstance(dense, nn.Linear) and dense.weight.shape == (6, 10)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-6)


def test_linear_recovery_error_matches_report_and_beats_svd():
    """The reported relative error is the error measured on the calibration rows."""
    torch.manual_seed(4)
    dense = nn.Linear(32, 24)
    x = torch.randn(512, 32) @ torch.randn(32, 32)  # correlated inputs
    rows = {}
    for method in ("linear", "svd"):
        layer = LowRankLinear.from_linear(nn.Linear(32, 24), rank=4)
        layer.dense.load_state_dict(dense.state_dict())
        layer(x)
        rows[method] = layer.recover_(method)
        with torch.no_grad():
            y = dense(x)
            measured = (layer(x) - y).square().sum(1).mean() / (y - y.mean(0)).square().sum(
                1
            ).mean()
        assert rows[method].relative_error == pytest.approx(measured.item(), rel=1e-3)
    assert rows["linear"].relative_error < rows["svd"].relative_error
    assert rows["linear"].params_before == 32 * 24 + 24
    assert rows["linear"].params_after == 4 * (32 + 24) + 24


def test_bias_free_layer_gets_a_bias_for_the_mean_by_default():
    torch.manual_seed(5)
    x = torch.randn(400, 12) + 3.0
    dense = nn.Linear(12, 10, bias=False)
    with_bias = LowRankLinear.from_linear(dense, rank=2)
    without = LowRankLinear.from_linear(dense, rank=2, add_bias=False)
    for layer in (with_bias, without):
        layer(x)
        layer.recover_("linear")
    assert with_bias.up.bias is not None and without.up.bias is None
    with torch.no_grad():
        y = dense(x)
        err_with = (with_bias(x) - y).square().mean()
        err_without = (without(x) - y).square().mean()
    assert err_with <= err_without


def test_state_dict_round_trip_into_a_fresh_module_of_the_same_rank():
    torch.manual_seed(6)
    layer = calibrated(nn.Linear(20, 14), rank=5)
    layer.recover_("linear")
    state = layer.state_dict()
    assert set(state) == {"down.weight", "up.weight", "up.bias"}
    assert state["down.weight"].shape == (5, 20) and state["up.weight"].shape == (14, 5)
    fresh = LowRankLinear(20, 14, rank=5)
    fresh.load_state_dict(state)
    x = torch.randn(3, 20)
    assert torch.equal(fresh(x), layer(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        LowRankLinear(20, 14, rank=4).load_state_dict(state)


def test_constructor_builds_a_trainable_recovered_module():
    layer = LowRankLinear(8, 6, rank=3, bias=False, dtype=torch.float64)
    assert not layer.calibrating and layer.rank == 3 and layer.bias is None
    assert layer.down.weight.dtype == torch.float64
    out = layer(torch.randn(2, 8, dtype=torch.float64))
    out.sum().backward()
    assert layer.down.weight.grad is not None
    assert "rank=3" in repr(layer) and "calibrating" not in repr(layer)
    assert "calibrating" in repr(LowRankLinear.from_linear(nn.Linear(8, 6), rank=3))


def test_requires_grad_is_kept():
    dense = nn.Linear(8, 6)
    dense.weight.requires_grad_(False)
    layer = calibrated(dense, rank=2)
    layer.recover_("linear")
    assert not layer.down.weight.requires_grad and not layer.up.weight.requires_grad
    assert layer.up.bias.requires_grad


def test_energy_chooses_the_rank_at_recovery():
    torch.manual_seed(7)
    x = torch.randn(300, 3) @ torch.randn(3, 16)  # outputs have rank 3
    layer = LowRankLinear.from_linear(nn.Linear(16, 12), energy=0.999999)
    assert layer.rank is None
    layer(x)
    layer.recover_("linear")
    assert layer.rank == 3


def test_svd_needs_no_data():
    layer = LowRankLinear.from_linear(nn.Linear(16, 12), rank=3)
    row = layer.recover_("svd")
    assert layer.rank == 3 and math.isnan(row.relative_error)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rank": 0}, ValueError, r"fc: rank must be in \[1, 8\] for a 8 x 16 weight\nbut got 0"),
        ({"rank": 9}, ValueError, r"fc: rank must be in \[1, 8\] for a 8 x 16 weight\nbut got 9"),
        ({"rank": 2.5}, TypeError, r"fc: rank must be an int\nbut got 2.5"),
        ({"ratio": 1.5}, ValueError, r"fc: ratio must be a number in \(0, 1\]\nbut got 1.5"),
        ({"ratio": 0.0}, ValueError, r"fc: ratio must be a number in \(0, 1\]\nbut got 0.0"),
        ({"energy": -0.1}, ValueError, r"fc: energy must be a number in \(0, 1\]\nbut got -0.1"),
        ({"ratio": 0.01}, ValueError, r"fc: ratio=0.01 leaves no rank for a 8 x 16 weight"),
        (
            {"rank": 2, "ratio": 0.5},
            ValueError,
            "fc: give exactly one of rank, ratio or energy\nbut got rank, ratio",
        ),
        ({}, ValueError, "fc: give exactly one of rank, ratio or energy\nbut got none"),
    ],
)
def test_from_linear_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        LowRankLinear.from_linear(nn.Linear(16, 8), name="fc", **kwargs)


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="fc: expected an nn.Linear\nbut got Conv1d"):
        LowRankLinear.from_linear(nn.Conv1d(3, 3, 1), rank=1, name="fc")


def test_recover_errors_leave_the_module_unchanged():
    dense = nn.Linear(16, 8)
    layer = LowRankLinear.from_linear(dense, rank=2, name="blocks.0.fc")
    with pytest.raises(
        ValueError, match="blocks.0.fc: saw no calibration data; run forward passes"
    ):
        layer.recover_("linear")
    layer(torch.randn(4, 16))
    with pytest.raises(
        ValueError,
        match=r"blocks.0.fc: method must be one of relu, linear, svd, nuclear\nbut got 'qr'",
    ):
        layer.recover_("qr")
    with pytest.raises(
        ValueError,
        match=r"blocks.0.fc: expected input with last dimension 16\nbut got shape \(4, 15\)",
    ):
        layer(torch.randn(4, 15))
    bad = torch.randn(4, 16)
    bad[1, 3] = float("inf")
    layer(bad)
    with pytest.raises(
        ValueError, match="blocks.0.fc: the calibration inputs contained NaN or Inf"
    ):
        layer.recover_("linear")
    assert layer.calibrating and layer.dense is dense and layer.samples_seen == 8
    layer2 = calibrated(nn.Linear(16, 8), rank=2, name="fc")
    layer2.recover_("linear")
    with pytest.raises(RuntimeError, match="fc: already recovered"):
        layer2.recover_("linear")


def test_statistics_are_not_in_the_state_dict():
    layer = calibrated(nn.Linear(6, 4), rank=1)
    assert set(layer.state_dict()) == {"dense.weight", "dense.bias"}


def test_observer_reset_forgets_what_it_saw_and_keeps_watching():
    torch.manual_seed(5)
    layer = calibrated(nn.Linear(16, 8), rank=3)
    fresh = torch.randn(40, 16)
    layer.observer.reset()
    assert layer.samples_seen == 0 and layer.stats is None
    layer(fresh)
    assert layer.samples_seen == 40
    torch.testing.assert_close(
        layer.stats[0].mean,
        (fresh @ layer.dense.weight.T).mean(0).double() + layer.dense.bias.double(),
        rtol=1e-5,
        atol=1e-5,
    )
