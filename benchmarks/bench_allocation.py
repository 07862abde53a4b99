"""Uniform against global rank allocation on the character language model, side by side.

The ``CharTransformer`` of ``benchmarks/models.py`` (trained once on the Python documentation,
cached outside the repository) has every block Linear compressed to the same total number of
weights, either with each layer keeping ``ratio`` of its own weights (``uniform``) or with the
ranks chosen together from the layers' output spectra (``global``, given exactly the fraction of
weights the uniform ratio ended up keeping), for each method, in the parallel and the
corrective mode. Metric: validation loss in nats per character (dense: see the
first row). Rows are printed as they are measured.

    python -m benchmarks.bench_allocation [--ratios 0.4 0.25] [--methods linear relu] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import torch_lowrank as tl
from benchmarks.datasets import batches_from_ids
from benchmarks.models import trained_char_transformer
from benchmarks.training import evaluate_lm_loss


def weight_fraction(report: tl.Report) -> float:
    """The fraction of the converted Linear layers' weights kept (biases aside)."""
    kept = sum(r.rank * sum(r.shape) for r in report.layers if r.rank is not None)
    kept += sum(r.shape[0] * r.shape[1] for r in report.layers if r.rank is None)
    return kept / sum(r.shape[0] * r.shape[1] for r in report.layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.6, 0.4, 0.25])
    parser.add_argument("--methods", nargs="+", default=["svd", "linear", "relu"])
    parser.add_argument("--modes", nargs="+", default=["parallel", "corrective"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model, (_, train_ids, val_ids) = trained_char_transformer()
    data = [x for x, _ in batches_from_ids(train_ids, model.block, 32, 16, seed=7)]

    def loss(m):
        return evaluate_lm_loss(m, val_ids, model.block, n_batches=20)

    rows = [{"ratio": 1.0, "allocation": "dense", "method": "-", "mode": "-", "loss": loss(model)}]
    print(f"dense validation loss {rows[0]['loss']:.4f}", flush=True)
    print("| ratio | method | mode | uniform | global | kept (uniform / global) |", flush=True)
    print("|---|---|---|---|---|---|", flush=True)
    for ratio in args.ratios:
        for method in args.methods:
            for mode in args.modes:
                if method == "svd" and mode == "corrective":
                    continue  # svd uses no data
                cell = {}
                budget = ratio
                for allocation in ("uniform", "global"):
                    torch.manual_seed(0)
                    start = time.perf_counter()
                    compressed, report = tl.compress(
                        copy.deepcopy(model), data, ratio=budget, method=method,
                        corrective=mode == "corrective", allocation=allocation,
                        include="blocks.*", progress=False,
                    )  # fmt: skip
                    cell[allocation] = {
                        "ratio": ratio, "allocation": allocation, "method": method, "mode": mode,
                        "loss": loss(compressed), "seconds": time.perf_counter() - start,
                        "kept": weight_fraction(report),
                    }  # fmt: skip
                    rows.append(cell[allocation])
                    budget = weight_fraction(report)  # global gets exactly uniform's weights
                u, g = cell["uniform"], cell["global"]
                print(
                    f"| {ratio} | {method} | {mode} | {u['loss']:.4f} | {g['loss']:.4f} | "
                    f"{u['kept']:.3f} / {g['kept']:.3f} |",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
