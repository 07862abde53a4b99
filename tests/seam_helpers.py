"""Helpers shared by the seam tests (test_seams*.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import torch_lowrank as tl

LOW_RANK = (tl.LowRankLinear, tl.LowRankConv1d, tl.LowRankConv2d)
ROOT = Path(__file__).resolve().parent.parent


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
