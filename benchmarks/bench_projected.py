"""Iterations per second of the projected-gradient loop of ``torch_lowrank.projected``.

The loop of :func:`torch_lowrank.projected.activation_aware` (ReLU objective) on a 1024 x 1024
layer with 4096 sample rows at rank 256, once with the library's projection (one subspace-iteration
step warm-started from the previous left factor, ``O(m n r)``) and once with a full
``torch.linalg.svd`` of the ``m x n`` iterate every iteration. Both run the same loop in the same
process, interleaved, so machine load hits both alike. A run's setup (targets, step size) is
measured with ``max_iter=0`` and subtracted. Prints a markdown table of medians.

    python benchmarks/bench_projected.py [--iters 20] [--repeats 5] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from torch_lowrank import projected, solvers


def svd_projection(Z, U, step=None):
    """The exact rank-r projection: a full SVD of ``Z`` each iteration."""
    left, s, right = torch.linalg.svd(Z, full_matrices=False)
    r = U.shape[1]
    return left[:, :r], s[:r, None] * right[:r]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(problem, projection, iters: int) -> tuple[float, int]:
    """Seconds of one call and the iterations it ran, with ``projection`` in the loop."""
    weight, bias, rows, start = problem
    original = projected._project
    projected._project = projection
    try:
        synchronize(weight.device)
        began = time.perf_counter()
        fit = projected.activation_aware(weight, bias, rows, start, "relu", max_iter=iters, tol=0)
        synchronize(weight.device)
        return time.perf_counter() - began, fit.info["iterations"]
    finally:
        projected._project = original


def measure(
    m: int = 1024,
    n: int = 1024,
    rows: int = 4096,
    rank: int = 256,
    iters: int = 20,
    repeats: int = 5,
    device: str = "cpu",
) -> dict:
    """Iterations per second (medians of ``repeats`` interleaved runs) of both projections."""
    torch.manual_seed(0)
    dev = torch.device(device)
    f64 = torch.float64
    weight = torch.randn(m, n, dtype=f64, device=dev) / n**0.5
    bias = 0.1 * torch.randn(m, dtype=f64, device=dev)
    mix = torch.randn(n, n, dtype=f64, device=dev) / n**0.5
    x = torch.randn(rows, n, dtype=f64, device=dev) @ mix  # correlated inputs
    start = solvers.linear(weight, bias, x.mean(0), torch.cov(x.T, correction=0), rank=rank)
    problem = (weight, bias, x, start)
    methods = {"subspace iteration (library)": projected._project, "full SVD": svd_projection}

    timed(problem, projected._project, 2)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, projection in methods.items():
            setup, _ = timed(problem, projection, 0)
            seconds, iterations = timed(problem, projection, iters)
            rates[name].append(iterations / max(seconds - setup, 1e-9))
    med = {name: statistics.median(values) for name, values in rates.items()}
    baseline = med["full SVD"]
    return {
        "shape": [m, n], "rows": rows, "rank": rank, "iters": iters, "repeats": repeats,
        "device": device, "threads": torch.get_num_threads(),
        "projections": [
            {"projection": name, "iterations_per_s": rate, "seconds_per_iteration": 1 / rate,
             "speedup": rate / baseline}
            for name, rate in med.items()
        ],
    }  # fmt: skip


def suite(quick: bool = False) -> dict:
    """The ``run.py`` entry: a 512 x 512 layer with --quick, else the 1024 x 1024 default."""
    if quick:
        return measure(512, 512, 2048, 128, iters=10, repeats=3)
    return measure()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=1024)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = measure(args.m, args.n, args.rows, args.rank, args.iters, args.repeats, args.device)
    print(
        f"{args.m} x {args.n} layer, {args.rows} rows, rank {args.rank}, {args.device}, "
        f"{torch.get_num_threads()} threads; median of {args.repeats} runs of {args.iters} "
        "iterations\n"
    )
    print("| projection | iterations / s | seconds / iteration | speed-up |")
    print("|---|---:|---:|---:|")
    for row in result["projections"]:
        print(
            f"| {row['projection']} | {row['iterations_per_s']:.2f} | "
            f"{row['seconds_per_iteration']:.3f} | {row['speedup']:.2f}x |"
        )


if __name__ == "__main__":
    main()
