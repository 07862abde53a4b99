"""Recovery split across processes (torch.distributed, gloo) on one machine.

The character language model's 24 block Linears are calibrated on 16 batches, sharded over
``world`` processes (1 thread each), then recovered with ``relu`` (parallel: the solve-heavy
case) and correctively with ``linear``. Reported: the slowest rank's wall time of each phase,
median of ``--repeats`` runs, and whether every rank's model equals the one-process model
(``linear``; largest difference of the effective weights ``up @ down``).

    python -m benchmarks.bench_distributed [--worlds 1 2] [--repeats 3]

On a 2-core machine shared with other jobs, two ranks can at best halve the time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torch_lowrank as tl
from benchmarks.datasets import batches_from_ids
from benchmarks.models import trained_char_transformer


def effective(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: m.up.weight @ m.down.weight
        for name, m in model.named_modules()
        if isinstance(m, tl.LowRankLinear)
    }


def worker(rank: int, world: int, store: str, out: str, repeats: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, (_, train_ids, _) = trained_char_transformer()
    data = [x for x, _ in batches_from_ids(train_ids, model.block, 32, 16, seed=7)]
    shard = data[rank::world]
    times: dict[str, list[float]] = {"parallel relu": [], "corrective linear": []}
    weights = None
    for _ in range(repeats):
        torch.manual_seed(rank)
        parallel = tl.convert(copy.deepcopy(model), ratio=0.4, include="blocks.*")
        tl.calibrate(parallel, shard, progress=False)
        dist.barrier()
        start = time.perf_counter()
        tl.recover_(parallel, method="relu", progress=False)
        times["parallel relu"].append(time.perf_counter() - start)
        corrective = copy.deepcopy(model)
        dist.barrier()
        start = time.perf_counter()
        tl.compress(corrective, shard, ratio=0.4, method="linear", include="blocks.*",
                    progress=False)  # fmt: skip
        times["corrective linear"].append(time.perf_counter() - start)
        weights = effective(corrective)
    torch.save({"times": times, "weights": weights}, os.path.join(out, f"{world}-{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/distributed.json")
    args = parser.parse_args()
    trained_char_transformer()  # train (or load) once, before the workers start
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            store = os.path.join(tmp, f"store{world}")
            mp.spawn(worker, args=(world, store, tmp, args.repeats), nprocs=world)
            ranks = [torch.load(os.path.join(tmp, f"{world}-{r}.pt")) for r in range(world)]
            reference = reference or ranks[0]["weights"]
            gap = max(
                (r["weights"][k] - reference[k]).abs().max().item()
                for r in ranks
                for k in reference
            )
            for phase in ranks[0]["times"]:
                slowest = [max(r["times"][phase][i] for r in ranks) for i in range(args.repeats)]
                rows.append({"world": world, "phase": phase, "seconds": statistics.median(slowest),
                             "runs": slowest, "max_weight_difference": gap})  # fmt: skip
                print(rows[-1], flush=True)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    print("| phase | processes | seconds (median, slowest rank) | time vs 1 process |")
    print("|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["phase"] == row["phase"] and r["world"] == 1)
        print(f"| {row['phase']} | {row['world']} | {row['seconds']:.1f} | "
              f"{row['seconds'] / base['seconds']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
