"""Scale: GPT-2 small and medium compressed on this machine, and a projection to 1B and 7B.

Each run builds a Hugging Face GPT-2 from ``GPT2Config`` with random weights (no download; the
cost of recovery does not depend on the weights), calibrates on ``--batches`` sequences of
``--tokens`` random token ids and compresses every block Linear (``Conv1D``) at ``ratio=0.5``,
correctively (the default flow), in a fresh subprocess with ``--threads`` threads. Reported:
the wall time, its split into passes (forwards of blocks or of the model), statistics (the
paired moments) and solves, from ``report.info``; the process's peak resident memory
(``ru_maxrss``) and its resident size before ``compress`` (the libraries and the model); the
memory parts of ``report.info``.

The projection fits one constant per phase to the measured runs, from the work each phase does
in a GPT-style stack of ``L`` blocks of width ``d`` (MLP ``4d``) on ``T`` calibration tokens:

* passes: ``L T (12 d^2 + 2 S d)`` (block weights and attention over sequences of ``S``);
* statistics: ``L T (3 d^2 + (4d)^2)`` (one ``n x n`` product set per layer of input width
  ``n``);
* solves: ``L d^3`` (the Cholesky and products of the ``4d``-wide MLP output layer dominate).

The memory is projected from its parts: the model's weights, the staged factor layers, one
wave's statistics (``3 n^2`` float64 and their float32 stages for ``n = 4d``), one solve's
working set and the block cache.

    python -m benchmarks.bench_scale [--configs small medium] [--methods linear relu]
        [--batches 16] [--tokens 512] [--threads 2] [--json PATH] [--table-only]
    python -m benchmarks.bench_scale --solve   # one MLP output layer's solve: Cholesky vs eigh
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

CONFIGS = {  # name: (layers, width, heads)
    "tiny": (2, 768, 12),
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
}
PROJECTED = {"1B": (20, 2048, 16), "7B": (32, 4096, 32)}  # GPT-style stand-ins: 12 L d^2 weights
VOCAB = 50257
PROJECTED_TOKENS = (16 * 512, 128 * 2048)  # the measured size, and a common LLM calibration set


@dataclass
class Run:
    """One measured compression."""

    config: str
    method: str
    layers: int
    width: int
    tokens: int
    threads: int
    params: int
    seconds: float
    seconds_passes: float
    seconds_statistics: float
    seconds_solves: float
    rss_before_mib: float
    rss_peak_mib: float
    info: dict
    mean_relative_error: float


def measure(config: str, method: str, batches: int, tokens: int, threads: int) -> Run:
    """Compress one GPT-2 configuration in this process."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import torch_lowrank as tl

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers, width, heads = CONFIGS[config]
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, n_positions=max(1024, tokens))
    model = GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, VOCAB, (1, tokens), generator=gen) for _ in range(batches)]
    params = sum(p.numel() for p in model.parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    _, report = tl.compress(model, data, ratio=0.5, method=method, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info = {k: v for k, v in report.info.items() if isinstance(v, (int, float, str))}
    errors = [row.relative_error for row in report.layers if row.rank is not None]
    return Run(
        config, method, layers, width, batches * tokens, threads, params, seconds,
        info.get("seconds_passes", float("nan")), info.get("seconds_statistics", float("nan")),
        info.get("seconds_solves", float("nan")), before, peak, info, sum(errors) / len(errors),
    )  # fmt: skip


def eigh_corrective(w, bias, mean_t, cov_t, mean, cov, cross, rank, damping=1e-2):
    """The float64 ``eigh`` formulation the Cholesky solve replaced (for the comparison)."""
    from torch_lowrank import solvers

    s, v = torch.linalg.eigh(cov_t)
    s = s.clamp_min(0)
    delta = damping * float(s.sum()) / s.shape[0]
    eye = torch.eye(w.shape[1], dtype=torch.float64)
    b = w @ ((cross.T + delta * eye) @ ((v / (s + delta)) @ v.T))
    fit = solvers.linear(b, w @ mean - b @ mean_t + bias, mean_t, cov_t, rank=rank)
    z = fit.up @ fit.down
    error = ((w @ cov) * w).sum() - 2 * ((w @ cross.T) * z).sum() + ((z @ cov_t) * z).sum()
    return float(error) / float(((w @ cov) * w).sum())


def solve_comparison(threads: int, repeats: int = 3) -> dict:
    """One corrective solve of a GPT-2 MLP output layer's shape (768 x 3072, rank 307, 8,192
    GELU rows), the Cholesky path against the eigh formulation, side by side: median seconds
    and the relative errors of both."""
    import statistics

    from torch_lowrank import solvers

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    m, n, rows = 768, 3072, 8192
    hidden = torch.randn(rows, m, generator=gen) @ torch.randn(m, n, generator=gen) / 28
    x = torch.nn.functional.gelu(hidden).double()
    x_tilde = x + 0.05 * torch.randn(rows, n, generator=gen, dtype=torch.float64) * x.std(0)
    mean, mean_t = x.mean(0), x_tilde.mean(0)
    xc, tc = x - mean, x_tilde - mean_t
    cov, cov_t, cross = xc.T @ xc / rows, tc.T @ tc / rows, tc.T @ xc / rows
    w = torch.randn(m, n, generator=gen, dtype=torch.float64) / n**0.5
    bias = torch.randn(m, dtype=torch.float64)
    moments = (mean_t, cov_t, mean, cov, cross)
    times: dict[str, list[float]] = {"cholesky": [], "eigh": []}
    errors = {}
    for _ in range(repeats):
        start = time.perf_counter()
        fit = solvers.corrective(w, bias, *moments, rank=307)
        times["cholesky"].append(time.perf_counter() - start)
        errors["cholesky"] = fit.relative_error
        start = time.perf_counter()
        errors["eigh"] = eigh_corrective(w, bias, *moments, rank=307)
        times["eigh"].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": medians, "ratio": medians["eigh"] / medians["cholesky"], "errors": errors}


def work(layers: int, width: int, tokens: int, sequence: int) -> dict[str, float]:
    """The work of each phase in the units of the module docstring."""
    return {
        "passes": layers * tokens * (12 * width**2 + 2 * sequence * width),
        "statistics": layers * tokens * (3 * width**2 + (4 * width) ** 2),
        "solves": layers * width**3,
    }


def memory_parts(layers: int, width: int, tokens: int, bytes_per_weight: int = 4) -> dict:
    """Projected bytes of each part of a corrective ``linear`` recovery at ``ratio=0.5``."""
    n, blocks = 4 * width, 12 * layers * width**2
    weights = (blocks + VOCAB * width) * bytes_per_weight
    return {
        "model": weights,
        "staged factors": blocks // 2 * bytes_per_weight,
        "wave statistics": 3 * n * n * 8 + 3 * n * n * 4,
        "solve": 3 * n * n * 8 + 8 * (2 * n * n + 4 * width * n + 4 * width**2),
        "block cache": 2 * tokens * width * 4,
    }


def peak_bytes(parts: dict) -> int:
    """The projected peak: the model, the staged factors and the block cache throughout, and
    the larger of a wave's accumulating statistics and its solve (frozen moments included)."""
    rest = parts["model"] + parts["staged factors"] + parts["block cache"]
    return rest + max(parts["wave statistics"], parts["solve"])


def project(runs: list[Run], sequence: int, tokens: int | None = None) -> list[dict]:
    """Seconds per phase for the projected models calibrated on ``tokens`` tokens (default:
    the measured runs'), from constants fitted to ``runs`` (least squares through the origin
    on the measured linear runs)."""
    measured = [r for r in runs if r.method == "linear"]
    if not measured:
        return []
    rates = {}
    for phase in ("passes", "statistics", "solves"):
        units = [work(r.layers, r.width, r.tokens, sequence)[phase] for r in measured]
        secs = [getattr(r, f"seconds_{phase}") * r.threads for r in measured]  # thread-seconds
        rates[phase] = sum(u * s for u, s in zip(units, secs)) / sum(u * u for u in units)
    rows = []
    tokens = tokens or measured[0].tokens
    for name, (layers, width, _) in {**PROJECTED}.items():
        units = work(layers, width, tokens, sequence)
        seconds = {phase: rates[phase] * units[phase] for phase in rates}
        parts = memory_parts(layers, width, tokens)
        rows.append({"model": name, "layers": layers, "width": width, "tokens": tokens,
                     "thread_seconds": seconds, "memory": parts})  # fmt: skip
    return rows


#: Assumed sustained rates of one GPU, for the projection only (not measured here): float32
#: matmuls for passes and statistics, float64 for the Cholesky solves and products.
GPU_FLOPS = {"passes": 40e12, "statistics": 40e12, "solves": 20e12}
#: FLOPs per unit of :func:`work`: about 3.9 block-equivalents of (partial, and partly
#: low-rank) block runs per block at 2 FLOPs a multiply-add (passes); 2.25 ``n x n`` products
#: per row (two symmetric at 5/8, the cross in full) at 2 FLOPs (statistics); about 330 d^3
#: float64 FLOPs per block, mostly the Cholesky solve and products of the 4d-wide MLP output
#: layer (solves).
FLOPS_PER_UNIT = {"passes": 2 * 3.9, "statistics": 2 * 2.25, "solves": 330}


def projection_table(rows: list[dict], threads: int, ranks: int = 8) -> str:
    """The projection as a markdown table: hours on this machine's ``threads`` threads, and
    minutes on one and on ``ranks`` GPUs at the assumed :data:`GPU_FLOPS`; memory by part
    (GiB)."""
    lines = [
        f"| model | phase | this CPU, {threads} threads (h) | 1 GPU (min) | {ranks} GPUs (min) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        units = work(row["layers"], row["width"], row["tokens"], 512)
        for phase, seconds in row["thread_seconds"].items():
            gpu = units[phase] * FLOPS_PER_UNIT[phase] / GPU_FLOPS[phase] / 60
            # data-parallel phases split over the ranks; a GPT-2-shaped wave is one layer, so
            # its solve runs on one rank while the others wait
            many = gpu if phase == "solves" else gpu / ranks
            lines.append(
                f"| {row['model']} (L={row['layers']}, d={row['width']}) | {phase} | "
                f"{seconds / threads / 3600:.2f} | {gpu:.1f} | {many:.1f} |"
            )
    names = list(rows[0]["memory"])
    lines += [
        "",
        "| model | " + " | ".join(names) + " | peak |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for row in rows:
        parts = row["memory"]
        cells = " | ".join(f"{v / 2**30:.1f}" for v in parts.values())
        lines.append(f"| {row['model']} | {cells} | {peak_bytes(parts) / 2**30:.1f} |")
    return "\n".join(lines)


def table(runs: list[Run]) -> str:
    lines = [
        "| model | method | threads | seconds | passes | statistics | solves | RSS before (MiB) "
        "| peak RSS (MiB) | mean layer error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| GPT-2 {r.config} ({r.params / 1e6:.0f}M) | {r.method} | {r.threads} | "
            f"{r.seconds:.0f} | {r.seconds_passes:.0f} | {r.seconds_statistics:.0f} | "
            f"{r.seconds_solves:.0f} | {r.rss_before_mib:.0f} | {r.rss_peak_mib:.0f} | "
            f"{r.mean_relative_error:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["small", "medium"], choices=CONFIGS)
    parser.add_argument("--methods", nargs="+", default=["linear"])
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/results/scale.json")
    parser.add_argument("--solve", action="store_true", help="only the solve comparison")
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="re-print the saved runs, refresh their projection",
    )
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = measure(*args.child, args.batches, args.tokens, args.threads)
        print(json.dumps(asdict(run)))
        return
    if args.solve:
        print(json.dumps(solve_comparison(args.threads)))
        return
    if args.table_only:
        with open(args.json) as f:
            runs = [Run(**row) for row in json.load(f)["runs"]]
    else:
        runs = []
        for config in args.configs:
            for method in args.methods:
                command = [sys.executable, "-m", "benchmarks.bench_scale", "--child", config,
                           method, "--batches", str(args.batches), "--tokens", str(args.tokens),
                           "--threads", str(args.threads)]  # fmt: skip
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                runs.append(Run(**json.loads(out.strip().splitlines()[-1])))
                print(table(runs[-1:]), flush=True)
    projections = {tokens: project(runs, args.tokens, tokens) for tokens in PROJECTED_TOKENS}
    with open(args.json, "w") as f:  # the runs, and their projection by the current model
        json.dump({"runs": [asdict(r) for r in runs], "projection": projections}, f, indent=1)
    print(table(runs))
    for tokens, rows in projections.items():
        print(f"\nprojected, {tokens} calibration tokens:")
        print(projection_table(rows, args.threads))


if __name__ == "__main__":
    main()
