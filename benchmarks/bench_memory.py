"""Peak calibration memory: one pass over the whole model versus corrective wave by wave.

A 24-block GPT-style ``CharTransformer`` (144 block Linears; random weights, since memory does
not depend on training) is compressed to ratio 0.4 on character windows of the Python
documentation, once per mode, each in a fresh subprocess:

* ``one-pass``: ``compress(corrective=False)``: every layer's statistics (and, for ``relu``, its
  reservoir of 4,096 rows) exist at once before recovery.
* ``wave-by-wave``: ``compress()`` (corrective): statistics, reservoirs and cached block inputs
  exist only for the wave being solved.

Reported: the library's own ``peak_stat_bytes`` (statistics + reservoirs + block cache) and the
process's peak resident memory growth during ``compress`` (``ru_maxrss``, Linux; after a warm-up
compression of a one-block model has loaded everything lazily imported), with the wall time.

    python -m benchmarks.bench_memory [--layers 24] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

import torch_lowrank as tl
from benchmarks.datasets import batches_from_ids, char_dataset, load_text_corpus
from benchmarks.models import CharTransformer

MODES = {"one-pass": False, "wave-by-wave": True}


def measure(mode: str, method: str, layers: int) -> dict:
    """Run one compression in this process; returns its memory figures."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    vocab, train_ids, _ = char_dataset(load_text_corpus(), block=64)
    model = CharTransformer(len(vocab), d_model=128, n_layers=layers, n_heads=4).eval()
    data = [x for x, _ in batches_from_ids(train_ids, model.block, 16, 8, seed=7)]
    warm = CharTransformer(len(vocab), d_model=128, n_layers=1, n_heads=4).eval()
    tl.compress(warm, data[:2], ratio=0.4, method=method, corrective=MODES[mode], progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after lazy imports and warm-up
    start = time.perf_counter()
    _, report = tl.compress(
        model, data, ratio=0.4, method=method, corrective=MODES[mode], include="blocks.*",
        progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "mode": mode,
        "method": method,
        "layers": layers,
        "linear_layers": len(report.layers),
        "peak_stat_mib": report.info["peak_stat_bytes"] / 2**20,
        "rss_growth_mib": (after - before) / 1024,
        "seconds": seconds,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| method | mode | peak statistics (MiB) | peak RSS growth (MiB) | seconds | "
        "statistics vs one-pass |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = next(r for r in rows if r["method"] == row["method"] and r["mode"] == "one-pass")
        lines.append(
            f"| {row['method']} | {row['mode']} | {row['peak_stat_mib']:.1f} | "
            f"{row['rss_growth_mib']:.0f} | {row['seconds']:.0f} | "
            f"{row['peak_stat_mib'] / base['peak_stat_mib']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--methods", nargs="+", default=["linear", "relu"])
    parser.add_argument("--json", default="benchmarks/results/memory.json")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.layers)))
        return
    rows = []
    for method in args.methods:
        for mode in MODES:
            command = [sys.executable, "-m", "benchmarks.bench_memory", "--child", mode, method,
                       "--layers", str(args.layers)]  # fmt: skip
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
