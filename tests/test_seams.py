"""Seams between the library's steps: modes, state dicts and bias-free layers.

Every test states the *correct* behaviour through the public API (``tl.convert``,
``tl.calibrate``, ``tl.recover_``, ``tl.compress``, ``tl.merge_``, ``tl.load_state_dict`` and
public module attributes), so it survives an internal refactor. Hugging Face GPT-2 is in
``test_seams_gpt2.py``; failures and edge inputs in ``test_seams_failures.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from seam_helpers import (
    LOW_RANK,
    assert_unchanged,
    low_rank_modules,
    randomise_batchnorm,
    snapshot,
)
from torch import nn

import torch_lowrank as tl


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
