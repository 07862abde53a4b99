"""Corrective recovery on conv models: wall time and quality against the code before issue 21.

Workloads (trained once, under a minute each, cached outside the repository by
``benchmarks/models.py``):

* ``wide``: a 1-D CNN whose second conv sees 8,192-wide patches (``Conv1d(1, 128, 9)``, max
  pool, ``Conv1d(128, 16, 64)``, ``Conv1d(16, 32, 5)``, mean over time, a 16-way head), trained
  on a synthetic pitch task: the fundamental frequency bin (16 log-spaced bins) of 512-sample
  signals made of 6 harmonics with random amplitudes and phases in noise. Not an
  ``nn.Sequential``: every conv is its own wave through the whole model. Metric: accuracy on
  2,048 held-out signals; calibration: 128 training signals in 4 batches; ratio 0.5.
* ``graph``: a ResNet-like CNN (21 convs with BatchNorm, channels 8/16/32) trained on
  Fashion-MNIST and exported with ``torch.fx.symbolic_trace``: a flat ``GraphModule``, so no
  chain of blocks, every conv its own wave. Metric: test accuracy (10,000 images);
  calibration: 512 training images in 8 batches; ratio 0.3.
* ``cnn``: the Fashion-MNIST ``SmallCNN`` of ``benchmarks/models.py`` (an ``nn.Sequential``
  stage, so the block cache applies). Metric: test accuracy; calibration: 2,048 training
  images in 8 batches; ratio 0.4.

Every configuration runs ``tl.compress(..., method=...)`` (corrective, the default) in a fresh
subprocess, the configurations of one workload alternating, ``--repeats`` times each:

* ``before``: the library of ``--baseline`` (a checkout of the code before this change,
  e.g. ``git worktree add --detach /tmp/base <commit>``), its defaults;
* ``exact``: this checkout with ``positions=None`` (every patch position);
* ``after``: this checkout, its defaults; ``--positions 16 32 128`` adds ``positions=k`` rows.

Reported: the median wall time of the ``compress`` call, its split into passes, statistics and
solves (``report.info``), and the metric (the sampling is seeded, ``torch.manual_seed(0)``).

    python -m benchmarks.bench_conv_corrective --baseline /tmp/base [--only wide graph cnn]
        [--repeats 2] [--positions 16 32] [--methods linear relu] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- workloads


def pitch_data(count: int, seed: int, length: int = 512, classes: int = 16):
    """Synthetic pitch estimation: ``(signals (count, 1, length), labels (count,))``; the label
    is the bin of the fundamental frequency among ``classes`` log-spaced bins."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(classes, (count,), generator=g)
    edges = torch.logspace(math.log10(0.008), math.log10(0.04), classes + 1)
    low, high = edges[label], edges[label + 1]
    f0 = low + torch.rand(count, generator=g) * (high - low)  # cycles per sample
    harmonic = torch.arange(1, 7, dtype=torch.float32)
    amplitude = torch.rand(count, 6, generator=g) / harmonic
    phase = torch.rand(count, 6, generator=g) * 2 * math.pi
    t = torch.arange(length, dtype=torch.float32)
    angle = 2 * math.pi * f0[:, None, None] * harmonic[None, :, None] * t + phase[..., None]
    x = (amplitude[..., None] * torch.sin(angle)).sum(1)
    x = x + 0.5 * x.std(1, keepdim=True) * torch.randn(count, length, generator=g)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    return x[:, None], label


class WidePatchCNN(nn.Module):
    """``Conv1d(1, 128, 9)`` -> pool -> ``Conv1d(128, 16, 64)`` (8,192-wide patches) ->
    ``Conv1d(16, 32, 5)`` -> mean over time -> ``Linear(32, 16)``."""

    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Conv1d(1, 128, 9, padding=4)
        self.wide = nn.Conv1d(128, 16, 64)
        self.back = nn.Conv1d(16, 32, 5)
        self.head = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool1d(F.relu(self.front(x)), 2)
        x = F.relu(self.back(F.relu(self.wide(x))))
        return self.head(x.mean(-1))


class Residual(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (a 1x1 conv and BN where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNetLike(nn.Module):
    """A stem conv and three stages of three residual blocks (8, 16, 32 channels): 21 convs."""

    def __init__(self, channels=(8, 16, 32), n_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.ReLU())  # fmt: skip
        blocks, cin = [], channels[0]
        for i, cout in enumerate(channels):
            for j in range(3):
                blocks.append(Residual(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


WIDE_HPARAMS = {"init_seed": 0, "count": 2048, "epochs": 6, "lr": 3e-3, "batch_size": 64,
                "weight_decay": 1e-2, "seed": 0, "data_seed": 1}  # fmt: skip
GRAPH_HPARAMS = {"init_seed": 0, "count": 12000, "epochs": 2, "lr": 3e-3, "batch_size": 128,
                 "weight_decay": 1e-2, "seed": 0}  # fmt: skip


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build()


def workload(name: str):
    """``(model, calibration batches, metric, compress kwargs)`` of a workload."""
    from benchmarks.cache import cached
    from benchmarks.training import evaluate_accuracy, train_classifier

    if name == "wide":
        h = WIDE_HPARAMS
        x, y = pitch_data(h["count"] + 2048, h["data_seed"])
        x_tr, y_tr, x_te, y_te = x[: h["count"]], y[: h["count"]], x[h["count"] :], y[h["count"] :]
        model = cached(
            "wide_patch_cnn",
            lambda: _seeded(h["init_seed"], WidePatchCNN),
            lambda m: train_classifier(
                m, x_tr, y_tr, h["epochs"], h["lr"], h["batch_size"], h["seed"], h["weight_decay"]
            ),  # fmt: skip
            h,
        )
        data = list(x_tr[:128].split(32))
        return (
            model,
            data,
            lambda m: evaluate_accuracy(m, x_te, y_te),
            {"ratio": 0.5, "exclude": "head"},
        )
    from benchmarks.datasets import load_fashion_mnist

    x_tr, y_tr, x_te, y_te = load_fashion_mnist(flat=False)
    if name == "graph":
        h = GRAPH_HPARAMS
        model = cached(
            "resnet_like_fashion",
            lambda: _seeded(h["init_seed"], ResNetLike),
            lambda m: train_classifier(m, x_tr[: h["count"]], y_tr[: h["count"]], h["epochs"],
                                       h["lr"], h["batch_size"], h["seed"], h["weight_decay"]),
            h,
        )  # fmt: skip
        graph = torch.fx.symbolic_trace(model.eval())
        data = list(x_tr[:512].split(64))
        return (
            graph,
            data,
            lambda m: evaluate_accuracy(m, x_te, y_te),
            {"ratio": 0.3, "exclude": "fc"},
        )
    from benchmarks.models import trained_small_cnn

    model, _ = trained_small_cnn()
    data = list(x_tr[:2048].split(256))
    return (
        model,
        data,
        lambda m: evaluate_accuracy(m, x_te, y_te),
        {"ratio": 0.4, "exclude": "classifier.3"},
    )


# --------------------------------------------------------------------------- one run


def worker(name: str, lib: str, method: str, positions: str) -> dict:
    """One ``compress`` of workload ``name`` with the library at ``lib``, in this process."""
    sys.path.insert(0, lib)
    import torch_lowrank as tl

    if not Path(tl.__file__).resolve().is_relative_to(Path(lib).resolve()):
        raise RuntimeError(f"imported {tl.__file__}, not the library at {lib}")
    model, data, metric, kwargs = workload(name)
    if positions != "default":
        kwargs["positions"] = None if positions == "none" else int(positions)
    dense = metric(model)
    torch.manual_seed(0)
    start = time.perf_counter()
    compressed, report = tl.compress(model, data, method=method, progress=False, **kwargs)
    seconds = time.perf_counter() - start
    info = report.info
    split = {k: info.get(f"seconds_{k}", math.nan) for k in ("passes", "statistics", "solves")}
    return {"seconds": seconds, "metric": metric(compressed), **split,
            "forward_passes": info.get("forward_passes"), "dense": dense}  # fmt: skip


def run_once(name: str, lib: str, method: str, positions: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_conv_corrective", "--worker", name,
               "--lib", lib, "--method", method, "--worker-positions", positions]  # fmt: skip
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=["wide", "graph", "cnn"])
    parser.add_argument("--baseline", help="a checkout of the code before (omit: no 'before')")
    parser.add_argument("--methods", nargs="+", default=["linear"])
    parser.add_argument("--positions", nargs="*", type=int, default=[])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-exact", action="store_true", help="skip positions=None")
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--lib", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--worker-positions", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.lib, args.method, args.worker_positions)))
        return
    configs = [("before", args.baseline, "default")] if args.baseline else []
    configs += [] if args.no_exact else [("exact", str(ROOT), "none")]
    configs += [("after", str(ROOT), "default")]
    configs += [(f"positions={k}", str(ROOT), str(k)) for k in args.positions]
    rows = []
    for name in args.only:
        for method in args.methods:
            runs: dict[str, list[dict]] = {label: [] for label, _, _ in configs}
            for _ in range(args.repeats):  # alternate the configurations, side by side
                for label, lib, positions in configs:
                    runs[label].append(run_once(name, lib, method, positions))
                    last = runs[label][-1]
                    print(f"{name} {method} {label}: {last['seconds']:.1f} s, "
                          f"metric {last['metric']:.4f}", flush=True)  # fmt: skip
            for label, got in runs.items():
                row = {"workload": name, "method": method, "config": label,
                       "dense": got[0]["dense"], "repeats": len(got)}  # fmt: skip
                for key in ("seconds", "passes", "statistics", "solves", "metric"):
                    row[key] = statistics.median(r[key] for r in got)
                rows.append(row)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def table(rows: list[dict]) -> str:
    lines = ["| workload | method | config | wall s | passes s | statistics s | solves s | "
             "metric | dense |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['method']} | {r['config']} | {r['seconds']:.1f} | "
            f"{r['passes']:.1f} | {r['statistics']:.1f} | {r['solves']:.1f} | "
            f"{r['metric']:.4f} | {r['dense']:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
