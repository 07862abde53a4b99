"""What compression costs: calibration overhead, recovery time per layer, peak memory.

Every number is a median of several runs measured in one process, interleaved where two things
are compared, so that load from other jobs hits both alike; only ratios compare across machines.

* :func:`calibration`: wall time of ``tl.calibrate(model, data)`` on a freshly converted model
  (the first forward also observes which activation follows each layer) divided by a plain
  ``with torch.no_grad(): model(x)`` over the same batches; also with ``samples=0`` (covariance
  only, no reservoir) and one ``torch.profiler`` table of what a calibration pass spends on.
  Measured twice: in a child process with GNU OpenMP's default wait policy, the one a user
  gets (the headline figure), and in this process (the suite runs with
  ``OMP_WAIT_POLICY=PASSIVE`` for training, see ``benchmarks/__init__``). Under ``PASSIVE``
  every parallel operation wakes sleeping threads, which on the shared 2-core machine costs
  about 0.1-0.2 ms per operation (a ``relu`` of 256 x 512: 0.39 ms against 0.02 ms of work;
  the Fashion MLP's plain forward takes nearly twice as long), so the ratio there also counts
  how many operations a pass makes.
* :func:`recovery`: per layer, with the statistics of the real calibration data: a float64
  ``torch.linalg.eigh`` of size ``min(m, n)``, our ``linear`` solve, the SVD-LLM recipe
  (Cholesky whitening, SVD of ``W S``, triangular solve) and a truncated SVD of ``W``; plus the
  synthetic shapes of ``bench_solve``.
* :func:`memory`: peak resident memory above the starting point (sampled every millisecond by a
  thread reading ``/proc/self/statm``) while compressing, and the exact bytes the statistics hold.

    python -m benchmarks.bench_cost [--quick] [--only calibration recovery memory]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import torch_lowrank as tl
from benchmarks import baselines
from benchmarks.bench_quality import WORKLOADS, build, method_options
from benchmarks.models import NUM_THREADS
from torch_lowrank import solvers

__all__ = ["calibration", "recovery", "memory"]

RATIO = 0.4  # the rank rule used for the cost measurements
# How many times the calibration batches are repeated for the calibration overhead: a plain
# forward then takes about 0.1 s on 2 CPU cores. Fixed, because the number of rows changes the
# cost of the reservoir (it builds ``min(rows, samples)`` candidates per batch).
# Until 2026-11 the count was chosen per run from a timed forward, which gave the Fashion MLP
# 32 to 48 batches; these are the counts that rule gave most often.
PASSES = {"digits": 12, "fashion_mlp": 5, "fashion_cnn": 1, "char_lm": 1}


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _forward(model: nn.Module, data: list) -> None:
    with torch.no_grad():
        for x in data:
            model(x)


def _converted(w, **kwargs) -> nn.Module:
    kw = {"samples": w.settings["samples"], **kwargs}
    return tl.convert(copy.deepcopy(w.model), ratio=RATIO, **kw, **w.layers)


def _profile_table(w) -> list[dict]:
    model = _converted(w)
    tl.calibrate(model, w.data[:1], progress=False)  # activations observed: steady state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tl.calibrate(model, w.data, progress=False)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "op": e.key,
            "self_ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total,
        }
        for e in events[:8]
    ]


def _calibration_rows(quick: bool, profiles: bool = True, policy: str | None = None) -> list[dict]:
    """Calibration pass / plain forward, per workload (median of interleaved repeats), in this
    process.

    The data is the workload's calibration batches repeated :data:`PASSES` times, so that the
    tiny models are timed above the timer's noise (a plain forward takes about 0.1 s). Each
    repeat times a forward, a calibration, a forward, a calibration without reservoir and a
    forward; each calibration is divided by the mean of the two forwards around it, and the
    overheads are the medians of these ratios (the machine's speed drifts from second to
    second, so a ratio of neighbours is steadier than a ratio of medians). ``policy`` labels
    the rows with the OpenMP wait policy in effect (default: ``OMP_WAIT_POLICY`` now, which
    is the policy only if it was set before ``torch`` loaded).
    """
    torch.set_num_threads(NUM_THREADS)
    repeats = 3 if quick else 9
    rows = []
    for name in WORKLOADS:
        w = build(name, quick)
        w.data = w.data * PASSES[name]
        times = {"forward": [], "calibrate": [], "covariance_only": []}
        ratios = {"calibrate": [], "covariance_only": []}
        for _ in range(repeats):
            before = _seconds(lambda w=w: _forward(w.model, w.data))
            times["forward"].append(before)
            for key, samples in (("calibrate", w.settings["samples"]), ("covariance_only", 0)):
                model = _converted(w, samples=samples)
                seconds = _seconds(lambda m=model, w=w: tl.calibrate(m, w.data, progress=False))
                after = _seconds(lambda w=w: _forward(w.model, w.data))
                times[key].append(seconds)
                times["forward"].append(after)
                ratios[key].append(seconds / ((before + after) / 2))
                before = after
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            {
                "workload": name,
                "repeats": repeats,
                "passes": PASSES[name],
                "batches": len(w.data),
                "rows_per_batch": int(w.data[0].shape[0]),
                "samples": w.settings["samples"],
                "forward_s": med["forward"],
                "calibrate_s": med["calibrate"],
                "covariance_only_s": med["covariance_only"],
                "overhead": statistics.median(ratios["calibrate"]),
                "overhead_covariance_only": statistics.median(ratios["covariance_only"]),
                "overhead_runs": ratios["calibrate"],
                "omp_wait_policy": policy or os.environ.get("OMP_WAIT_POLICY", "default"),
                "profile": _profile_table(w)
                if profiles and name in ("fashion_mlp", "fashion_cnn")
                else [],
            }
        )
        policy = rows[-1]["omp_wait_policy"]
        print(f"calibration {name}: {rows[-1]['overhead']:.2f}x a plain forward ({policy})",
              file=sys.stderr, flush=True)  # fmt: skip
    return rows


#: A child process that imports ``torch`` before ``benchmarks``: GNU OpenMP then starts with its
#: default wait policy, whatever ``benchmarks/__init__`` sets afterwards.
_CHILD = """import sys, json, os, torch
policy = os.environ.get("OMP_WAIT_POLICY", "default")  # as torch loaded OpenMP
from benchmarks import bench_cost
print(json.dumps(bench_cost._calibration_rows(sys.argv[1] == "quick", policy=policy)))
"""


def _default_policy_rows(quick: bool) -> list[dict]:
    """:func:`_calibration_rows` in a child process with the default OpenMP wait policy."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-c", _CHILD, "quick" if quick else "full"]
    done = subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"calibration child process failed:\n{done.stderr[-2000:]}")
    progress = [line for line in done.stderr.splitlines(True) if line.startswith("calibration")]
    sys.stderr.write("".join(progress))  # the child's progress lines
    return json.loads(done.stdout.strip().splitlines()[-1])


def calibration(quick: bool = False) -> dict:
    """Calibration pass / plain forward per workload, with GNU OpenMP's default wait policy
    (a child process: the setting a user runs with) and in this process (the suite's
    ``OMP_WAIT_POLICY=PASSIVE``, set for training on a busy machine).

    Each row is the child's; ``passive_omp`` holds this process's figures for the same
    workload.
    """
    rows = _default_policy_rows(quick)
    here = {r["workload"]: r for r in _calibration_rows(quick, profiles=False)}
    keys = ("forward_s", "calibrate_s", "covariance_only_s", "overhead",
            "overhead_covariance_only", "overhead_runs", "omp_wait_policy")  # fmt: skip
    for row in rows:
        row["passive_omp"] = {k: here[row["workload"]][k] for k in keys}
    return {"ratio": RATIO, "repeats": rows[0]["repeats"] if rows else 0, "rows": rows}


def _layer_timings(W, mean, cov, count, rank, repeats) -> dict:
    k = min(W.shape)
    square = cov if k == W.shape[1] else W @ cov @ W.T
    gram = (cov + torch.outer(mean, mean)) * count
    runs = {
        "eigh": lambda: torch.linalg.eigh(square),
        "linear": lambda: solvers.linear(W, None, mean, cov, rank=rank),
        "svd_llm": lambda: baselines.svd_llm_factors(W, gram, rank),
        "svd": lambda: baselines.svd_factors(W, rank),
    }
    times = {key: [] for key in runs}
    for _ in range(repeats):  # interleaved
        for key, fn in runs.items():
            times[key].append(_seconds(fn))
    med = {f"{key}_s": statistics.median(v) for key, v in times.items()}
    return {**med, **{f"{key}_over_eigh": med[f"{key}_s"] / med["eigh_s"] for key in runs}}


def recovery(quick: bool = False) -> dict:
    """Per-layer solve times with real statistics, and on ``bench_solve``'s synthetic shapes."""
    torch.set_num_threads(NUM_THREADS)
    repeats = 3 if quick else 7
    rows = []
    for name in WORKLOADS:
        w = build(name, quick)
        model = _converted(w, samples=0, activation=None)
        for module in model.modules():  # SVD-LLM needs the input moments: keep them for all
            if isinstance(module, (tl.LowRankLinear, tl.LowRankConv2d)):
                module.stats_space = "input"
        tl.calibrate(model, w.data, progress=False)
        for module in model.modules():
            if not isinstance(module, (tl.LowRankLinear, tl.LowRankConv2d)):
                continue
            stats = module.stats[0]
            W = module.dense.weight.detach().reshape(module.dense.weight.shape[0], -1).double()
            timing = _layer_timings(W, stats.mean, stats.covariance, stats.count,
                                    module.target_rank, repeats)  # fmt: skip
            rows.append({"workload": name, "layer": module.layer_name, "shape": list(W.shape),
                         "rank": module.target_rank, **timing})  # fmt: skip
    shapes = [(1024, 1024), (2048, 512)] if quick else [(4096, 1024), (1024, 4096), (1024, 1024),
                                                         (2048, 2048)]  # fmt: skip
    for m, n in shapes:  # as bench_solve: random weight, 2n correlated-free rows
        gen = torch.Generator().manual_seed(0)
        W = torch.randn(m, n, generator=gen, dtype=torch.float64)
        x = torch.randn(2 * n, n, generator=gen, dtype=torch.float64)
        rank = int(0.5 * m * n / (m + n))
        timing = _layer_timings(W, x.mean(0), torch.cov(x.T, correction=0), 2 * n, rank, repeats)
        rows.append({"workload": "synthetic", "layer": f"{m}x{n}", "shape": [m, n],
                     "rank": rank, **timing})  # fmt: skip
        print(f"recovery {m}x{n}: linear/eigh {timing['linear_over_eigh']:.2f}", flush=True)
    return {"ratio": RATIO, "synthetic_ratio": 0.5, "repeats": repeats, "dtype": "float64",
            "rows": rows}  # fmt: skip


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_extra_rss(fn) -> tuple[int, float]:
    """Peak resident bytes above the level at the start while ``fn`` runs, and its seconds."""
    gc.collect()
    with contextlib.suppress(OSError):  # give freed heap back, so the start is honest
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    start, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        seconds = _seconds(fn)
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss()) - start, seconds


def memory(quick: bool = False) -> dict:
    """Peak extra resident memory of compressing each workload at ``RATIO``, per method."""
    torch.set_num_threads(NUM_THREADS)
    rows = []
    for name in WORKLOADS:
        w = build(name, quick)
        opts = w.settings["options"]

        def ours(method, corrective, w=w, opts=opts):
            torch.manual_seed(0)
            tl.compress(copy.deepcopy(w.model), w.data, ratio=RATIO, method=method,
                        corrective=corrective, samples=w.settings["samples"],
                        options=method_options(method, opts),
                        progress=False, **w.layers)  # fmt: skip

        def svd_llm(w=w):
            names = w.layer_names()
            moments = baselines.collect_moments(w.model, w.data, names)
            model = copy.deepcopy(w.model)
            ranks = {n: max(1, int(RATIO * s[0] * s[1] / (s[0] + s[1])))
                     for n, s in ((n, baselines.weight_matrix(w.model.get_submodule(n)).shape)
                                  for n in names)}  # fmt: skip
            baselines.apply_baseline(model, "svd_llm", ranks, moments)

        held = _converted(w)
        tl.calibrate(held, w.data, progress=False)
        stats_bytes = sum(
            sum(s.nbytes for s in m.stats) + sum(r.nbytes for r in m.reservoirs or [])
            for m in held.modules()
            if isinstance(m, (tl.LowRankLinear, tl.LowRankConv2d)) and m.stats
        )
        del held
        row = {
            "workload": name,
            "model_bytes": sum(p.numel() * p.element_size() for p in w.model.parameters()),
            "statistics_bytes": stats_bytes,
        }
        runs = {
            "forward": lambda w=w: _forward(w.model, w.data),
            "linear": lambda ours=ours: ours("linear", False),
            "relu_corrective": lambda ours=ours: ours("relu", True),
            "svd_llm": svd_llm,
        }
        if quick:  # the longest of them; the full run measures it
            del runs["relu_corrective"]
        for label, fn in runs.items():
            row[f"{label}_peak_bytes"], row[f"{label}_s"] = _peak_extra_rss(fn)
        rows.append(row)
        print(f"memory {name}: linear peak {row['linear_peak_bytes'] / 2**20:.1f} MiB", flush=True)
    return {"ratio": RATIO, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", default=["calibration", "recovery", "memory"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    found = {"calibration": calibration, "recovery": recovery, "memory": memory}
    results = {name: found[name](args.quick) for name in args.only}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
