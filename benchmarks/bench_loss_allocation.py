"""Loss-aware rank allocation against normalised spectra, on the character language model.

Global allocation today minimises the sum of the layers' *normalised* errors (each layer's
spectral tail over its total): one unit of relative error costs the same in every layer. A
loss-aware allocation puts every layer's error in one currency, the end-to-end loss: each layer's
normalised tail is weighed by its *sensitivity*, measured directly on the calibration batches.

Sensitivity of layer ``j``: compress that layer alone to its uniform rank (``linear``, parallel),
measure the increase of ``KL(dense || compressed)`` of the next-character distributions on the
calibration batches (no labels) and divide by the layer's relative error at that rank. The
allocation then minimises ``sum_j s_j tail_j(r_j) / total_j`` under the same weight budget
(``LayerBudget.weight``), from the same spectra; only the calibration batches are used.

For each ratio, the three allocations (uniform, spectra, loss-aware) get exactly the same number
of weights, and each model is recovered correctively with the same method. Metric: validation
loss in nats per character; the probes' time is reported separately.

    python -m benchmarks.bench_loss_allocation [--ratios 0.4 0.25] [--methods linear] [--json P]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

import torch_lowrank as tl
from benchmarks.bench_allocation import weight_fraction
from benchmarks.datasets import batches_from_ids
from benchmarks.models import NUM_THREADS, trained_char_transformer
from benchmarks.training import evaluate_lm_loss
from torch_lowrank.allocation import LayerBudget, allocate


def kl_to_dense(model, dense_logits: list[torch.Tensor], data: list[torch.Tensor]) -> float:
    """Mean ``KL(dense || model)`` per character over ``data``."""
    total = 0.0
    with torch.no_grad():
        for x, p in zip(data, dense_logits):
            q = model(x).log_softmax(-1)
            total += float(F.kl_div(q, p.log_softmax(-1), log_target=True, reduction="batchmean"))
    return total / len(data) / data[0].shape[1]


def sensitivities(model, data, ranks: dict[str, int], errors: dict[str, float]) -> dict:
    """Per layer: KL increase when only that layer is compressed, over its relative error."""
    with torch.no_grad():
        dense_logits = [model(x) for x in data]
    out = {}
    for name, rank in ranks.items():
        torch.manual_seed(0)
        single, _ = tl.compress(
            copy.deepcopy(model), data, rank=rank, method="linear", corrective=False,
            include=name, progress=False,
        )  # fmt: skip
        out[name] = kl_to_dense(single, dense_logits, data) / max(errors[name], 1e-12)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.25])
    parser.add_argument("--methods", nargs="+", default=["linear"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(NUM_THREADS)

    model, (_, train_ids, val_ids) = trained_char_transformer()
    data = [x for x, _ in batches_from_ids(train_ids, model.block, 32, 16, seed=7)]

    def loss(m):
        return evaluate_lm_loss(m, val_ids, model.block, n_batches=20)

    rows = [{"ratio": 1.0, "allocation": "dense", "loss": loss(model)}]
    print(f"dense validation loss {rows[0]['loss']:.4f}", flush=True)
    print("| ratio | method | uniform | spectra | loss-aware | probes (s) |", flush=True)
    print("|---|---|---|---|---|---|", flush=True)
    for ratio in args.ratios:
        torch.manual_seed(0)
        _, report = tl.compress(
            copy.deepcopy(model), data, ratio=ratio, method="linear", corrective=False,
            include="blocks.*", progress=False,
        )  # fmt: skip
        kept = weight_fraction(report)
        layers = [r for r in report.layers if r.rank is not None]
        uniform = {r.name: r.rank for r in layers}
        start = time.perf_counter()
        sens = sensitivities(model, data, uniform, {r.name: r.relative_error for r in layers})
        probe_seconds = time.perf_counter() - start
        budgets = {}
        for allocation, weights in (("spectra", {}), ("loss-aware", sens)):
            budget = [
                LayerBudget(
                    r.name, r.shape, torch.tensor(r.spectrum), weight=weights.get(r.name, 1.0)
                )
                for r in layers
            ]
            budgets[allocation] = allocate(budget, kept)
        budgets["uniform"] = uniform
        for method in args.methods:
            cell = {}
            for allocation in ("uniform", "spectra", "loss-aware"):
                ranks = budgets[allocation]
                torch.manual_seed(0)
                start = time.perf_counter()
                compressed, rep = tl.compress(
                    copy.deepcopy(model), data, rank=1, method=method,
                    include="blocks.*", exclude=[n for n, r in ranks.items() if r is None],
                    overrides={n: r for n, r in ranks.items() if r is not None}, progress=False,
                )  # fmt: skip
                cell[allocation] = {
                    "ratio": ratio, "method": method, "allocation": allocation,
                    "loss": loss(compressed), "kept": weight_fraction(rep),
                    "seconds": time.perf_counter() - start, "ranks": ranks,
                }  # fmt: skip
                rows.append(cell[allocation])
            rows[-1]["sensitivity"] = sens
            rows[-1]["probe_seconds"] = probe_seconds
            values = " | ".join(
                f"{cell[a]['loss']:.4f}" for a in ("uniform", "spectra", "loss-aware")
            )
            print(f"| {ratio} | {method} | {values} | {probe_seconds:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
