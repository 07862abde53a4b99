"""Seams: ``compress`` changes nothing until it can succeed, a calibration batch is all or
nothing, ``nuclear`` on grouped convs (the smaller seams: ``test_seams_small.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
from seam_helpers import (
    assert_unchanged,
    snapshot,
)
from torch import nn

import torch_lowrank as tl


# == 5. compress changes nothing until it can succeed =========================================
def relu_net() -> nn.Sequential:
    torch.manual_seed(40)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())


def relu_data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(41)
    return [torch.randn(64, 16, generator=g) for _ in range(3)]


@pytest.mark.parametrize("corrective", [True, False])
def test_compress_empty_data(corrective):
    model = relu_net().train()
    before = snapshot(model)
    with pytest.raises(ValueError, match="data"):
        tl.compress(model, [], rank=4, corrective=corrective, progress=False)
    assert_unchanged(model, before)


def test_compress_one_shot_generator():
    """Corrective recovery iterates the data several times: a generator either works (same
    result as the list) or is refused with an error naming ``data``, before any change."""
    data = relu_data()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(42))
    model = relu_net().train()
    before = snapshot(model)
    torch.manual_seed(43)
    try:
        result, _ = tl.compress(model, (b for b in data), rank=4, method="linear", progress=False)
    except (ValueError, TypeError) as err:
        assert "data" in str(err)
        assert_unchanged(model, before)
        return
    torch.manual_seed(43)
    reference, _ = tl.compress(relu_net().train(), data, rank=4, method="linear", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(result.eval()(x), reference.eval()(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("corrective", [True, False])
def test_compress_samples_zero_with_relu(corrective):
    model = relu_net().train()
    before = snapshot(model)
    with pytest.raises(ValueError, match="samples"):
        tl.compress(
            model, relu_data(), rank=4, samples=0, method="relu", corrective=corrective,
            progress=False,
        )  # fmt: skip
    assert_unchanged(model, before)


def test_compress_include_callable_raises():
    model = relu_net().train()
    before = snapshot(model)

    def include(name: str, module: nn.Module) -> bool:
        if name == "2":
            raise LookupError("include failed on 2")
        return True

    with pytest.raises(LookupError, match="include failed"):
        tl.compress(model, relu_data(), rank=4, include=include, progress=False)
    assert_unchanged(model, before)


# == 6. A calibration batch is all or nothing =================================================
class Flagged(nn.Module):
    """Three Linear + ReLU layers; ``fail`` makes the forward fail after the first layer ran."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor, fail: str = "") -> torch.Tensor:
        h = torch.relu(self.l1(x))
        if fail == "error":
            raise RuntimeError("bad batch")
        if fail == "interrupt":
            raise KeyboardInterrupt
        if fail == "dtype":
            h = h.double()  # reaches l2 in the wrong dtype
        h = torch.relu(self.l2(h))
        return self.l3(h)


FAILURES = {"error": RuntimeError, "interrupt": KeyboardInterrupt, "dtype": RuntimeError}


@pytest.mark.parametrize("fail", list(FAILURES))
def test_failed_calibration_batch_adds_nothing(fail):
    g = torch.Generator().manual_seed(50)
    good1, bad, good2 = (torch.randn(64, 16, generator=g) for _ in range(3))
    torch.manual_seed(51)
    base = Flagged()
    x = torch.randn(16, 16, generator=g)

    clean = tl.convert(copy.deepcopy(base), rank=4)
    tl.calibrate(clean, [good1, good2], progress=False)
    tl.recover_(clean, method="linear", progress=False)

    dirty = tl.convert(copy.deepcopy(base), rank=4)
    tl.calibrate(dirty, [good1], progress=False)
    with pytest.raises(FAILURES[fail]):
        tl.calibrate(dirty, [{"x": bad, "fail": fail}], progress=False)
    tl.calibrate(dirty, [good2], progress=False)
    tl.recover_(dirty, method="linear", progress=False)

    for name in ("l1", "l2", "l3"):
        a, b = clean.get_submodule(name), dirty.get_submodule(name)
        assert a.rank == b.rank
        torch.testing.assert_close(b.weight, a.weight, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(dirty(x), clean(x), atol=1e-6, rtol=0)


def test_interrupted_first_forward_leaves_no_torch_function_mode():
    depth = torch._C._len_torch_function_stack()
    model = tl.convert(Flagged(), rank=4)  # activation="auto": the first forward is observed
    try:
        with pytest.raises(KeyboardInterrupt):
            tl.calibrate(model, [{"x": torch.randn(8, 16), "fail": "interrupt"}], progress=False)
        assert torch._C._len_torch_function_stack() == depth, "a TorchFunctionMode leaked"
    finally:  # do not poison the rest of the session
        while torch._C._len_torch_function_stack() > depth:
            torch._C._pop_torch_function_stack()


# == 7. nuclear on grouped convs ==============================================================
def grouped_conv_net() -> nn.Sequential:
    """Conv2d(8, 16, 3, groups=2) -> ReLU whose two groups have very different spectra (group 0
    full rank and large, group 1 rank one and small), so nuclear picks different ranks."""
    torch.manual_seed(60)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, groups=2), nn.ReLU())
    with torch.no_grad():
        model[0].weight[:8] *= 5
        outer = torch.randn(8, 1) @ torch.randn(1, 36)
        model[0].weight[8:] = outer.reshape(8, 4, 3, 3) * 0.05
    return model


def _check_grouped(model: nn.Module, x: torch.Tensor, expected_shape, max_rank: int) -> None:
    layer = model[0]
    if isinstance(layer, tl.LowRankConv2d):
        assert 1 <= layer.rank <= max_rank
        assert layer.down.weight.shape[0] == layer.groups * layer.rank
        assert layer.up.weight.shape[:2] == (16, layer.rank)  # per group: rank inputs
    else:  # the solution saved nothing: back to the dense conv
        assert type(layer) is nn.Conv2d
    with torch.no_grad():
        assert model(x).shape == expected_shape


def grouped_case():
    """The grouped-conv net, its calibration data, a test input and the output shape."""
    model = grouped_conv_net()
    g = torch.Generator().manual_seed(61)
    data = [torch.randn(4, 8, 10, 10, generator=g)]
    x = torch.randn(2, 8, 10, 10, generator=g)
    with torch.no_grad():
        return model, data, x, model(x).shape


def test_nuclear_grouped_conv_rank():
    model, data, x, expected_shape = grouped_case()
    model, _ = tl.compress(
        model, data, rank=2, method="nuclear", corrective=False, options={"max_iter": 10},
        progress=False,
    )  # fmt: skip
    assert isinstance(model[0], tl.LowRankConv2d)
    _check_grouped(model, x, expected_shape, 2)


@pytest.mark.parametrize("lam", [10 ** (k / 4) for k in range(0, 7)])
def test_nuclear_grouped_conv_with_lam(lam):
    """With ``lam`` the rank falls out of the penalty, per group: the groups must still end
    with one consistent rank (or the layer stays dense)."""
    model, data, x, expected_shape = grouped_case()
    model, _ = tl.compress(
        model, data, rank=4, method="nuclear", corrective=False,
        options={"max_iter": 10, "lam": lam}, progress=False,
    )  # fmt: skip
    _check_grouped(model, x, expected_shape, 8)
