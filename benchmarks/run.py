"""Run the benchmark suite: every benchmark, one JSON file each, and the results page.

    python benchmarks/run.py [--quick] [--out DIR] [--only NAME ...] [--page PATH]

Each benchmark is a function ``fn(quick: bool) -> dict`` in a ``benchmarks/bench_*.py`` module;
its result is written to ``DIR/<name>.json`` together with the machine, the library versions,
the command and the wall time, and a results page (tables, and PNG plots next to the JSON
files) is regenerated from every suite JSON file in ``DIR``, so a partial run (``--only``)
updates its own sections and keeps the others.

Where things go: a full run without ``--out`` writes ``benchmarks/results/`` and the published
page ``benchmarks/RESULTS.md``. With ``--out DIR`` the JSON files and the page go to ``DIR`` and
``DIR/RESULTS.md``. A quick run never touches the published results: without ``--out`` it writes
to ``<tempdir>/torch_lowrank_bench_quick/``. ``--page PATH`` overrides the page's path (a quick
run may not name the published page).

``--quick`` runs every method on every workload with fewer ratios, smaller calibration sets and
capped solver iterations (see ``bench_quality.SETTINGS``); it is
meant to finish in minutes once the trained models are cached (training them the first time
takes several more minutes). Models are trained once and cached outside the
repository (``benchmarks/cache.py``). Everything is seeded. ``corrective_modes`` (parallel,
GPTQ-style sequential and corrective recovery, ``bench_corrective``; about 40 minutes),
``block_caching`` (``bench_block_cache``), ``quantized_factors`` (``bench_quant``: low rank
and int8 at equal bytes; needs torchao) and ``gpu_check`` (``bench_gpu``: needs CUDA) run only
when named, e.g. ``--only corrective_modes``.
Suite files are named after the benchmarks; the older per-script files in the same folder
(``memory.json``, ``block_cache.json``, ...) are left alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the ``benchmarks`` package importable
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see benchmarks/__init__

import torch  # noqa: E402

from benchmarks import (  # noqa: E402
    bench_block_cache,
    bench_corrective,
    bench_cost,
    bench_gpu,
    bench_inference,
    bench_projected,
    bench_quality,
    bench_quant,
    results_page,
)
from benchmarks.cache import cache_dir  # noqa: E402
from benchmarks.models import NUM_THREADS  # noqa: E402

#: Where a quick run without ``--out`` writes (never the published ``benchmarks/results/``).
QUICK_OUT = Path(tempfile.gettempdir()) / "torch_lowrank_bench_quick"


def _corrective_modes(quick: bool) -> dict:
    """Parallel, GPTQ-style sequential and corrective recovery (``bench_corrective``)."""
    return {"rows": bench_corrective.run(["cnn", "lm"], (0.6, 0.4, 0.25))}


def _quantized_factors(quick: bool) -> dict:
    """Low rank, int8 and both at equal bytes (``bench_quant``; about 10 minutes)."""
    return bench_quant.run(quick)


def _block_caching(quick: bool) -> dict:
    """Corrective recovery with and without block input caching (``bench_block_cache``)."""
    return {"rows": bench_block_cache.run(["cnn", "lm"], 0.4, "linear", 3)}


#: name -> (function of quick, when it runs: "quick" = always, "full" = without --quick,
#: "extra" = only when named in --only)
BENCHMARKS = {
    **{
        f"quality_{name}": (functools.partial(bench_quality.run_workload, name), "quick")
        for name in bench_quality.WORKLOADS
    },
    "calibration": (bench_cost.calibration, "quick"),
    "recovery": (bench_cost.recovery, "quick"),
    "projected": (bench_projected.suite, "quick"),
    "peak_memory": (bench_cost.memory, "quick"),
    "inference": (bench_inference.run, "quick"),
    "corrective_modes": (_corrective_modes, "extra"),  # about 40 minutes
    "block_caching": (_block_caching, "extra"),
    "quantized_factors": (_quantized_factors, "extra"),
    "gpu_check": (bench_gpu.run, "extra"),  # needs CUDA
}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict:
    """Where the numbers were measured."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": affinity,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def versions() -> dict:
    import torch_lowrank

    git_status = _git("status", "--porcelain")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_lowrank": torch_lowrank.__version__,
        "numpy": _version("numpy"),
        "scikit-learn": _version("scikit-learn"),
        "matplotlib": _version("matplotlib"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if git_status is None else bool(git_status),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every method, smaller settings")
    out_help = "JSON files and page (default: benchmarks/results/; --quick: a temporary folder)"
    parser.add_argument("--out", help=out_help)
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME",
                        help=f"run only these: {', '.join(BENCHMARKS)}")  # fmt: skip
    page_help = "results page (default: DIR/RESULTS.md; full run into benchmarks/results/: "
    page_help += "the published benchmarks/RESULTS.md)"
    parser.add_argument("--page", help=page_help)
    args = parser.parse_args(argv)
    default_out = QUICK_OUT if args.quick else results_page.DEFAULT_FOLDER
    out = Path(args.out) if args.out is not None else default_out
    page = Path(args.page) if args.page else results_page.page_for(out, args.quick)
    if args.quick and page.resolve() == results_page.PUBLISHED_PAGE.resolve():
        parser.error(f"--quick would overwrite the published page {page}; give another --page")
    torch.set_num_threads(NUM_THREADS)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    default = ("quick",) if args.quick else ("quick", "full")
    names = args.only or [n for n, (_, when) in BENCHMARKS.items() if when in default]
    print(f"benchmarks: {', '.join(names)}; model cache {cache_dir()}", flush=True)
    suite_start = time.perf_counter()
    failed = []
    for name in names:
        fn, _ = BENCHMARKS[name]
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        machine_before = machine()
        start = time.perf_counter()
        try:
            result = fn(args.quick)
        except Exception:  # record it, run the others, fail at the end
            traceback.print_exc()
            failed.append(name)
            continue
        seconds = time.perf_counter() - start
        record = {
            "benchmark": name,
            "quick": args.quick,
            "command": command.strip(),
            "started": started,
            "seconds": seconds,
            "machine": {**machine_before, "load_average_after": machine()["load_average"]},
            "versions": versions(),
            "results": result,
        }
        path = out / f"{name}.json"
        path.write_text(json.dumps(record, indent=2, default=float) + "\n")
        print(f"== {name}: {seconds:.1f} s -> {path}", flush=True)
    page = results_page.write(out, page)
    total = time.perf_counter() - suite_start
    print(f"== suite: {total:.1f} s; results page {page}", flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
