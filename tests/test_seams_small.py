"""The smaller seams: overflow reported as overflow, no infinite relative error, merge_ on a
calibrating model, user hooks on converted layers, NumPy scalars, real layer shapes, and the
benchmark CLI writing where it is told."""

from __future__ import annotations

import copy
import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from seam_helpers import (
    ROOT,
    low_rank_modules,
)
from torch import nn

import torch_lowrank as tl


# == 8. Smaller seams =========================================================================
# -- a. a finite overflow is reported as overflow ---------------------------------------------
def test_huge_finite_input_reported_as_overflow():
    """Finite inputs around 1e20 whose squares overflow the statistics: the error says
    overflow (the inputs held no NaN or Inf)."""
    torch.manual_seed(70)
    model = tl.convert(nn.Sequential(nn.Linear(16, 8)), rank=2)
    batch = torch.randn(8, 16, generator=torch.Generator().manual_seed(70)) * 1e20
    assert torch.isfinite(batch).all()
    tl.calibrate(model, [batch], progress=False)
    with pytest.raises(ValueError, match="(?i)overflow") as info:
        tl.recover_(model, method="linear", progress=False)
    assert "NaN" not in str(info.value)


def test_constant_huge_input_is_exact_or_overflow():
    """``torch.full((8, 16), 1e20)``: either recovered exactly (its covariance is zero) or
    refused as overflow, never called NaN."""
    torch.manual_seed(70)
    model = tl.convert(nn.Sequential(nn.Linear(16, 8)), rank=2)
    dense = copy.deepcopy(model[0].dense)
    batch = torch.full((8, 16), 1e20)
    tl.calibrate(model, [batch], progress=False)
    try:
        tl.recover_(model, method="linear", progress=False)
    except ValueError as err:
        assert "overflow" in str(err).lower() and "NaN" not in str(err)
        return
    with torch.no_grad():
        torch.testing.assert_close(model(batch), dense(batch), rtol=1e-5, atol=0)


# -- b. no inf relative error for constant inputs ---------------------------------------------
@pytest.mark.parametrize("method", ["linear", "relu", "svd"])
def test_constant_inputs_give_no_infinite_relative_error(method):
    """Constant inputs have no output variance: a relative error is 0 when the layer is exact
    and undefined (nan, printed as "-") otherwise, never inf."""
    torch.manual_seed(71)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU())
    model = tl.convert(model, rank=2)
    row = torch.randn(1, 16, generator=torch.Generator().manual_seed(72)) * 100
    tl.calibrate(model, [row.expand(32, 16).clone()], progress=False)
    report = tl.recover_(model, method=method, progress=False)
    assert len(report.layers) == 2
    for layer in report.layers:
        assert not math.isinf(layer.relative_error), f"{layer.name}: {layer.relative_error}"
        if method == "linear":  # the mean correction makes a constant output exact
            assert layer.relative_error == 0.0
    assert "inf" not in str(report)


# -- c. merge_ refuses calibrating modules ----------------------------------------------------
def test_merge_with_calibrating_module_raises():
    torch.manual_seed(73)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    model = tl.convert(model, rank=2, include=["0", "2"])
    tl.calibrate(model, [torch.randn(32, 16)], progress=False)
    model[0].recover_("linear")  # "2" stays calibrating
    types = [type(m) for m in model]
    with pytest.raises((RuntimeError, ValueError), match=r"\b2\b"):
        tl.merge_(model)
    assert [type(m) for m in model] == types
    assert model[2].calibrating and not model[0].calibrating


# -- d. user hooks follow a low-rank module when another layer replaces it -----------------
def test_user_hooks_on_a_low_rank_module_are_carried_over():
    """Hooks registered on a converted layer keep firing after merge_ and after recovery puts
    the layer back dense (no data), on the layer that replaced it."""
    torch.manual_seed(74)
    model = tl.convert(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), rank=4)
    calls: list[str] = []
    model[0].register_forward_hook(lambda module, args, output: calls.append("post"))
    model[0].register_forward_pre_hook(lambda module, args: calls.append("pre"))
    removed = model[2].register_forward_hook(lambda module, args, output: calls.append("gone"))
    removed.remove()
    tl.calibrate(model, [torch.randn(64, 16)], progress=False)
    tl.recover_(model, method="linear", progress=False)
    model = tl.merge_(model)
    assert type(model[0]) is nn.Linear
    calls.clear()
    model(torch.randn(4, 16))
    assert calls == ["pre", "post"]  # the removed hook stays removed

    fresh = tl.convert(nn.Sequential(nn.Linear(16, 32), nn.ReLU()), rank=4)
    fresh[0].register_forward_hook(lambda module, args, output: calls.append("dense"))
    with pytest.warns(UserWarning, match="saw no calibration data"):
        tl.recover_(fresh, progress=False)  # no data: back to the dense layer
    calls.clear()
    fresh(torch.randn(4, 16))
    assert type(fresh[0]) is nn.Linear and calls == ["dense"]


# -- e. NumPy scalars are numbers -------------------------------------------------------------
@pytest.mark.parametrize(
    "numpy_spec, python_spec",
    [
        ({"ratio": np.float64(0.5)}, {"ratio": 0.5}),
        ({"rank": np.int64(4)}, {"rank": 4}),
        ({"energy": np.float32(0.9)}, {"energy": float(np.float32(0.9))}),
        ({"ratio": np.float32(0.5)}, {"ratio": 0.5}),
    ],
)
def test_numpy_scalars_accepted(numpy_spec, python_spec):
    def build():
        torch.manual_seed(75)
        return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))

    with_numpy = tl.convert(build(), **numpy_spec)
    with_python = tl.convert(build(), **python_spec)
    ranks = [m.rank for m in low_rank_modules(with_numpy)]
    assert ranks and ranks == [m.rank for m in low_rank_modules(with_python)]
    assert all(r is None or type(r) is int for r in ranks)


# -- f. messages cite the real layer shape ----------------------------------------------------
def test_invalid_rank_message_shows_conv_weight_shape():
    conv = nn.Conv2d(3, 8, 3)
    with pytest.raises(ValueError, match="rank") as info:
        tl.LowRankConv2d.from_conv2d(conv, rank=1000)
    message = str(info.value)
    assert "1000" in message
    assert "(8, 3, 3, 3)" in message, message


def test_invalid_rank_message_shows_linear_weight_shape():
    with pytest.raises(ValueError, match="rank") as info:
        tl.LowRankLinear.from_linear(nn.Linear(20, 10), rank=50)
    message = str(info.value)
    assert "50" in message
    assert "10 x 20" in message or "(10, 20)" in message, message


# -- g. the quick benchmark run writes its page into --out ------------------------------------
def test_benchmark_quick_run_writes_page_into_out(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(ROOT))
    run = importlib.import_module("benchmarks.run")
    published = ROOT / "benchmarks" / "RESULTS.md"
    published_before = published.read_bytes() if published.exists() else None
    written: list[tuple[Path, Path]] = []

    def fake_write(folder, page):  # record where the page would go; never touch it
        written.append((Path(folder), Path(page)))
        return Path(page)

    monkeypatch.setattr(run, "BENCHMARKS", {"tiny": (lambda quick: {"rows": []}, "quick")})
    monkeypatch.setattr(run.results_page, "write", fake_write)
    threads = torch.get_num_threads()
    try:
        run.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "tiny.json").exists()
    assert written, "the results page was not written"
    folder, page = written[0]
    assert folder.resolve() == tmp_path.resolve()
    assert page.resolve().is_relative_to(tmp_path.resolve()), f"page goes to {page}"
    assert page.resolve() != published.resolve()
    after = published.read_bytes() if published.exists() else None
    assert after == published_before


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# == Validated options, end to end =============================================================
def test_typo_in_an_option_is_an_error_and_changes_nothing():
    torch.manual_seed(80)
    model = tl.convert(nn.Sequential(nn.Linear(16, 16), nn.ReLU()), rank=2)
    tl.calibrate(model, [torch.randn(32, 16)], progress=False)
    with pytest.raises(TypeError, match=r"unknown option 'max_itr'(.|\n)*damping"):
        tl.recover_(model, method="linear", max_itr=5)
    with pytest.raises(ValueError, match="damping"):
        tl.recover_(model, method="linear", damping=float("nan"))
    with pytest.raises(ValueError, match="lr"):
        tl.recover_(model, method="relu", lr=0.1)  # lr without an optimizer
    assert model[0].calibrating and model[0].samples_seen == 32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 0.5, "overrides": {"0": 20}}, r"overrides\['0'\](.|\n)*\[1, 8\]"),
        ({"ratio": 0.5, "allocation": "global", "min_rank": 4, "max_rank": 2}, "min_rank"),
        ({"ratio": 0.5, "allocation": "global", "round_to": 0}, "round_to"),
    ],
)
def test_bad_conversion_settings_are_errors_before_anything_changes(kwargs, match):
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    before = [id(m) for m in model]
    with pytest.raises(ValueError, match=match):
        tl.convert(model, **kwargs)
    assert [id(m) for m in model] == before


@pytest.mark.parametrize("inplace", [True, False])
def test_pending_outputs_are_copied_only_when_a_consumer_may_change_them(inplace):
    """A narrowing layer keeps statistics of its outputs; with the batch pending until the
    model's forward returns, an in-place ReLU after it must not leak into them. The first
    forward shows who reads the output: only readers -> no copy for later batches."""
    torch.manual_seed(81)
    model = nn.Sequential(nn.Linear(32, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 4))
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    tl.convert(model, rank=2, exclude=["2"])
    batches = [torch.randn(64, 32) for _ in range(3)]
    tl.calibrate(model, batches, progress=False)
    assert model[0].stats_space == "output"
    assert model[0].observer.copy_outputs is inplace
    y = torch.cat([x @ weight.T + bias for x in batches]).double()  # pre-activation outputs
    stats = model[0].stats[0]
    torch.testing.assert_close(stats.mean, y.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.covariance, torch.cov(y.T, correction=0), rtol=1e-4, atol=1e-5)
