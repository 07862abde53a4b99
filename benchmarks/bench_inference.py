"""Inference speed of recovered models and layers against dense, in one process.

* Whole workloads: each model of ``bench_quality`` with its compressible layers factored at the
  uniform ratio's ranks (the factors' values do not change the speed, so the data-free ``svd``
  recovery builds them), timed against the dense model on one evaluation batch (256 images, or
  32 windows of 64 characters), float32, no grad.
* Single layers: ``bench_linear_speed.measure`` (``nn.Linear`` against ``LowRankLinear``) and
  ``bench_conv_speed.measure`` (``nn.Conv2d`` against ``LowRankConv2d``) on a few shapes
  (all of theirs without ``--quick``).

Each timing repeats the call until it lasts about 20 ms; the tables show medians over
interleaved rounds, so machine load hits dense and low-rank alike.

    python -m benchmarks.bench_inference [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch

import torch_lowrank as tl
from benchmarks import bench_conv_speed, bench_linear_speed
from benchmarks.bench_quality import WORKLOADS, build
from benchmarks.models import NUM_THREADS

__all__ = ["workloads", "run"]


def _per_call(fn, calls: int) -> float:
    return bench_linear_speed._seconds_per_call(fn, calls)


@torch.no_grad()
def workloads(quick: bool) -> list[dict]:
    """Dense model against the model factored at each ratio, per workload."""
    repeats = 5 if quick else 9
    rows = []
    for name in WORKLOADS:
        w = build(name, quick)
        x = w.data[0]
        variants = {1.0: w.model}
        ranks = {}
        for ratio in w.settings["ratios"]:
            model = tl.convert(copy.deepcopy(w.model), ratio=ratio, **w.layers)
            report = tl.recover_(model, method="svd", progress=False)
            variants[ratio] = model.eval()
            ranks[ratio] = {r.name: r.rank for r in report.layers if r.rank is not None}
        calls = {
            r: bench_linear_speed._calls_for(lambda m=m, x=x: m(x)) for r, m in variants.items()
        }
        times: dict[float, list[float]] = {r: [] for r in variants}
        for _ in range(repeats):
            for r, model in variants.items():
                times[r].append(_per_call(lambda m=model, x=x: m(x), calls[r]))
        dense = statistics.median(times[1.0])
        for ratio in w.settings["ratios"]:
            low = statistics.median(times[ratio])
            rows.append({"workload": name, "ratio": ratio, "batch": list(x.shape),
                         "dense_ms": 1e3 * dense, "lowrank_ms": 1e3 * low,
                         "speedup": dense / low, "ranks": ranks[ratio]})  # fmt: skip
            print(f"inference {name} ratio={ratio}: {dense / low:.2f}x", flush=True)
    return rows


def run(quick: bool = False) -> dict:
    """The ``run.py`` entry."""
    torch.set_num_threads(NUM_THREADS)
    linear_shapes = [(1024, 1024), (4096, 4096)] if quick else bench_linear_speed.SHAPES
    batches = (1, 512) if quick else bench_linear_speed.BATCHES
    repeats = 5 if quick else 9
    linear = [
        row
        for m, n in linear_shapes
        for batch in batches
        for row in bench_linear_speed.measure(m, n, batch, repeats)
    ]
    conv_shapes = [(128, 128, 3, 56)] if quick else bench_conv_speed.SHAPES
    conv = [
        bench_conv_speed.measure(c_in, c_out, k, size, ratio, 8, repeats)
        for c_in, c_out, k, size in conv_shapes
        for ratio in bench_conv_speed.RATIOS
    ]
    return {
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "workloads": workloads(quick),
        "linear": linear,
        "conv": conv,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = run(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
