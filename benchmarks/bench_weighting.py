"""Loss-aware output weighting (``weighting="fisher"``) against the plain closed forms.

For each workload and ratio, ``compress`` runs corrective recovery with and without
``weighting={"damping": alpha}`` for every ``alpha`` asked for, in the same flow otherwise:
``--method`` (``linear`` by default, where every layer is solved by a closed form), uniform or
``--allocation global`` ranks, the workload's calibration batches. The metric is the workload's
own (validation loss of the character LM, test accuracy of the classifiers); ``seconds`` is the
whole ``compress`` call, so it includes the backward passes that measure ``G``.

    python -m benchmarks.bench_weighting [--workloads char_lm fashion_cnn] [--ratios 0.4 0.25]
        [--alphas 0.1 1] [--method linear] [--allocation uniform] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import torch

import torch_lowrank as tl
from benchmarks.bench_quality import build, method_options
from benchmarks.models import NUM_THREADS


def run_one(w, ratio: float, method: str, allocation: str, alpha: float | None) -> dict:
    """One ``compress`` of workload ``w`` (``alpha=None``: unweighted); its metric and time."""
    torch.manual_seed(0)
    start = time.perf_counter()
    weighting = None if alpha is None else {"damping": alpha}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "recover_: refine: no layer")
        model, report = tl.compress(
            copy.deepcopy(w.model), w.data, ratio=ratio, method=method, corrective=True,
            allocation=allocation, samples=w.settings["samples"], weighting=weighting,
            options=method_options(method, w.settings["options"]), progress=False, **w.layers,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    value = w.evaluate(model)
    return {"ratio": ratio, "alpha": alpha, "value": value, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["char_lm", "fashion_cnn"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.25])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--method", default="linear")
    parser.add_argument("--allocation", default="uniform", choices=["uniform", "global"])
    parser.add_argument("--quick", action="store_true", help="the workloads' quick settings")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(NUM_THREADS)
    results = []
    for name in args.workloads:
        w = build(name, args.quick)
        dense = w.evaluate(w.model)
        rows = [{"ratio": 1.0, "alpha": None, "value": dense, "seconds": 0.0}]
        print(f"{name}: dense {w.metric} {dense:.4f}", flush=True)
        for ratio in args.ratios:
            for alpha in [None, *args.alphas]:
                row = run_one(w, ratio, args.method, args.allocation, alpha)
                rows.append(row)
                label = "unweighted" if alpha is None else f"alpha {alpha:g}"
                print(f"  {ratio} {label}: {row['value']:.4f} ({row['seconds']:.1f} s)", flush=True)
        results.append({"workload": name, "metric": w.metric, "method": args.method,
                        "allocation": args.allocation, "rows": rows})  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
