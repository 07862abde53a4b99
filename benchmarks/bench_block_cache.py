"""Corrective recovery with and without block input caching, side by side in one process.

With the cache (the default), a wave of layers inside a chain of blocks runs only its block on
cached inputs; without it, every wave runs the whole model twice over the calibration data. The
two give the same factors (to float rounding); this measures the wall time, the forward / block
passes and the metric of each, interleaved, median of ``--repeats`` runs.

    python -m benchmarks.bench_block_cache [--only cnn lm] [--ratio 0.4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import torch_lowrank as tl
from benchmarks.bench_corrective import workloads


def run(names: list[str], ratio: float, method: str, repeats: int) -> list[dict]:
    rows = []
    for name, (model, data, metric, kwargs, label) in workloads(names).items():
        seconds: dict[bool, list[float]] = {True: [], False: []}
        info: dict[bool, dict] = {}
        value: dict[bool, float] = {}
        for _ in range(repeats):
            for cache in (True, False):
                torch.manual_seed(0)
                compressed = copy.deepcopy(model)
                start = time.perf_counter()
                _, report = tl.compress(
                    compressed, data, method=method, ratio=ratio, progress=False,
                    cache_blocks=cache, **kwargs,
                )  # fmt: skip
                seconds[cache].append(time.perf_counter() - start)
                info[cache], value[cache] = report.info, metric(compressed)
        for cache in (True, False):
            rows.append({
                "workload": name, "ratio": ratio, "method": method, "cache_blocks": cache,
                "metric": label, "value": value[cache],
                "seconds": statistics.median(seconds[cache]), "runs": seconds[cache],
                "forward_passes": info[cache]["forward_passes"],
                "block_passes": info[cache]["block_passes"], "waves": info[cache]["waves"],
            })  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| workload | waves | cache | forward passes | block passes | metric | seconds "
        "(median) | time / no-cache time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = next(r for r in rows if r["workload"] == row["workload"] and not r["cache_blocks"])
        lines.append(
            f"| {row['workload']} | {row['waves']} | {'on' if row['cache_blocks'] else 'off'} | "
            f"{row['forward_passes']} | {row['block_passes']} | {row['value']:.4f} | "
            f"{row['seconds']:.1f} | {row['seconds'] / base['seconds']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=["cnn", "lm"])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--method", default="linear")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/block_cache.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = run(args.only, args.ratio, args.method, args.repeats)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
