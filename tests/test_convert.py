"""Tests of convert / calibrate / recover_ / compress (torch_lowrank/convert.py)."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import torch_lowrank as tl
from torch_lowrank import LowRankLinear


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(32, 64)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)) for _ in range(2)]
        )
        self.heads = nn.ModuleDict({"a": nn.Linear(64, 48), "b": nn.Linear(64, 4)})

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.heads["a"](x).sum(-1, keepdim=True) + self.heads["b"](x)


def batches(n=4, rows=64, features=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, features, generator=gen) for _ in range(n)]


def low_rank_names(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, LowRankLinear))


def test_convert_finds_nested_layers_and_respects_savings():
    torch.manual_seed(0)
    model = tl.convert(Nested(), ratio=0.5)
    # heads.b (4 x 64) at ratio 0.5 gets rank 1: 68 < 256 saves -> converted as well.
    assert low_rank_names(model) == [
        "blocks.0.0",
        "blocks.0.2",
        "blocks.1.0",
        "blocks.1.2",
        "heads.a",
        "heads.b",
        "stem",
    ]
    for name in low_rank_names(model):
        module = model.get_submodule(name)
        m, n = module.matrix_shape
        assert module.rank * (m + n) <= 0.5 * m * n  # ratio = fraction of weights kept


def test_convert_twice_does_not_nest_and_output_is_unchanged_while_calibrating():
    torch.manual_seed(1)
    model = Nested()
    x = torch.randn(8, 32)
    expected = model(x)
    tl.convert(model, rank=4)
    names = low_rank_names(model)
    tl.convert(model, rank=2)
    # heads.b (4 x 64) saves nothing at rank 4 but does at rank 2; the others stay as they were.
    assert low_rank_names(model) == sorted([*names, "heads.b"])
    assert all(model.get_submodule(n).rank == 4 for n in names)
    assert all(
        not isinstance(child, LowRankLinear)
        for n in names
        for child in model.get_submodule(n).modules()
        if child is not model.get_submodule(n)
    )
    assert torch.equal(model(x), expected)


def test_include_exclude_patterns_and_callables():
    model = tl.convert(Nested(), rank=4, include="blocks.*", exclude=["*.2"])
    assert low_rank_names(model) == ["blocks.0.0", "blocks.1.0"]
    model = tl.convert(Nested(), rank=4, include=lambda name, m: m.out_features == 48)
    assert low_rank_names(model) == ["heads.a"]
    model = tl.convert(Nested(), rank=4, exclude=lambda name, m: name.startswith("blocks"))
    assert low_rank_names(model) == ["heads.a", "stem"]  # heads.b: rank 4 saves nothing
    with pytest.warns(UserWarning, match="include pattern 'nothing.*' matched no module"):
        tl.convert(Nested(), rank=4, include=["stem", "nothing.*"])


def test_layers_that_would_not_save_stay_dense_and_the_report_says_why():
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 3), nn.Linear(3, 3)
    )
    tl.convert(model, rank=8, exclude="0")
    assert isinstance(model[3], LowRankLinear) is False  # rank clamps to 3: 3*67 >= 192
    tl.calibrate(model, [torch.randn(32, 64)])
    report = tl.recover_(model)
    assert [(row.name, row.note) for row in report.layers if row.method == "dense"] == [
        ("0", "excluded"),
        ("3", "rank 3 saves no parameters"),
        ("4", "rank 3 saves no parameters"),
    ]
    assert report["2"].rank == 8


def test_shared_layer_is_swapped_everywhere():
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    tl.convert(model, rank=4)
    assert model[0] is model[2] and isinstance(model[0], LowRankLinear)
    tl.calibrate(model, batches())
    assert model[0].samples_seen == 2 * 4 * 64  # both calls are samples
    report = tl.recover_(model)
    assert len(report) == 1 and model[0] is model[2] and not model[0].calibrating


def test_root_linear_is_returned_converted():
    layer = tl.convert(nn.Linear(32, 32), rank=4)
    assert isinstance(layer, LowRankLinear) and layer.layer_name == "LowRankLinear"


def test_compress_end_to_end_linear_beats_svd_on_output_error():
    torch.manual_seed(2)
    model = Nested()
    data = [x @ torch.randn(32, 32) for x in batches(6)]  # correlated inputs
    test_x = torch.cat(batches(2, seed=9)) @ torch.randn(32, 32)
    with torch.no_grad():
        expected = model(test_x)
    errors = {}
    for method in ("svd", "linear"):
        compressed, report = tl.compress(copy.deepcopy(model), data, ratio=0.25, method=method)
        assert all(not m.calibrating for m in compressed.modules() if isinstance(m, LowRankLinear))
        assert report.params_after < report.params_before
        with torch.no_grad():
            errors[method] = (compressed(test_x) - expected).square().mean().item()
    assert errors["linear"] < errors["svd"]


def test_report_table_and_dict():
    model, report = tl.compress(Nested(), batches(), rank=4)
    text = str(report)
    assert text.splitlines()[0].split()[:4] == ["layer", "shape", "rank", "params"]
    assert "stem" in text and any(line.startswith("total") for line in text.splitlines())
    assert text.splitlines()[-2].startswith("corrective recovery: ")
    assert text.splitlines()[-1].startswith("peak statistics memory: ")
    data = json.loads(report.to_json())
    assert [row["name"] for row in data["layers"]][0] == "stem"
    assert data["total"]["params_after"] == report.params_after
    assert report["stem"].shape == (64, 32) and report["stem"].method == "relu"
    assert report["stem"].activation == "-"  # stem feeds a residual add: linear
    assert all(0.0 <= row["relative_error"] <= 1.0 for row in data["layers"])


def test_module_that_saw_no_data_goes_back_to_its_dense_layer():
    model = Nested()
    tl.convert(model, rank=4)
    original_head = model.heads["a"].dense
    # Calibrate everything but heads.a by running the stem and the blocks only.
    with torch.no_grad():
        h = model.stem(torch.randn(16, 32))
        for block in model.blocks:
            block(h)
    with pytest.warns(UserWarning, match="heads.a saw no calibration data; kept dense"):
        report = tl.recover_(model)
    assert model.heads["a"] is original_head
    assert report["heads.a"].method == "dense"
    assert report["heads.a"].note == "saw no calibration data"
    assert isinstance(model.stem, LowRankLinear) and not model.stem.calibrating


def test_recover_is_all_or_nothing():
    """A NaN reaching one layer makes recover_ fail naming it, and no layer changes."""
    model = Nested()
    tl.convert(model, rank=4)
    tl.calibrate(model, batches())
    bad = torch.randn(4, 64)
    bad[0, 0] = float("nan")
    model.heads["a"](bad)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="heads.a: the calibration inputs contained NaN or Inf"):
        tl.recover_(model)
    assert all(m.calibrating for m in model.modules() if isinstance(m, LowRankLinear))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(
        ValueError, match=r"recover_: method must be one of relu, linear, svd, nuclear\nbut got 'x'"
    ):
        tl.recover_(model, method="x")


def test_recovered_state_dict_loads_into_a_freshly_converted_model():
    torch.manual_seed(3)
    model, _ = tl.compress(Nested(), batches(), ratio=0.3)
    state = model.state_dict()
    fresh = tl.convert(Nested(), ratio=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl.recover_(fresh, method="svd")  # enter the recovered phase without data
    fresh.load_state_dict(state)
    x = torch.randn(5, 32)
    assert torch.equal(fresh(x), model(x))


def test_calibrate_restores_training_mode_and_accepts_common_batch_forms():
    model = tl.convert(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)), rank=2)
    model.train()
    assert tl.calibrate(model, [torch.randn(4, 8), (torch.randn(4, 8), torch.zeros(4))]) == 2
    assert model.training
    assert model[0].samples_seen == 8

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, inputs):
            return self.fc(inputs)

    kw = tl.convert(Keyword(), rank=2)
    tl.calibrate(kw, [{"inputs": torch.randn(3, 8)}])
    assert kw.fc.samples_seen == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "convert: give exactly one of rank, ratio or energy\nbut got none"),
        (
            {"rank": 2, "energy": 0.9},
            "convert: give exactly one of rank, ratio or energy\nbut got rank, energy",
        ),
        ({"ratio": 2.0}, r"convert: ratio must be a number in \(0, 1\]\nbut got 2.0"),
        ({"energy": 0}, r"convert: energy must be a number in \(0, 1\]\nbut got 0"),
        ({"rank": -1}, r"convert: rank must be in \[1, 1048576\]"),
    ],
)
def test_convert_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tl.convert(Nested(), **kwargs)


def test_progress_bars_can_be_turned_off(capsys):
    from torch_lowrank.model import progress_bar

    assert progress_bar([1, 2], "x", enabled=False).disable
    model = tl.convert(nn.Sequential(nn.Linear(8, 8)), rank=2)
    tl.calibrate(model, [torch.randn(4, 8)], progress=False)
    tl.recover_(model, progress=False)
    assert capsys.readouterr().err == ""
