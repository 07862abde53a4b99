"""Output-side Fisher weighting of the ``linear`` closed form: an experiment, not a feature.

Each block Linear of the character LM gets a weight ``G`` on its output side, the second moment
of the loss gradient with respect to the layer's output (per token, labels sampled from the
model's own predictive distribution, one backward pass per calibration batch). The weighted
closed form minimises ``E || G^1/2 ((Z x + c) - (W x + b)) ||^2`` over rank-``r`` ``Z``: with the
damped ``G_d = G + d I``, ``Z = G_d^-1/2 U_r U_r^T G_d^1/2 W`` where ``U_r`` holds the top ``r``
eigenvectors of ``G_d^1/2 W C W^T G_d^1/2`` (``C`` the input covariance), and ``c`` the mean
correction. ``d = alpha trace(G) / m``; ``alpha = inf`` is the unweighted ``linear`` solution.
Each layer is solved in parallel from the original network's statistics at the uniform rank.
Metric: validation loss in nats per character (dense: first row).

    python -m benchmarks.bench_fisher [--ratios 0.4 0.25] [--alphas inf 10 1 0.1] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import math

import torch
from torch import nn

from benchmarks.datasets import batches_from_ids
from benchmarks.models import NUM_THREADS, evaluate_lm_loss, trained_char_transformer
from torch_lowrank.ranks import target_rank


def moments(model: nn.Module, data: list, layers: dict[str, nn.Linear]) -> dict[str, dict]:
    """Per layer: input mean and covariance, and the output-gradient second moment ``G``."""
    found = {n: {"sx": 0.0, "sxx": 0.0, "gg": 0.0, "count": 0} for n in layers}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name):
        def run(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            found[name]["sx"] += x.sum(0)
            found[name]["sxx"] += x.T @ x
            found[name]["count"] += x.shape[0]
            output.retain_grad()
            outputs[name] = output

        return run

    handles = [layer.register_forward_hook(hook(n)) for n, layer in layers.items()]
    torch.manual_seed(0)
    try:
        for x in data:
            logits = model(x)
            labels = torch.distributions.Categorical(logits=logits.detach()).sample()
            loss = nn.functional.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), reduction="sum"
            )
            loss.backward()
            for name, out in outputs.items():
                g = out.grad.reshape(-1, out.shape[-1]).double()
                found[name]["gg"] += g.T @ g
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    for f in found.values():
        mean = f["sx"] / f["count"]
        f["mean"], f["cov"] = mean, f["sxx"] / f["count"] - torch.outer(mean, mean)
        f["G"] = f["gg"] / f["count"]
    return found


def weighted_factors(layer: nn.Linear, stats: dict, rank: int, alpha: float) -> None:
    """Replace ``layer``'s weight and bias by the rank-``rank`` weighted optimum (in place)."""
    W = layer.weight.detach().double()
    m = W.shape[0]
    if math.isinf(alpha):
        root = inv_root = torch.eye(m, dtype=torch.float64)
    else:
        G = stats["G"]
        vals, vecs = torch.linalg.eigh(G + alpha * torch.trace(G) / m * torch.eye(m, dtype=G.dtype))
        root = vecs @ torch.diag(vals.sqrt()) @ vecs.T
        inv_root = vecs @ torch.diag(vals.rsqrt()) @ vecs.T
    M = root @ W @ stats["cov"] @ W.T @ root
    _, U = torch.linalg.eigh((M + M.T) / 2)
    U = U[:, -rank:]
    Z = inv_root @ U @ U.T @ root @ W
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(m, dtype=W.dtype)
    c = b + (W - Z) @ stats["mean"]
    with torch.no_grad():
        layer.weight.copy_(Z)
        if layer.bias is not None:
            layer.bias.copy_(c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.25])
    parser.add_argument("--alphas", type=float, nargs="+", default=[math.inf, 10.0, 1.0, 0.1])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(NUM_THREADS)
    model, (_, train_ids, val_ids) = trained_char_transformer()
    data = [x for x, _ in batches_from_ids(train_ids, model.block, 32, 16, seed=7)]
    layers = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("blocks.")
    }
    stats = moments(model, data, layers)
    rows = [
        {
            "ratio": 1.0,
            "alpha": None,
            "loss": evaluate_lm_loss(model, val_ids, model.block, n_batches=20),
        }
    ]
    print(f"dense validation loss {rows[0]['loss']:.4f}", flush=True)
    print("| ratio | " + " | ".join(f"alpha {a:g}" for a in args.alphas) + " |", flush=True)
    print("|---" * (len(args.alphas) + 1) + "|", flush=True)
    for ratio in args.ratios:
        values = []
        for alpha in args.alphas:
            low = copy.deepcopy(model)
            for name, layer in low.named_modules():
                if name in layers:
                    rank = target_rank(tuple(layer.weight.shape), None, ratio, None, name, "")
                    weighted_factors(layer, stats[name], rank, alpha)
            loss = evaluate_lm_loss(low, val_ids, model.block, n_batches=20)
            rows.append({"ratio": ratio, "alpha": alpha, "loss": loss})
            values.append(f"{loss:.4f}")
        print(f"| {ratio} | " + " | ".join(values) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
