"""Calibration overhead of two checkouts side by side: calibration time / plain forward.

    python benchmarks/calibration_ab.py OLD_CHECKOUT NEW_CHECKOUT [--repeats 7] [--json PATH]

One worker process per checkout (``PYTHONPATH`` and working directory = the checkout, so it
imports that checkout's ``torch_lowrank``) builds the ``bench_cost`` workloads (its calibration
batches repeated ``bench_cost.PASSES`` times) and waits. The driver then asks the workers in
turn, alternating which goes first, for one measurement of one workload: a plain forward, a
calibration of a freshly converted model (ratio 0.4, the workload's reservoir size), and a
plain forward; the measurement is the calibration's seconds over the mean of the two forwards
around it (as ``bench_cost.calibration``). Only one worker runs at a time. Reported: the
median ratio per checkout and workload, and new / old.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

_WORKER = r"""
import json, sys, time
import benchmarks  # OMP_WAIT_POLICY=PASSIVE before torch, as the suite
import torch
import torch_lowrank as tl
from benchmarks.bench_cost import PASSES, RATIO, _forward, _seconds
from benchmarks.bench_quality import WORKLOADS, build
from benchmarks.models import NUM_THREADS

torch.set_num_threads(NUM_THREADS)
quick = sys.argv[1] == "quick"
work = {}
for name in WORKLOADS:
    w = build(name, quick)
    w.data = w.data * PASSES[name]
    work[name] = w
print(json.dumps({"ready": tl.__file__}), flush=True)
for line in sys.stdin:
    w = work[line.strip()]
    before = _seconds(lambda: _forward(w.model, w.data))
    model = tl.convert(__import__("copy").deepcopy(w.model), ratio=RATIO,
                       samples=w.settings["samples"], **w.layers)
    seconds = _seconds(lambda: tl.calibrate(model, w.data, progress=False))
    after = _seconds(lambda: _forward(w.model, w.data))
    print(json.dumps({"calibrate_s": seconds, "forward_s": (before + after) / 2}), flush=True)
"""

WORKLOADS = ("digits", "fashion_mlp", "fashion_cnn", "char_lm")


def _start(root: Path, quick: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER, "quick" if quick else "full"],
        cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    ready = json.loads(proc.stdout.readline())["ready"]
    if not ready.startswith(str(root)):
        raise RuntimeError(f"{root}: the worker imported {ready}")
    return proc


def _ask(proc: subprocess.Popen, name: str) -> dict:
    proc.stdin.write(name + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="the quick calibration sets")
    parser.add_argument("--only", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    roots = {"old": args.old.resolve(), "new": args.new.resolve()}
    procs = {key: _start(root, args.quick) for key, root in roots.items()}
    runs: dict = {name: {key: [] for key in procs} for name in args.only}
    try:
        for name in args.only:
            for key in procs:  # warm both up (a first call is slower)
                _ask(procs[key], name)
            for i in range(args.repeats):
                order = list(procs) if i % 2 == 0 else list(procs)[::-1]
                for key in order:
                    runs[name][key].append(_ask(procs[key], name))
            print(name, _summary(runs[name]), file=sys.stderr, flush=True)
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    rows = [{"workload": name, **_summary(runs[name]), "runs": runs[name]} for name in args.only]
    if args.json:
        saved = {"roots": {k: str(v) for k, v in roots.items()}, "repeats": args.repeats}
        Path(args.json).write_text(json.dumps({**saved, "rows": rows}, indent=2))
    print("| workload | forward s | old calib / fwd | new calib / fwd | new / old |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['forward_s']:.3f} | {r['old']:.2f}x | {r['new']:.2f}x | "
              f"{r['new_over_old']:.2f} |")  # fmt: skip


def _summary(runs: dict) -> dict:
    ratio = {k: statistics.median(r["calibrate_s"] / r["forward_s"] for r in v)
             for k, v in runs.items()}  # fmt: skip
    forward = statistics.median(r["forward_s"] for v in runs.values() for r in v)
    return {**ratio, "forward_s": forward, "new_over_old": ratio["new"] / ratio["old"]}


if __name__ == "__main__":
    main()
