"""Cost of the ``linear`` solve next to one ``torch.linalg.eigh`` of size ``min(m, n)``.

By design, recovery costs about one eigendecomposition of size ``min(m, n)`` per layer.
For every shape this times, in one process and interleaved, a float64 ``eigh`` of a
``min(m, n)`` covariance, the ``linear`` solve and the ``svd`` baseline, and reports the medians
and their ratios. Absolute times depend on the machine; the ratios are what to compare.

    python benchmarks/bench_solve.py [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from torch_lowrank import solvers

SHAPES = [(4096, 1024), (1024, 4096), (1024, 1024), (2048, 2048)]


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(m: int, n: int, repeats: int, ratio: float = 0.5) -> dict:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(m, n, generator=gen, dtype=torch.float64)
    x = torch.randn(2 * n, n, generator=gen, dtype=torch.float64)
    mean, cov = x.mean(0), torch.cov(x.T, correction=0)
    k = min(m, n)
    square = cov if k == n else weight @ cov @ weight.T
    rank = int(ratio * m * n / (m + n))
    runs = {"eigh": [], "linear": [], "svd": []}
    for _ in range(repeats):  # interleaved so that machine noise hits all three alike
        runs["eigh"].append(_seconds(lambda: torch.linalg.eigh(square)))
        runs["linear"].append(_seconds(lambda: solvers.linear(weight, None, mean, cov, rank=rank)))
        runs["svd"].append(_seconds(lambda: solvers.svd(weight, None, rank=rank)))
    med = {key: statistics.median(values) for key, values in runs.items()}
    return {
        "shape": [m, n],
        "rank": rank,
        "eigh_s": med["eigh"],
        "linear_s": med["linear"],
        "svd_s": med["svd"],
        "linear_over_eigh": med["linear"] / med["eigh"],
        "svd_over_eigh": med["svd"] / med["eigh"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = [measure(m, n, args.repeats) for m, n in SHAPES]
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, float64, median of {args.repeats}")
    print("| shape (m x n) | rank | eigh(min) s | linear s | svd s | linear / eigh | svd / eigh |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape'][0]} x {r['shape'][1]} | {r['rank']} | {r['eigh_s']:.3f} | "
            f"{r['linear_s']:.3f} | {r['svd_s']:.3f} | {r['linear_over_eigh']:.2f} | "
            f"{r['svd_over_eigh']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
