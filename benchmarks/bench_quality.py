"""Quality at the same parameter count: every method side by side, on four real workloads.

For each workload and ratio (the fraction of every converted layer's weights kept), in one
process, on the same calibration batches and at the same ranks:

* baselines (``benchmarks/baselines.py``): ``svd`` (truncated SVD of the weights), ``asvd``
  (activation-aware scaling, alpha = 0.5) and ``svd_llm`` (truncation-aware whitening), each at
  the ranks our uniform ``ratio=`` picks (read from our ``linear`` report);
* ours, each step adding one feature: ``linear`` (exact data-driven optimum, each layer from its
  own input), ``relu`` (activation-aware), ``corrective`` (relu, corrective recovery: the
  library default), ``global`` (corrective + global rank allocation given exactly the weights the
  uniform ranks kept), ``loss_aware`` (``global`` with ``allocate_by="kl"``: each layer's error
  weighed by its measured effect on the output distribution), ``refined`` (``global`` + block
  refinement, ``refine=True``: each transformer block's factors fitted to the original block's
  output on the calibration batches), ``both`` (``loss_aware`` + ``refine``) and ``finetuned``
  (``global`` + a short distillation on the calibration batches, KL on the logits; the
  baselines are not fine-tuned).

Workloads (trained once, cached outside the repository by ``benchmarks/models.py``): the
scikit-learn digits MLP, a Fashion-MNIST MLP and CNN (metric: test accuracy) and a character
transformer trained on the Python documentation (metric: validation loss in nats/char). The
10-way heads, embeddings and the LM head stay dense.

    python -m benchmarks.bench_quality [--quick] [--only digits fashion_mlp fashion_cnn char_lm]
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import torch_lowrank as tl
from benchmarks import baselines
from benchmarks.bench_allocation import weight_fraction
from benchmarks.datasets import batches_from_ids
from benchmarks.models import (
    NUM_THREADS,
    trained_char_transformer,
    trained_digits_mlp,
    trained_fashion_mlp,
    trained_small_cnn,
)
from benchmarks.training import evaluate_accuracy, evaluate_lm_loss

__all__ = ["WORKLOADS", "METHODS", "Workload", "build", "run"]

WORKLOADS = ("digits", "fashion_mlp", "fashion_cnn", "char_lm")
OURS = ("linear", "relu", "corrective", "global", "loss_aware", "refined", "both", "finetuned")
METHODS = (*baselines.BASELINES, *OURS)

# Per workload: calibration size, evaluation size, ratios, reservoir rows, fine-tuning steps.
# The MLPs are so compressible that every method ties at 0.25 and above, so they also get 0.1.
# --quick caps the projected-gradient solves of the activation-aware methods at 25 iterations
# (the library default is 200), keeps 1,024 reservoir rows per layer (default 4,096) and uses
# fewer ratios, calibration batches, test items and fine-tuning steps.
QUICK_OPTIONS = {"max_iter": 25}
#: The methods that take iterative solver options (``max_iter``, ``tol``, ...): the library
#: validates options per method, so ``linear`` and ``svd`` get none.
ITERATIVE = ("relu", "nuclear")
FULL_RATIOS = (0.8, 0.6, 0.4, 0.25)
SETTINGS = {
    "digits": {
        "quick": {"calibration": 1437, "ratios": (0.4, 0.1), "samples": 4096, "ft_steps": 20},
        "full": {"calibration": 1437, "ratios": (*FULL_RATIOS, 0.1), "samples": 4096,
                 "ft_steps": 50},
    },
    "fashion_mlp": {
        "quick": {"calibration": 1024, "ratios": (0.4, 0.1), "samples": 1024, "ft_steps": 10},
        "full": {"calibration": 2048, "ratios": (*FULL_RATIOS, 0.1), "samples": 4096,
                 "ft_steps": 50},
    },
    "fashion_cnn": {
        "quick": {"calibration": 256, "test": 1000, "ratios": (0.4,), "samples": 1024,
                  "ft_steps": 10},
        "full": {"calibration": 1024, "test": 10000, "ratios": (0.6, 0.4, 0.25), "samples": 4096,
                 "ft_steps": 50},
    },
    "char_lm": {
        "quick": {"calibration": 8, "test": 10, "ratios": (0.4,), "samples": 1024,
                  "ft_steps": 10},
        "full": {"calibration": 16, "test": 20, "ratios": (0.6, 0.4, 0.25), "samples": 4096,
                 "ft_steps": 50},
    },
}  # fmt: skip
FINETUNE_LR = 3e-4


@dataclass
class Workload:
    """A trained model, its calibration batches, its metric and which layers to compress."""

    name: str
    model: nn.Module
    data: list
    evaluate: Callable[[nn.Module], float]
    metric: str
    higher_is_better: bool
    layers: dict  # include / exclude for tl.convert
    settings: dict = field(default_factory=dict)

    def layer_names(self) -> list[str]:
        """The Linear / Conv2d layers the filters select (what ``convert`` may compress)."""
        include, exclude = self.layers.get("include"), self.layers.get("exclude")
        return [
            name
            for name, module in self.model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))
            and (include is None or fnmatch.fnmatchcase(name, include))
            and (exclude is None or not fnmatch.fnmatchcase(name, exclude))
        ]


def build(name: str, quick: bool) -> Workload:
    """The workload ``name`` with its quick or full settings (models come from the cache)."""
    s = dict(SETTINGS[name]["quick" if quick else "full"])
    s["options"] = dict(QUICK_OPTIONS) if quick else {}
    if name in ("digits", "fashion_mlp", "fashion_cnn"):
        trained = {
            "digits": trained_digits_mlp,
            "fashion_mlp": trained_fashion_mlp,
            "fashion_cnn": trained_small_cnn,
        }[name]
        model, (x_tr, _, x_te, y_te) = trained()
        x_te, y_te = x_te[: s.get("test")], y_te[: s.get("test")]
        s["test"] = len(x_te)
        return Workload(
            name, model, list(x_tr[: s["calibration"]].split(256)),
            lambda m: evaluate_accuracy(m, x_te, y_te), "test accuracy", True,
            {"exclude": "classifier.3" if name == "fashion_cnn" else "net.4"}, s,
        )  # fmt: skip
    model, (_, train_ids, val_ids) = trained_char_transformer()
    data = [x for x, _ in batches_from_ids(train_ids, model.block, 32, s["calibration"], seed=7)]
    return Workload(
        name, model, data,
        lambda m: evaluate_lm_loss(m, val_ids, model.block, n_batches=s["test"]),
        "validation loss (nats/char)", False, {"include": "blocks.*"}, s,
    )  # fmt: skip


def method_options(method: str, options: dict) -> dict:
    """``options`` for the iterative methods, none for the others (they reject them)."""
    return dict(options) if method in ITERATIVE else {}


def _ours(
    w: Workload, method: str, ratio: float, corrective: bool, allocation: str = "uniform",
    refine: bool = False, allocate_by: str = "spectra",
):  # fmt: skip
    torch.manual_seed(0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "recover_: refine: no layer")  # MLPs, the CNN
        model, report = tl.compress(
            copy.deepcopy(w.model), w.data, ratio=ratio, method=method, corrective=corrective,
            allocation=allocation, allocate_by=allocate_by, samples=w.settings["samples"],
            refine=refine,
            options=method_options(method, w.settings["options"]), progress=False, **w.layers,
        )  # fmt: skip
    return model, report, time.perf_counter() - start


def _layers(report: tl.Report) -> list[dict]:
    return [
        {"name": r.name, "rank": r.rank, "seconds": r.seconds, "relative_error": r.relative_error}
        for r in report.layers
        if r.rank is not None
    ]


def run_workload(name: str, quick: bool) -> dict:
    """Every method at every ratio of the workload's settings; rows in the order measured."""
    torch.set_num_threads(NUM_THREADS)
    w = build(name, quick)
    torch.manual_seed(0)
    rows = [{"ratio": 1.0, "method": "dense", "value": w.evaluate(w.model), "kept": 1.0}]
    start = time.perf_counter()
    moments = baselines.collect_moments(w.model, w.data, w.layer_names())
    moments_seconds = time.perf_counter() - start
    jitter: dict[str, dict] = {}
    for ratio in w.settings["ratios"]:
        found: dict[str, tuple] = {}
        model, report, seconds = _ours(w, "linear", ratio, corrective=False)
        kept = weight_fraction(report)
        ranks = {r.name: r.rank for r in report.layers if r.rank is not None}
        found["linear"] = (model, seconds, _layers(report))
        for method in baselines.BASELINES:
            low = copy.deepcopy(w.model)
            result = baselines.apply_baseline(low, method, ranks, moments)
            solve = sum(layer["seconds"] for layer in result.layers.values())
            needs_data = method != "svd"
            found[method] = (low, solve + moments_seconds * needs_data, [
                {"name": n, **facts} for n, facts in result.layers.items()
            ])  # fmt: skip
            if method == "svd_llm":
                jitter[str(ratio)] = {
                    n: f["shift"] for n, f in result.layers.items() if f["jitter_tries"]
                }
        model, report, seconds = _ours(w, "relu", ratio, corrective=False)
        found["relu"] = (model, seconds, _layers(report))
        model, report, seconds = _ours(w, "relu", ratio, corrective=True)
        found["corrective"] = (model, seconds, _layers(report))
        model, report, seconds = _ours(w, "relu", kept, corrective=True, allocation="global")
        found["global"] = (model, seconds, _layers(report))
        for key, extra in (
            ("loss_aware", {"allocate_by": "kl"}),
            ("refined", {"refine": True}),
            ("both", {"allocate_by": "kl", "refine": True}),
        ):
            step, step_report, step_seconds = _ours(
                w, "relu", kept, corrective=True, allocation="global", **extra
            )
            found[key] = (step, step_seconds, _layers(step_report))
        tuned = copy.deepcopy(model)
        torch.manual_seed(0)
        start = time.perf_counter()
        history = tl.finetune_(
            tuned, w.data, teacher=w.model, loss="kl", steps=w.settings["ft_steps"],
            lr=FINETUNE_LR, progress=False,
        )  # fmt: skip
        found["finetuned"] = (tuned, seconds + time.perf_counter() - start, _layers(report))
        for method in METHODS:
            model, seconds, layers = found[method]
            value = w.evaluate(model)
            rows.append({"ratio": ratio, "method": method, "value": value, "kept": kept,
                         "seconds": seconds, "layers": layers})  # fmt: skip
            print(f"{name} ratio={ratio} {method}: {value:.4f} ({seconds:.1f} s)", flush=True)
        rows[-1]["finetune_loss"] = [history[0], history[-1]]
    return {
        "workload": name,
        "metric": w.metric,
        "higher_is_better": w.higher_is_better,
        "layers": w.layers,
        "settings": {**w.settings, "finetune_lr": FINETUNE_LR, "finetune_loss": "kl"},
        "moments_seconds": moments_seconds,
        "svd_llm_jitter": jitter,
        "rows": rows,
    }


def run(quick: bool = False, only: tuple[str, ...] = WORKLOADS) -> dict:
    """The suite entry point: one workload per call is what ``run.py`` registers."""
    return {name: run_workload(name, quick) for name in only}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = run(args.quick, tuple(args.only))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
