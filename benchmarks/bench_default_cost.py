"""What the default method costs against ``linear`` in the same flow, and what it buys.

For each workload, ``compress`` runs the default flow (corrective recovery, uniform ranks,
``--ratio``) with the default method ``relu`` and with ``method="linear"``, interleaved, each in
a fresh subprocess per checkout (``--roots OLD NEW``: the same code path of two versions of the
library, side by side under the same load). Reported: the median wall time of ``compress`` over
``--repeats`` runs, ``relu / linear``, and the metric (validation loss of the language models,
test accuracy of the CNN).

Workloads: the character transformer and the Fashion-MNIST CNN of ``bench_quality``, and a tiny
Llama (``transformers`` ``LlamaForCausalLM``, 4 layers of width 128, trained 400 steps on the
same characters, cached like the others).

    python -m benchmarks.bench_default_cost --roots OLD_CHECKOUT . [--repeats 2] [--json PATH]

``--parallel`` runs the parallel flow (``corrective=False``) instead: there the question is how
much ``relu`` gains over ``linear``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

WORKLOADS = ("char_lm", "fashion_cnn", "tiny_llama")
LLAMA_HPARAMS = {"hidden": 128, "layers": 4, "heads": 4, "intermediate": 344, "steps": 400,
                 "lr": 2e-3, "batch_size": 32, "seed": 0, "init_seed": 0}  # fmt: skip


class LogitsOnly(nn.Module):
    """A Hugging Face causal LM called as ``model(ids) -> logits``, as the benchmark LMs are."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


def tiny_llama():
    """A trained (cached) tiny Llama on the character corpus, and how to evaluate it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.datasets import batches_from_ids
    from benchmarks.models import CHAR_LM_HPARAMS, trained_char_transformer

    try:
        from benchmarks.cache import cached
        from benchmarks.training import evaluate_lm_loss, train_char_lm
    except ImportError:  # a checkout in --roots from before the split of benchmarks/models.py
        from benchmarks.models import cached, evaluate_lm_loss, train_char_lm

    _, (vocab, train_ids, val_ids) = trained_char_transformer()
    h, block = LLAMA_HPARAMS, CHAR_LM_HPARAMS["block"]

    def build() -> nn.Module:
        torch.manual_seed(h["init_seed"])
        config = LlamaConfig(
            vocab_size=len(vocab), hidden_size=h["hidden"], num_hidden_layers=h["layers"],
            num_attention_heads=h["heads"], num_key_value_heads=h["heads"],
            intermediate_size=h["intermediate"], max_position_embeddings=block,
        )  # fmt: skip
        return LogitsOnly(LlamaForCausalLM(config))

    def train(model: nn.Module) -> nn.Module:
        return train_char_lm(
            model, train_ids, block, h["steps"], h["lr"], h["batch_size"], h["seed"]
        )

    model = cached("char_llama", build, train, {**h, "vocab": "".join(vocab)})
    data = [x for x, _ in batches_from_ids(train_ids, block, 32, 16, seed=7)]
    evaluate = lambda m: evaluate_lm_loss(m, val_ids, block, n_batches=20)  # noqa: E731
    return model, data, evaluate, {"include": "lm.model.layers.*"}


def workload(name: str):
    """``(model, data, evaluate, layers)`` of a workload."""
    if name == "tiny_llama":
        return tiny_llama()
    from benchmarks.bench_quality import build

    w = build(name, False)
    return w.model, w.data, w.evaluate, w.layers


def measure(name: str, method: str, ratio: float, corrective: bool = True) -> dict:
    """One ``compress`` of the workload in the default flow, or the parallel one when not
    ``corrective`` (run in this process)."""
    import torch_lowrank as tl
    from benchmarks.models import NUM_THREADS

    torch.set_num_threads(NUM_THREADS)
    model, data, evaluate, layers = workload(name)
    torch.manual_seed(0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low, _ = tl.compress(
            copy.deepcopy(model), data, ratio=ratio, method=method, corrective=corrective,
            progress=False, **layers,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "value": evaluate(low)}


def _run(root: str, name: str, method: str, ratio: float, corrective: bool) -> dict:
    code = (
        "import json, runpy; "
        f"m = runpy.run_path({str(Path(__file__).resolve())!r}, run_name='cost'); "
        f"print(json.dumps(m['measure']({name!r}, {method!r}, {ratio!r}, {corrective!r})))"
    )
    here = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": f"{Path(root).resolve()}{os.pathsep}{here}"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"{root} {name} {method}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roots", nargs="+", default=["."])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--parallel", action="store_true", help="the parallel flow (corrective=False) instead"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    found: dict = {}
    for _ in range(args.repeats):
        for name in args.workloads:
            for root in args.roots:
                for method in ("relu", "linear"):
                    row = _run(root, name, method, args.ratio, not args.parallel)
                    found.setdefault((root, name, method), []).append(row)
                    print(root, name, method, row, flush=True)
    rows = []
    print("| checkout | workload | relu s | linear s | relu / linear | relu | linear |")
    print("|---|---|---|---|---|---|---|")
    for root in args.roots:
        for name in args.workloads:
            relu, linear = found[(root, name, "relu")], found[(root, name, "linear")]
            r = statistics.median(x["seconds"] for x in relu)
            s = statistics.median(x["seconds"] for x in linear)
            row = {"root": root, "workload": name, "relu_seconds": r, "linear_seconds": s,
                   "relu_value": relu[0]["value"], "linear_value": linear[0]["value"]}  # fmt: skip
            rows.append(row)
            print(f"| {root} | {name} | {r:.1f} | {s:.1f} | {r / s:.2f}x | "
                  f"{row['relu_value']:.4f} | {row['linear_value']:.4f} |")  # fmt: skip
    if args.json:
        flow = "parallel" if args.parallel else "corrective"
        result = {"ratio": args.ratio, "flow": flow, "rows": rows}
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
