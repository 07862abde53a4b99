"""Inference speed of recovered ``LowRankLinear`` layers against the dense ``nn.Linear`` on CPU.

For the square shapes 1024, 2048 and 4096 and LLaMA-7B's MLP down-projection (4096 x 11008,
out x in), batches of 1, 32 and 512 rows, and ranks of 1/8 and 1/4 of ``min(m, n)`` (rank 512 and
1024 for the 4096-wide layers), this times the dense layer and the recovered module
(``up(down(x))``: two ``F.linear`` calls, no copy or reshape) interleaved in one process, in
float32 under ``torch.inference_mode``, and prints a markdown table with the measured speedup
next to the FLOP ratio ``m n / (r (m + n))``. Each measurement repeats the call until it lasts
about 20 ms; the table shows medians over ``--repeats`` interleaved rounds. Only ratios compare
across machines.

    python -m benchmarks.bench_linear_speed [--threads 2] [--repeats 7] [--json PATH]

(Run it as a module: importing ``benchmarks`` first sets ``OMP_WAIT_POLICY=PASSIVE``, see
``benchmarks/__init__.py``.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from torch_lowrank import LowRankLinear

__all__ = ["SHAPES", "BATCHES", "ranks_for", "forward_ops", "measure", "main"]

#: (out_features, in_features)
SHAPES = [(1024, 1024), (2048, 2048), (4096, 4096), (4096, 11008)]
BATCHES = (1, 32, 512)


def ranks_for(m: int, n: int) -> list[int]:
    """1/8 and 1/4 of ``min(m, n)`` (512 and 1024 for the 4096-wide layers)."""
    return [min(m, n) // 8, min(m, n) // 4]


def _seconds_per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _calls_for(fn: Callable[[], object], target: float = 0.02) -> int:
    """How many calls of ``fn`` take about ``target`` seconds (after a warm-up call)."""
    fn()
    once = max(_seconds_per_call(fn, 1), 1e-6)
    return max(1, round(target / once))


@torch.inference_mode()
def forward_ops(module: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """How often each ATen operator runs in one forward of ``module`` (the check that the
    recovered forward adds no copy: ``up`` is ``nn.Linear``'s own ``addmm``, whose single
    ``copy_`` broadcasts the bias into the output, in the dense layer too; ``down`` is one
    ``mm``; the rest are views)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        module(x)
    return {event.key: event.count for event in prof.key_averages()}


def _ops_line(ops: dict[str, int]) -> str:
    return ", ".join(
        f"{name.removeprefix('aten::')} x{count}" for name, count in sorted(ops.items())
    )


@torch.inference_mode()
def measure(m: int, n: int, batch: int, repeats: int) -> list[dict]:
    """Dense against every rank of :func:`ranks_for` for one shape and batch, interleaved."""
    torch.manual_seed(0)
    dense = nn.Linear(n, m)
    variants: dict[int | None, nn.Module] = {None: dense}
    for r in ranks_for(m, n):
        variants[r] = LowRankLinear(n, m, r)  # speed does not depend on the factors' values
    x = torch.randn(batch, n)
    calls = {r: _calls_for(lambda mod=mod: mod(x)) for r, mod in variants.items()}
    times: dict[int | None, list[float]] = {r: [] for r in variants}
    for _ in range(repeats):  # interleave so machine noise hits every variant alike
        for r, mod in variants.items():
            times[r].append(_seconds_per_call(lambda mod=mod: mod(x), calls[r]))
    dense_s = statistics.median(times[None])
    rows = []
    for r in ranks_for(m, n):
        low_s = statistics.median(times[r])
        rows.append(
            {
                "shape": f"{m}x{n}",
                "batch": batch,
                "rank": r,
                "dense_ms": 1e3 * dense_s,
                "lowrank_ms": 1e3 * low_s,
                "speedup": dense_s / low_s,
                "flop_ratio": m * n / (r * (m + n)),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(4, 8, 512)  # (B, T, n): a 3-d input is folded into rows by a view
    low_ops = forward_ops(LowRankLinear(512, 256, 64), x)
    dense_ops = forward_ops(nn.Linear(512, 256), x)
    print(f"dense forward ops:     {_ops_line(dense_ops)}")
    print(f"recovered forward ops: {_ops_line(low_ops)}")
    if low_ops.get("aten::copy_", 0) > dense_ops.get("aten::copy_", 0):
        raise RuntimeError("the recovered forward copies more than the dense layer")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"median of {args.repeats} interleaved rounds"
    )
    print("| shape (out x in) | batch | rank | dense ms | low-rank ms | speedup | FLOP ratio |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for m, n in SHAPES:
        for batch in BATCHES:
            for row in measure(m, n, batch, args.repeats):
                rows.append(row)
                print(
                    f"| {row['shape']} | {batch} | {row['rank']} | {row['dense_ms']:.3f} | "
                    f"{row['lowrank_ms']:.3f} | {row['speedup']:.2f}x | "
                    f"{row['flop_ratio']:.2f}x |",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
