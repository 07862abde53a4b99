"""What the Hugging Face bias rule costs: bias-free layers solved without an intercept
(``add_bias=False``, the default for Hugging Face models) against the bias the recovery adds
(``add_bias=True``, the default for plain PyTorch models).

The benchmark character transformer (``benchmarks/models.py``) has a bias on every linear layer,
so there the rule changes nothing; the comparison that matters is on the same trained model with
the biases of its block layers removed (a bias-free architecture such as Llama), whose dense loss
is measured too. Both are compressed with the default ``compress`` (``relu``, corrective, uniform
ranks) on the calibration batches of ``bench_quality``, at ratios 0.4 and 0.25.

    python -m benchmarks.bench_bias
"""

from __future__ import annotations

import copy
import json
import time

import torch
from torch import nn

import torch_lowrank as tl
from benchmarks import bench_quality
from benchmarks.models import NUM_THREADS

__all__ = ["run", "without_block_biases"]

RATIOS = (0.4, 0.25)
VARIANTS = ("with biases", "bias-free")


def without_block_biases(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``blocks.*`` linear layers have no bias."""
    model = copy.deepcopy(model)
    for name, module in model.named_modules():
        if name.startswith("blocks.") and isinstance(module, nn.Linear):
            module.bias = None
    return model


def run(ratios: tuple[float, ...] = RATIOS, variants: tuple[str, ...] = VARIANTS) -> list[dict]:
    """One row per (model variant, ratio, add_bias): the validation loss and the seconds."""
    torch.set_num_threads(NUM_THREADS)
    w = bench_quality.build("char_lm", quick=False)
    models = {"with biases": w.model, "bias-free": without_block_biases(w.model)}
    rows = []
    for variant in variants:
        dense = models[variant]
        rows.append({"model": variant, "ratio": 1.0, "add_bias": None, "loss": w.evaluate(dense)})
        print(json.dumps(rows[-1]), flush=True)
        for ratio in ratios:
            for add_bias in (True, False):
                torch.manual_seed(0)
                start = time.perf_counter()
                model, report = tl.compress(
                    copy.deepcopy(dense), w.data, ratio=ratio, add_bias=add_bias,
                    samples=w.settings["samples"], progress=False, **w.layers,
                )  # fmt: skip
                rows.append({
                    "model": variant, "ratio": ratio, "add_bias": add_bias,
                    "loss": w.evaluate(model), "params": report.params_after,
                    "seconds": time.perf_counter() - start,
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    run()  # prints one JSON row per measurement as it goes
