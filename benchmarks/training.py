"""Seeded CPU training and evaluation loops for the benchmark models.

Training uses AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
arXiv:1711.05101) with a linear warm-up and a cosine learning-rate decay, seeded, on the CPU:
:func:`train_classifier` for the image classifiers, :func:`train_char_lm` for the character
language models. :func:`evaluate_accuracy` and :func:`evaluate_lm_loss` are the metrics the
benchmarks report.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.datasets import batches_from_ids

ModelT = TypeVar("ModelT", bound=nn.Module)


def _cosine_lr(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def train_classifier(
    model: ModelT,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 1e-2,
) -> ModelT:
    """Train ``model`` in place with AdamW + cosine decay on cross-entropy; return it in eval mode.

    Mini-batches are reshuffled every epoch by a ``torch.Generator`` seeded with ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(x_train)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            _set_lr(opt, _cosine_lr(step, total, lr, warmup=min(100, total // 10)))
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return model.eval()


def train_char_lm(
    model: ModelT,
    train_ids: torch.Tensor,
    block: int,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 1e-1,
) -> ModelT:
    """Train a next-character model in place with AdamW + cosine decay; return it in eval mode.

    Batches come from :func:`benchmarks.datasets.batches_from_ids` with ``seed``; weight
    decay applies to matrices only (not to biases, LayerNorm or embeddings), as in nanoGPT.
    Gradients are clipped to norm 1.
    """
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    decay_ids = {id(p) for p in decay}
    no_decay = [p for p in model.parameters() if id(p) not in decay_ids]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.99),
    )
    model.train()
    batches = batches_from_ids(train_ids, block, batch_size, steps, seed)
    for step, (x, y) in enumerate(batches):
        _set_lr(opt, _cosine_lr(step, steps, lr, warmup=min(100, steps // 10)))
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
) -> float:
    """Top-1 accuracy in ``[0, 1]`` of ``model`` on ``(x, y)``, in eval mode, no gradients."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / len(x)


@torch.no_grad()
def evaluate_lm_loss(
    model: nn.Module,
    val_ids: torch.Tensor,
    block: int,
    n_batches: int = 50,
    seed: int = 1234,
    batch_size: int = 64,
) -> float:
    """Mean next-character cross-entropy (nats/char) over ``n_batches`` seeded random windows."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches_from_ids(val_ids, block, batch_size, n_batches, seed):
        logits = model(x)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    model.train(was_training)
    return total / n_batches
