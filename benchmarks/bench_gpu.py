"""The GPU check: calibration and recovery stay on the device, and what calibration costs there.

    python -m benchmarks.bench_gpu [--device cuda] [--quick] [--json PATH]
    python benchmarks/run.py --only gpu_check      # the same, into the results page

Two workloads, built with random weights and random data (nothing is downloaded):

* ``mlp``: four ``Linear`` layers 4096 wide with ReLUs between them, batches of 256 rows;
* ``gpt2``: a GPT-2-small-sized stack (12 pre-LayerNorm blocks of width 768, 12 heads, MLP
  3072, GELU) with token and position embeddings and a head over 256 symbols, batches of
  8 x 256 tokens.

For each: the dense model's forward and the calibrating model's forward are timed batch by
batch with ``torch.cuda.synchronize()`` around every batch (median over the steady-state
batches, after the first batches that detect activations and fill the reservoirs); the
steady-state batches run under a ``TorchFunctionMode`` that counts calls making the host wait
for the device (``nonzero``, ``item``, ``tolist``, a tensor's truth value, boolean-mask
indexing, ...). Then ``recover_`` runs with ``linear`` and with the default ``relu``, each under
a mode that records every torch call returning a tensor of at least 4,096 elements on the
host. Checked, and raised as an error when broken: every statistic, reservoir row and factor
is on the device; no large tensor is made on the host during calibration or recovery.

``--quick`` shrinks both workloads (width 64 / 32) so that the script runs on the CPU in
seconds with ``--device cpu`` (the host-tensor check is skipped there); the test suite runs it
so. ``run(quick)`` is the function ``benchmarks/run.py`` calls (``gpu_check``, only when
named; it needs CUDA).
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import torch_lowrank as tl
from benchmarks.models import CharTransformer
from torch_lowrank.model import low_rank_modules

#: Calls whose result the host has to wait for: a value, a truth value, or a size that depends
#: on the values (``nonzero`` and its relatives); ``tests/test_no_sync.py`` counts them too.
SYNCING = {
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "item", "tolist",
    "__bool__", "__int__", "__float__", "__index__", "__complex__", "is_nonzero", "equal",
    "allclose", "numpy", "repeat_interleave",
}  # fmt: skip
HOST_ELEMENTS = 4096  # a host tensor this large made during a GPU run is a silent move


class CallCounter(TorchFunctionMode):
    """Counts syncing calls (and indexing with a boolean mask, a hidden ``nonzero``) and, with
    ``device``, calls that return a large tensor elsewhere."""

    def __init__(self, device: torch.device | None = None) -> None:
        super().__init__()
        self.device = device
        self.syncs: collections.Counter = collections.Counter()
        self.host: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in SYNCING:
            self.syncs[name] += 1
        if name in ("__getitem__", "__setitem__", "index_put_", "index_put") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool
            for a in (args[1] if isinstance(args[1], tuple) else (args[1],))
        ):
            self.syncs[f"{name}[bool]"] += 1
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for t in outs:
            if (
                self.device is not None
                and isinstance(t, torch.Tensor)
                and t.device != self.device
                and t.numel() >= HOST_ELEMENTS
            ):
                self.host[name] += 1
        return out


@dataclass(frozen=True)
class Workload:
    """A model on the device, its calibration batches and one held-out batch."""

    name: str
    model: nn.Module
    batches: list
    held_out: torch.Tensor


def build(name: str, device: torch.device, quick: bool) -> Workload:
    """The ``mlp`` or ``gpt2`` workload, seeded, on ``device``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        width, rows, count = (64, 32, 12) if quick else (4096, 256, 24)
        layers: list[nn.Module] = []
        for _ in range(3):
            layers += [nn.Linear(width, width), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(width, width))
        data = [torch.randn(rows, width, generator=gen) for _ in range(count + 1)]
    elif name == "gpt2":
        d, blocks, heads, length, count = (32, 2, 2, 16, 12) if quick else (768, 12, 12, 256, 16)
        model = CharTransformer(256, d_model=d, n_layers=blocks, n_heads=heads, block=length)
        data = [torch.randint(0, 256, (8, length), generator=gen) for _ in range(count + 1)]
    else:
        raise ValueError(f"expected a workload in ('mlp', 'gpt2')\nbut got {name!r}")
    data = [x.to(device) for x in data]
    return Workload(name, model.to(device).eval(), data[:-1], data[-1])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(model: nn.Module, batch: torch.Tensor, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    model(batch)
    _synchronize(device)
    return time.perf_counter() - start


def _tensors(value, depth: int = 0):
    """Every tensor inside ``value`` (objects, dataclasses, lists, dicts), a few levels deep."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 4 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, depth + 1)
    elif depth < 4 and hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type)):
        for item in vars(value).values():
            yield from _tensors(item, depth + 1)


def off_device(model: nn.Module, device: torch.device) -> list[str]:
    """Where calibration state or parameters live elsewhere than ``device``."""
    found = []
    for module, (name, *_) in low_rank_modules(model).items():
        state = list(_tensors(module.observer.observation())) if module.calibrating else []
        state += list(module.parameters()) + list(module.buffers())
        found += [f"{name}: {t.device}" for t in state if t.device.type != device.type]
    return found


def check(workload: Workload, device: torch.device, warm: int = 4) -> dict:
    """Calibrate and recover ``workload``; the figures, or an error naming what left the
    device."""
    dense = workload.model
    with torch.no_grad():
        for batch in workload.batches[:warm]:
            dense(batch)
        plain = [_timed(dense, b, device) for b in workload.batches[warm:]]
        reference = dense(workload.held_out)
    row: dict = {"workload": workload.name, "dense_ms": 1e3 * statistics.median(plain)}
    for method in ("linear", "relu"):
        low = tl.convert(copy.deepcopy(dense), ratio=0.5)
        with torch.no_grad():
            tl.calibrate(low, workload.batches[:warm], progress=False)
            watch = CallCounter(device if device.type == "cuda" else None)
            with watch:
                times = [_timed(low, b, device) for b in workload.batches[warm:]]
        if method == "linear":
            row["calibrating_ms"] = 1e3 * statistics.median(times)
            row["overhead"] = row["calibrating_ms"] / row["dense_ms"]
            row["sync_calls"] = dict(watch.syncs)
            row["host_tensors_calibrating"] = dict(watch.host)
        moved = off_device(low, device)
        if moved:
            raise RuntimeError(f"{workload.name}: calibration state off the device: {moved[:5]}")
        solve = CallCounter(device if device.type == "cuda" else None)
        _synchronize(device)
        start = time.perf_counter()
        with solve:
            report = tl.recover_(low, method=method, progress=False)
        _synchronize(device)
        row[f"recover_{method}_s"] = time.perf_counter() - start
        row[f"host_tensors_recover_{method}"] = dict(solve.host)
        moved = off_device(low, device)
        if moved:
            raise RuntimeError(f"{workload.name}: factors off the device after {method}: {moved}")
        with torch.no_grad():
            out = low(workload.held_out)
        row[f"relative_error_{method}"] = float(
            (out - reference).square().sum() / (reference - reference.mean(0)).square().sum()
        )
        row["layers"] = len(report.layers)
    if device.type == "cuda":
        host = {k: v for k, v in row.items() if k.startswith("host_tensors") and v}
        if host or row["sync_calls"]:
            raise RuntimeError(f"{workload.name}: host work {host}, syncs {row['sync_calls']}")
    return row


def run(quick: bool, device: str = "cuda") -> dict:
    """Both workloads on ``device``; for ``benchmarks/run.py`` (``gpu_check``)."""
    where = torch.device(device)
    if where.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("gpu_check needs CUDA, and torch.cuda.is_available() is False")
    name = torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = [
        {**check(build(w, where, quick), where), "device": name, "date": stamp}
        for w in ("mlp", "gpt2")
    ]
    return {"device": name, "date": stamp, "quick": quick, "rows": rows}


def table(rows: list[dict]) -> str:
    """The results page's table of a run (``benchmarks/results_page.py``)."""
    lines = [
        f"{rows[0]['device']}, {rows[0]['date']}. Calibration overhead: the calibrating "
        "forward over the dense forward, median per batch under `torch.cuda.synchronize()`; "
        "syncs: calls that wait for the device over the steady-state batches.",
        "",
        "| workload | dense ms | calibrating ms | overhead | syncs | recover linear s "
        "| recover relu s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['dense_ms']:.2f} | {r['calibrating_ms']:.2f} | "
            f"{r['overhead']:.2f}x | {sum(r['sync_calls'].values())} | "
            f"{r['recover_linear_s']:.2f} | {r['recover_relu_s']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    found = run(args.quick, args.device)
    print(table(found["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
