"""Seam: a Hugging Face GPT-2 ``Conv1D`` that stays dense stays a ``Conv1D``, so the state dict
loads back into ``GPT2LMHeadModel`` (needs ``transformers``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from seam_helpers import (
    LOW_RANK,
)
from torch import nn

import torch_lowrank as tl

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
