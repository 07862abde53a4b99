"""Seams between the library's steps: modes, failures, state dicts, adapters, edge inputs.

Every test states the *correct* behaviour through the public API (``tl.convert``,
``tl.calibrate``, ``tl.recover_``, ``tl.compress``, ``tl.merge_``, ``tl.load_state_dict`` and
public module attributes), so it survives an internal refactor.
"""

from __future__ import annotations

import copy
import importlib
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import torch_lowrank as tl

LOW_RANK = (tl.LowRankLinear, tl.LowRankConv1d, tl.LowRankConv2d)
ROOT = Path(__file__).resolve().parent.parent


# -- helpers -----------------------------------------------------------------------------------
def low_rank_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, LOW_RANK)]


def snapshot(model: nn.Module) -> dict:
    """Everything a failing call must leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "types": {name: type(m) for name, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    buffers = dict(model.named_buffers())  # those outside converted layers keep their names
    for key, value in before["state"].items():
        if key in buffers:
            assert torch.equal(buffers[key], value), f"buffer {key} changed"
    assert not low_rank_modules(model), "the model was left (partly) converted"
    assert {name: type(m) for name, m in model.named_modules()} == before["types"]
    state = model.state_dict()
    assert state.keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(state[key], value), f"{key} changed"
    assert {name: m.training for name, m in model.named_modules()} == before["training"]


def randomise_batchnorm(bn: nn.Module, generator: torch.Generator) -> None:
    """Give a BatchNorm trained-looking affine parameters and running statistics."""
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(c, generator=generator))
        bn.bias.copy_(torch.randn(c, generator=generator) * 0.3)
        bn.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
        bn.running_var.copy_(0.5 + torch.rand(c, generator=generator))
        bn.num_batches_tracked.fill_(100)


# == 1. Train mode ============================================================================
def train_mode_net() -> nn.Sequential:
    """Linear -> BatchNorm -> ReLU -> Dropout -> spectral-norm Linear -> ReLU -> Linear, with
    trained BatchNorm statistics and a converged spectral-norm ``weight_u``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.utils.spectral_norm(nn.Linear(32, 32)),
        nn.ReLU(),
        nn.Linear(32, 8),
    )
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(64, 16) * 2 + 1)
    return model


def train_mode_data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(64, 16, generator=g) * 2 + 1 for _ in range(3)]


# The spectral-norm layer stays dense: it is here for its weight_u buffer.
TRAIN_KW = {"ratio": 0.5, "exclude": ["4"], "progress": False, "options": {"max_iter": 20}}


@pytest.mark.parametrize("corrective", [True, False])
def test_compress_in_train_mode_equals_eval_mode(corrective):
    base, data = train_mode_net(), train_mode_data()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    in_train = copy.deepcopy(base).train()
    in_eval = copy.deepcopy(base).eval()
    torch.manual_seed(3)
    in_train, _ = tl.compress(in_train, data, corrective=corrective, **TRAIN_KW)
    torch.manual_seed(3)
    in_eval, _ = tl.compress(in_eval, data, corrective=corrective, **TRAIN_KW)
    flags_train = {name: m.training for name, m in in_train.named_modules()}
    flags_eval = {name: m.training for name, m in in_eval.named_modules()}
    assert low_rank_modules(in_train) and low_rank_modules(in_eval)
    with torch.no_grad():
        y_train, y_eval = in_train.eval()(x), in_eval.eval()(x)
    torch.testing.assert_close(y_train, y_eval, atol=1e-6, rtol=1e-6)
    # every submodule, old or new, is in the caller's (uniform) mode
    assert [name for name, flag in flags_train.items() if not flag] == []
    assert [name for name, flag in flags_eval.items() if flag] == []


def test_recover_with_data_in_train_mode_equals_eval_mode():
    base, data = train_mode_net(), train_mode_data()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    models, flags = [], []
    for mode in (True, False):
        model = tl.convert(copy.deepcopy(base), ratio=0.5, exclude=["4"])
        tl.calibrate(model, data[:1], progress=False)
        model.train(mode)
        torch.manual_seed(3)
        tl.recover_(model, data=data, progress=False, max_iter=20)
        flags.append({name: m.training for name, m in model.named_modules()})
        models.append(model.eval())
    with torch.no_grad():
        torch.testing.assert_close(models[0](x), models[1](x), atol=1e-6, rtol=1e-6)
    assert [name for name, flag in flags[0].items() if not flag] == []
    assert [name for name, flag in flags[1].items() if flag] == []


def test_compress_restores_mixed_modes():
    """A caller's per-module modes (here: train mode with dropout frozen in eval) come back."""
    model, data = train_mode_net(), train_mode_data()
    model.train()
    model[3].eval()
    before = {name: m.training for name, m in model.named_modules()}
    model, _ = tl.compress(model, data, corrective=False, **TRAIN_KW)
    after = {name: m.training for name, m in model.named_modules()}
    kept = {name: after[name] for name in before if name in after}
    assert kept == {name: before[name] for name in kept}


def _raise_on(bad: torch.Tensor):
    def forward_fn(model: nn.Module, batch: torch.Tensor):
        if batch is bad:
            raise RuntimeError("boom: bad batch")
        return model(batch)

    return forward_fn


@pytest.mark.parametrize("failure", ["forward_fn", "bad_data"])
@pytest.mark.parametrize("corrective", [True, False])
def test_failing_compress_leaves_buffers_and_modes(corrective, failure):
    model, data = train_mode_net(), train_mode_data()
    model.train()
    before = snapshot(model)
    if failure == "forward_fn":  # a forward_fn that raises on the 2nd batch
        kwargs, expected = {"forward_fn": _raise_on(data[1])}, RuntimeError
    else:  # the 2nd batch has the wrong width
        data[1] = torch.randn(64, 15)
        kwargs, expected = {}, (RuntimeError, ValueError)
    with pytest.raises(expected):
        tl.compress(model, data, corrective=corrective, **kwargs, **TRAIN_KW)
    assert_unchanged(model, before)


def test_failing_recover_with_data_leaves_buffers_and_modes():
    model, data = train_mode_net(), train_mode_data()
    model = tl.convert(model, ratio=0.5, exclude=["4"])
    tl.calibrate(model, data[:1], progress=False)
    model.train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = {name: m.training for name, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="boom"):
        tl.recover_(model, data=data, forward_fn=_raise_on(data[1]), progress=False)
    for key, value in model.named_buffers():
        assert torch.equal(value, buffers[key]), f"{key} changed"
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(m.calibrating for m in low_rank_modules(model))


# == 2. Folded BatchNorm keeps the state-dict contract ========================================
def conv_bn_net() -> nn.Sequential:
    torch.manual_seed(10)
    model = nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1)
    )
    randomise_batchnorm(model[1], torch.Generator().manual_seed(11))
    return model.eval()


def linear_bn_net() -> nn.Sequential:
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(24, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    randomise_batchnorm(model[1], torch.Generator().manual_seed(13))
    return model.eval()


BN_CASES = {
    "conv": (conv_bn_net, (8, 4, 6, 6)),
    "linear": (linear_bn_net, (64, 24)),
}


def _compressed_with_fold(kind: str):
    build, shape = BN_CASES[kind]
    g = torch.Generator().manual_seed(14)
    data = [torch.randn(*shape, generator=g) for _ in range(2)]
    model, _ = tl.compress(build(), data, ratio=0.5, method="linear", exclude=["3"], progress=False)
    x = torch.randn(*shape, generator=g)
    return build, model.eval(), x


@pytest.mark.parametrize("kind", list(BN_CASES))
def test_folded_batchnorm_reloads_strictly(kind):
    build, compressed, x = _compressed_with_fold(kind)
    assert isinstance(compressed[0], LOW_RANK)
    fresh = tl.load_state_dict(build(), compressed.state_dict(), strict=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), compressed(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("kind", list(BN_CASES))
def test_folded_batchnorm_is_never_applied_twice(kind, strict):
    """Loading into a model whose BatchNorm is live (the original trained dense model) either
    reproduces the compressed model or raises; it never silently applies the BatchNorm twice."""
    build, compressed, x = _compressed_with_fold(kind)
    live = build()  # the same trained BatchNorm statistics as before compression
    try:
        live = tl.load_state_dict(live, compressed.state_dict(), strict=strict).eval()
    except (RuntimeError, ValueError):
        return
    with torch.no_grad():
        torch.testing.assert_close(live(x), compressed(x), atol=1e-6, rtol=0)


# == 3. Hugging Face GPT-2: a Conv1D that stays dense stays a Conv1D ==========================
transformers = pytest.importorskip("transformers")


def tiny_gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(20)
    return transformers.GPT2LMHeadModel(config).eval(), config


def gpt2_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(21)
    return [torch.randint(0, 64, (4, 16), generator=g) for _ in range(2)]


def _check_conv1d_names(model: nn.Module, names: list[str]) -> int:
    """Every original Conv1D name holds a low-rank module or a Conv1D; returns how many are
    dense."""
    from transformers.pytorch_utils import Conv1D

    dense = 0
    for name in names:
        module = model.get_submodule(name)
        assert isinstance(module, (*LOW_RANK, Conv1D)), f"{name} is a {type(module).__name__}"
        dense += isinstance(module, Conv1D)
    return dense


def _conv1d_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]


def test_gpt2_uncalibrated_layers_go_back_to_conv1d():
    model, config = tiny_gpt2()
    names = _conv1d_names(model)
    assert names
    x = gpt2_batches()[0]
    with torch.no_grad():
        expected = model(x).logits
    model = tl.convert(model, ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "saw no calibration data; kept dense"
        tl.recover_(model, method="linear", progress=False)
    assert _check_conv1d_names(model, names) == len(names)
    fresh = transformers.GPT2LMHeadModel(config).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, expected, atol=1e-5, rtol=0)


def test_gpt2_energy_rank_saving_nothing_goes_back_to_conv1d():
    model, config = tiny_gpt2()
    names = _conv1d_names(model)
    model = tl.convert(model, energy=0.9999)
    tl.calibrate(model, gpt2_batches(), progress=False)
    tl.recover_(model, method="linear", progress=False)
    dense = _check_conv1d_names(model, names)
    assert dense > 0, "expected energy=0.9999 to keep some layer dense"
    if dense == len(names):
        fresh = transformers.GPT2LMHeadModel(config)
        fresh.load_state_dict(model.state_dict(), strict=True)


def test_gpt2_global_allocation_dense_layers_stay_conv1d():
    model, _ = tiny_gpt2()
    names = _conv1d_names(model)
    model = tl.convert(model, ratio=0.3, allocation="global")
    tl.calibrate(model, gpt2_batches(), progress=False)
    tl.recover_(model, method="linear", progress=False)
    _check_conv1d_names(model, names)


# == 4. add_bias=False is honoured by every method ============================================
def bias_free_net() -> nn.Sequential:
    torch.manual_seed(30)
    return nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 8, bias=False))


@pytest.mark.parametrize("method", ["relu", "linear", "svd", "nuclear"])
def test_add_bias_false_every_method(method):
    g = torch.Generator().manual_seed(31)
    data = [torch.randn(128, 16, generator=g) + 1.0 for _ in range(2)]
    options = {"max_iter": 5} if method in ("relu", "nuclear") else None
    model, _ = tl.compress(
        bias_free_net(), data, rank=4, add_bias=False, method=method, corrective=False,
        options=options, progress=False,
    )  # fmt: skip
    found = low_rank_modules(model)
    assert len(found) == 2
    for module in found:
        assert module.up.bias is None, f"{method}: a bias was added despite add_bias=False"


@pytest.mark.parametrize(
    "method, spec",
    [
        ("linear", {"rank": 5}),
        ("nuclear", {"rank": 5}),
        ("linear", {"energy": 0.999}),
        ("nuclear", {"energy": 0.999}),
    ],
)
def test_factored_layer_has_fewer_parameters_than_dense(method, spec):
    """Linear(16, 8, bias=False): rank 5 holds 5 * 24 = 120 < 128 weights, but with the added
    bias 128 parameters, as many as the dense layer. A factored layer must save parameters."""
    torch.manual_seed(32)
    model = nn.Sequential(nn.Linear(16, 8, bias=False), nn.ReLU())
    dense_params = sum(p.numel() for p in model[0].parameters())
    g = torch.Generator().manual_seed(33)
    data = [torch.randn(256, 16, generator=g) + 1.0]
    options = {"max_iter": 5} if method == "nuclear" else None
    model, report = tl.compress(
        model, data, method=method, corrective=False, options=options, progress=False, **spec
    )
    for module in low_rank_modules(model):
        params = sum(p.numel() for p in module.parameters())
        assert params < dense_params, f"factored layer holds {params} >= {dense_params}"
    assert report.params_after < report.params_before or not low_rank_modules(model)


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


def test_nuclear_grouped_conv_rank():
    model = grouped_conv_net()
    g = torch.Generator().manual_seed(61)
    data = [torch.randn(4, 8, 10, 10, generator=g)]
    x = torch.randn(2, 8, 10, 10, generator=g)
    with torch.no_grad():
        expected_shape = model(x).shape
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
    model = grouped_conv_net()
    g = torch.Generator().manual_seed(61)
    data = [torch.randn(4, 8, 10, 10, generator=g)]
    x = torch.randn(2, 8, 10, 10, generator=g)
    with torch.no_grad():
        expected_shape = model(x).shape
    model, _ = tl.compress(
        model, data, rank=4, method="nuclear", corrective=False,
        options={"max_iter": 10, "lam": lam}, progress=False,
    )  # fmt: skip
    _check_grouped(model, x, expected_shape, 8)


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
