"""Low rank and int8 at equal bytes: quality and CPU latency side by side.

On the character-level transformer (validation loss) and the Fashion-MNIST CNN (test accuracy)
of ``bench_quality`` (same calibration batches, same compressible layers), each variant is
measured by the bytes its compressible layers' weights take (quantized weights with their scales
and zero points; biases not counted), as a fraction of the dense float32 weights:

* **int8 alone**: the dense layers quantized (``tl.quantize_factors_(model, "int8",
  dense=names)``); torchao quantizes ``nn.Linear``, so the CNN's convs stay float32; the same
  with ``"int8-dynamic"`` (int8 activations too);
* **low rank alone**: global allocation of the same bytes as float32 weights
  (``budget="params"``, ``ratio`` = the byte fraction);
* **low rank + int8**: global allocation under the byte budget (``budget="bytes"``), which
  chooses per layer between rank and int8 (weight-only, or ``scheme="int8-dynamic"``).

The budgets are int8-alone's own byte fraction, a half and a quarter of it (which int8 alone
cannot reach).
Every model is recovered with ``linear`` correctively. Latency: one evaluation batch (32 windows
of 64 characters, 256 images), float32 activations, no grad, median over interleaved rounds of
the per-call time (each call repeated to about 20 ms), as a ratio to the dense model in the same
run.

    python -m benchmarks.bench_quant [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn

import torch_lowrank as tl
from benchmarks.bench_quality import build
from benchmarks.models import NUM_THREADS
from torch_lowrank.quantize import is_quantized

__all__ = ["run", "table"]

WORKLOADS = ("char_lm", "fashion_cnn")


def weight_fraction(model: nn.Module, names: list[str], dense_bytes: int) -> float:
    """Bytes of the weights of the layers at ``names`` (factors, scales, zero points; no
    biases) over ``dense_bytes``."""
    total = 0
    for name in names:
        for pname, p in model.get_submodule(name).named_parameters():
            if pname.endswith("weight"):
                if is_quantized(p):
                    inner, _ = p.__tensor_flatten__()
                    total += sum(getattr(p, n).nbytes for n in inner)
                else:
                    total += p.nbytes
    return total / dense_bytes


def _per_call(fn) -> float:
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < 0.02 or calls < 2:
        fn()
        calls += 1
    return elapsed / calls


@torch.no_grad()
def latencies(models: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds per call of each model on ``x``, over interleaved rounds."""
    for model in models.values():
        model(x)  # warm up
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for key, model in models.items():
            times[key].append(_per_call(lambda m=model: m(x)))
    return {k: statistics.median(v) for k, v in times.items()}


def _compress(w, ratio: float, budget: str, scheme: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    model, _ = tl.compress(
        copy.deepcopy(w.model), w.data, ratio=ratio, method="linear", allocation="global",
        budget=budget, scheme=scheme, progress=False, **w.layers,
    )  # fmt: skip
    return model.eval()


def run_workload(name: str, quick: bool) -> list[dict]:
    w = build(name, quick)
    names = w.layer_names()
    dense_bytes = sum(w.model.get_submodule(n).weight.nbytes for n in names)
    int8 = tl.quantize_factors_(copy.deepcopy(w.model).eval(), "int8", dense=names)
    budget = round(weight_fraction(int8, names, dense_bytes), 3)
    dynamic = tl.quantize_factors_(copy.deepcopy(w.model).eval(), "int8-dynamic", dense=names)
    variants = {
        ("dense", 1.0): w.model.eval(), ("int8 alone", budget): int8,
        ("int8-dynamic alone", budget): dynamic,
    }  # fmt: skip
    for b in (budget, round(budget / 2, 3), round(budget / 4, 3)):
        variants[("low rank alone", b)] = _compress(w, b, "params")
        variants[("low rank + int8", b)] = _compress(w, b, "bytes")
        variants[("low rank + int8-dynamic", b)] = _compress(w, b, "bytes", "int8-dynamic")
        print(f"quant {name}: budget {b} compressed", flush=True)
    seconds = latencies(variants, w.data[0], rounds=3 if quick else 7)
    rows = []
    for (variant, b), model in variants.items():
        rows.append({
            "workload": name, "metric": w.metric, "variant": variant, "budget": b,
            "bytes": weight_fraction(model, names, dense_bytes), "value": w.evaluate(model),
            "ms": 1e3 * seconds[(variant, b)],
            "latency_ratio": seconds[(variant, b)] / seconds[("dense", 1.0)],
            "quantized": len(tl.quantize.quantization_of(model)),
        })  # fmt: skip
        print(f"quant {name} {variant} {b}: {rows[-1]['value']:.4f}", flush=True)
    return rows


def run(quick: bool = False) -> dict:
    """The ``run.py`` entry."""
    torch.set_num_threads(NUM_THREADS)
    return {"rows": [row for name in WORKLOADS for row in run_workload(name, quick)]}


def table(rows: list[dict]) -> str:
    """The equal-bytes table (markdown)."""
    lines = [
        "Bytes: the compressible layers' weights (scales and zero points included, biases "
        "not) as a fraction of their float32 size. Latency: one batch on the CPU, median, "
        "against the dense model in the same run.",
        "",
        "| workload | budget | variant | bytes kept | quality | latency ms | vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['budget']:.3f} | {r['variant']} | {r['bytes']:.3f} | "
            f"{r['value']:.4f} | {r['ms']:.2f} | {r['latency_ratio']:.2f}x |"
        )
    metrics = dict.fromkeys(f"{r['workload']}: {r['metric']}" for r in rows)
    return "\n".join([*lines, "", "Quality: " + "; ".join(metrics) + "."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller calibration and test sets")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    result = run(args.quick)
    print(table(result["rows"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
