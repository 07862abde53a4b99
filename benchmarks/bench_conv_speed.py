"""Inference speed of recovered ``LowRankConv2d`` layers against the dense ``nn.Conv2d``.

For a few realistic shapes and ratios this times, side by side and interleaved in one process,
the dense conv and its low-rank replacement (``C_in -> r`` conv with the original kernel, then a
``1 x 1`` conv ``r -> C_out``), and prints the measured speedup next to the FLOP ratio, so users see
when factoring pays. Medians of several runs; only the ratios are comparable across machines.

    python benchmarks/bench_conv_speed.py [--repeats 7] [--batch 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from torch_lowrank import LowRankConv2d

# (C_in, C_out, kernel, spatial size)
SHAPES = [(256, 256, 3, 28), (256, 256, 3, 56), (128, 128, 3, 56), (64, 64, 3, 112)]
RATIOS = (0.5, 0.25)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure(
    c_in: int, c_out: int, k: int, size: int, ratio: float, batch: int, repeats: int
) -> dict:
    torch.manual_seed(0)
    dense = nn.Conv2d(c_in, c_out, k, padding=k // 2).eval()
    low = LowRankConv2d.from_conv2d(dense, ratio=ratio)
    low.recover_("svd")  # speed does not depend on how the factors were found
    x = torch.randn(batch, c_in, size, size)
    r = low.rank
    dense_times, low_times = [], []
    for _ in range(repeats):  # interleave so machine noise hits both alike
        dense_times.append(_median_seconds(lambda: dense(x), 1))
        low_times.append(_median_seconds(lambda: low(x), 1))
    flops_dense = c_out * c_in * k * k
    flops_low = r * c_in * k * k + c_out * r
    return {
        "shape": f"{c_in}->{c_out} {k}x{k} on {size}x{size}",
        "batch": batch,
        "ratio": ratio,
        "rank": r,
        "dense_ms": 1e3 * statistics.median(dense_times),
        "lowrank_ms": 1e3 * statistics.median(low_times),
        "speedup": statistics.median(dense_times) / statistics.median(low_times),
        "flop_ratio": flops_dense / flops_low,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [
        measure(c_in, c_out, k, size, ratio, args.batch, args.repeats)
        for c_in, c_out, k, size in SHAPES
        for ratio in RATIOS
    ]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch {args.batch}"
    )
    print("| conv | ratio | rank | dense ms | low-rank ms | speedup | FLOP ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['ratio']} | {r['rank']} | {r['dense_ms']:.1f} | "
            f"{r['lowrank_ms']:.1f} | {r['speedup']:.2f}x | {r['flop_ratio']:.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
