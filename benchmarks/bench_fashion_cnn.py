"""Fashion-MNIST CNN: test accuracy and post-activation error after compression.

The VGG-style ``SmallCNN`` of ``benchmarks/models.py`` (trained once and cached outside the
repository) is compressed at several ratios with the data-agnostic ``svd`` baseline, the exact
data-driven ``linear`` recovery and the activation-aware ``relu`` recovery, on the same 2,048
calibration images, each layer from its own input (parallel recovery; ``bench_corrective``
compares the corrective mode); every conv and linear layer but the 10-way head is converted.
Reported per
ratio and method: test accuracy on the 10,000 test images, and the mean per-layer relative
post-activation error on 1,000 held-out test images (each layer fed the original network's input,
``||relu(layer'(x)) - relu(layer(x))||^2 / ||relu(layer(x)) - mean||^2``, averaged over layers).

    python -m benchmarks.bench_fashion_cnn [--ratios 0.6 0.4 0.25] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

import torch_lowrank as tl
from benchmarks.models import trained_small_cnn
from benchmarks.training import evaluate_accuracy

METHODS = ("svd", "linear", "relu")
HEAD = "classifier.3"


@torch.no_grad()
def layer_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named layer receives in ``model`` on ``x``."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, args[0])
        )
        for name in names
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@torch.no_grad()
def post_activation_error(dense: nn.Module, compressed: nn.Module, names, inputs) -> float:
    errors = []
    for name in names:
        x = inputs[name]
        target = F.relu(dense.get_submodule(name)(x))
        got = F.relu(compressed.get_submodule(name)(x))
        centred = target - target.mean(0, keepdim=True)
        errors.append(((got - target).square().sum() / centred.square().sum()).item())
    return sum(errors) / len(errors)


def run(ratios: tuple[float, ...], seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    model, (x_tr, _, x_te, y_te) = trained_small_cnn()
    calibration = list(x_tr[:2048].split(256))
    held_out = x_te[:1000]
    names = [
        n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != HEAD
    ]
    inputs = layer_inputs(model, names, held_out)
    rows = [{"ratio": 1.0, "method": "dense", "accuracy": evaluate_accuracy(model, x_te, y_te)}]
    for ratio in ratios:
        for method in METHODS:
            torch.manual_seed(seed)
            start = time.perf_counter()
            compressed, report = tl.compress(
                copy.deepcopy(model),
                calibration,
                ratio=ratio,
                method=method,
                exclude=HEAD,
                corrective=False,  # compare the methods layer by layer; see bench_corrective
            )
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "ratio": ratio,
                    "method": method,
                    "params_kept": report.params_after / report.params_before,
                    "accuracy": evaluate_accuracy(compressed, x_te, y_te),
                    "post_activation_error": post_activation_error(
                        model, compressed, names, inputs
                    ),
                    "compress_seconds": seconds,
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| ratio | method | params kept | test accuracy | post-activation error | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] == "dense":
            lines.append(f"| 1.0 | dense | 1.00 | {r['accuracy']:.4f} | 0 | - |")
            continue
        lines.append(
            f"| {r['ratio']} | {r['method']} | {r['params_kept']:.2f} | {r['accuracy']:.4f} | "
            f"{r['post_activation_error']:.4f} | {r['compress_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.6, 0.4, 0.25])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = run(tuple(args.ratios))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
