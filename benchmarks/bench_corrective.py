"""Parallel, GPTQ-style sequential and corrective recovery, side by side, on real data.

Workloads (trained once, cached outside the repository by ``benchmarks/models.py``):

* ``cnn``: the Fashion-MNIST ``SmallCNN``; every conv and linear layer but the 10-way head is
  compressed; metric: test accuracy (10,000 images), calibration: 2,048 training images.
* ``lm``: the character-level ``CharTransformer`` trained on the Python documentation; every
  block Linear (q, k, v, out, fc1, fc2) is compressed, embeddings and head stay dense; metric:
  validation loss (nats/char), calibration: 32 windows of 64 characters x 16 batches.

Modes, all at the same ranks (``ratio`` = fraction of each layer's weights kept):

* ``parallel``: every layer from its own input in the original network (one pass).
* ``sequential``: GPTQ-style: layer by layer, input from the compressed network ``x~`` but target
  ``W x~`` (each layer re-fitted on the damaged inputs).
* ``corrective``: input ``x~`` from the compressed network, target ``W x`` from the original one.

    python -m benchmarks.bench_corrective [--only cnn lm] [--ratios 0.6 0.4 0.25] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch import nn

import torch_lowrank as tl
from benchmarks.datasets import batches_from_ids
from benchmarks.models import trained_char_transformer, trained_small_cnn
from benchmarks.training import evaluate_accuracy, evaluate_lm_loss
from torch_lowrank.corrective import schedule

MODES = ("parallel", "sequential", "corrective")
METHODS = ("linear", "relu")


def sequential(model: nn.Module, data: list, method: str, **convert_kwargs) -> nn.Module:
    """GPTQ-style sequential recovery (a baseline; not in the library): each wave of layers is
    recovered from statistics collected on the partly compressed network, target ``W x~``."""
    tl.convert(model, **convert_kwargs)
    tl.calibrate(model, data[:1])  # the first forward observes the activations
    modules = [m for m in model.modules() if isinstance(m, (tl.LowRankLinear, tl.LowRankConv2d))]
    for wave in schedule(model, modules, data[0], tl.default_forward):
        for module in modules:
            if module.calibrating:  # start the statistics afresh
                module.observer.reset()
        tl.calibrate(model, data)
        for module in wave:
            module.recover_(method)
    return model


def compress(model: nn.Module, data: list, mode: str, method: str, **kwargs) -> nn.Module:
    model = copy.deepcopy(model)
    if mode == "sequential":
        return sequential(model, data, method, **kwargs)
    compressed, _ = tl.compress(
        model, data, method=method, corrective=mode == "corrective", **kwargs
    )
    return compressed


def workloads(names: list[str]) -> dict:
    found = {}
    if "cnn" in names:
        model, (x_tr, _, x_te, y_te) = trained_small_cnn()
        found["cnn"] = (
            model,
            list(x_tr[:2048].split(256)),
            lambda m: evaluate_accuracy(m, x_te, y_te),
            {"exclude": "classifier.3"},
            "test accuracy",
        )
    if "lm" in names:
        model, (vocab, train_ids, val_ids) = trained_char_transformer()
        data = [x for x, _ in batches_from_ids(train_ids, model.block, 32, 16, seed=7)]
        found["lm"] = (
            model,
            data,
            lambda m: evaluate_lm_loss(m, val_ids, model.block, n_batches=20),
            {"include": "blocks.*"},
            "validation loss",
        )
    return found


def run(names: list[str], ratios: tuple[float, ...]) -> list[dict]:
    rows = []
    for name, (model, data, metric, kwargs, label) in workloads(names).items():
        rows.append({"workload": name, "ratio": 1.0, "mode": "dense", "method": "-",
                     "metric": label, "value": metric(model), "seconds": 0.0})  # fmt: skip
        for ratio in ratios:
            for method in METHODS:
                for mode in MODES:
                    torch.manual_seed(0)
                    start = time.perf_counter()
                    compressed = compress(model, data, mode, method, ratio=ratio, **kwargs)
                    seconds = time.perf_counter() - start
                    rows.append({"workload": name, "ratio": ratio, "mode": mode,
                                 "method": method, "metric": label,
                                 "value": metric(compressed), "seconds": seconds})  # fmt: skip
                    print(  # progress: the table comes at the end
                        f"{name} ratio={ratio} {method} {mode}: {rows[-1]['value']:.4f} "
                        f"({seconds:.1f} s)",
                        flush=True,
                    )
    return rows


def table(rows: list[dict]) -> str:
    lines = []
    for name in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == name]
        dense = next(r for r in mine if r["mode"] == "dense")
        lines += [
            f"**{name}** ({dense['metric']}; dense: {dense['value']:.4f})",
            "",
            "| ratio | method | parallel | sequential (GPTQ-style) | corrective | "
            "corrective time / parallel time |",
            "|---|---|---|---|---|---|",
        ]
        for ratio in dict.fromkeys(r["ratio"] for r in mine if r["mode"] != "dense"):
            for method in METHODS:
                cell = {r["mode"]: r for r in mine if r["ratio"] == ratio and r["method"] == method}
                cost = cell["corrective"]["seconds"] / cell["parallel"]["seconds"]
                lines.append(
                    f"| {ratio} | {method} | {cell['parallel']['value']:.4f} | "
                    f"{cell['sequential']['value']:.4f} | {cell['corrective']['value']:.4f} | "
                    f"{cost:.1f}x |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=["cnn", "lm"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.6, 0.4, 0.25])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = run(args.only, tuple(args.ratios))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
