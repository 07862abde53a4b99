"""Causal language models on text: calibration windows cut from a token sequence, and
perplexity by the sliding-window protocol of the Hugging Face perplexity guide (used by
:mod:`torch_lowrank.cli`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import progress_bar

__all__ = ["Perplexity", "calibration_batches", "perplexity"]


@dataclass(frozen=True)
class Perplexity:
    """The perplexity of a model on a token sequence, and how many tokens were scored."""

    value: float
    tokens: int


def calibration_batches(
    ids: Tensor, seq_len: int, samples: int, batch_size: int, seed: int = 0
) -> list[dict[str, Tensor]]:
    """``samples`` windows of ``seq_len`` tokens, chosen at random (seeded) among the
    non-overlapping windows of ``ids``, in batches of ``batch_size`` (all windows when there
    are fewer).

    Raises:
        ValueError: a size below 1, or fewer than ``seq_len`` tokens.

    Example:
        >>> batches = calibration_batches(torch.arange(100), seq_len=10, samples=5, batch_size=2)
        >>> [tuple(b["input_ids"].shape) for b in batches]
        [(2, 10), (2, 10), (1, 10)]
    """
    for name, value in (("seq_len", seq_len), ("samples", samples), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1\nbut got {value}")
    count = ids.numel() // seq_len
    if count == 0:
        raise ValueError(
            f"--seq-len {seq_len}: the calibration text holds only {ids.numel()} tokens"
        )
    windows = ids[: count * seq_len].reshape(count, seq_len)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:samples]
    chosen = windows[order.sort().values]
    return [{"input_ids": chunk} for chunk in chosen.split(batch_size)]


@torch.no_grad()
def perplexity(
    model: nn.Module, ids: Tensor, max_length: int, stride: int, progress: bool = False
) -> Perplexity:
    """Perplexity of a causal language model on the token sequence ``ids`` by the sliding-window
    protocol of the Hugging Face perplexity guide: windows of at most ``max_length`` tokens
    start every ``stride`` tokens; the tokens a window shares with the previous one are context
    only (their labels are ``-100``), so with ``stride < max_length`` every token after the
    first is scored exactly once (with ``stride == max_length`` the windows are independent and
    the first token of each is not scored).

    Example:
        >>> class Uniform(nn.Module):
        ...     def forward(self, input_ids):
        ...         return torch.zeros(*input_ids.shape, 10)
        >>> result = perplexity(Uniform(), torch.arange(50) % 10, max_length=16, stride=8)
        >>> round(result.value, 4), result.tokens
        (10.0, 49)
    """
    if not 1 <= stride <= max_length:
        raise ValueError(f"--stride must be in [1, max_length={max_length}]\nbut got {stride}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total, scored, previous_end = 0.0, 0, 0
    starts = range(0, ids.numel(), stride)
    for begin in progress_bar(starts, "perplexity", progress):
        end = min(begin + max_length, ids.numel())
        window = ids[begin:end].unsqueeze(0).to(device)  # (1, T)
        labels = window.clone()
        labels[:, : -(end - previous_end)] = -100  # context already scored by the last window
        output = model(window)
        logits = output if isinstance(output, Tensor) else output.logits  # (1, T, vocab)
        targets = labels[:, 1:]
        total += F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum"
        ).item()
        scored += int((targets != -100).sum())
        previous_end = end
        if end == ids.numel():
            break
    return Perplexity(math.exp(total / scored), scored)
