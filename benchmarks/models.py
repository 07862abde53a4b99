"""Small reference models and their trained-once presets for the benchmarks.

The models are deliberately plain (``nn.Linear``, ``nn.Conv2d``, ``nn.ReLU``, ``nn.GELU``,
``nn.LayerNorm``, no BatchNorm, no fused attention module) so that every weight matrix is an
ordinary module parameter that ``torch_lowrank`` can factorise.

* :class:`MLP`, :class:`DigitsMLP`: fully connected ReLU classifiers.
* :class:`SmallCNN`: a VGG-style convnet for 28x28 grey images (Simonyan & Zisserman,
  "Very Deep Convolutional Networks for Large-Scale Image Recognition", arXiv:1409.1556).
* :class:`CharTransformer`: a GPT-style decoder-only character language model with pre-LayerNorm
  blocks (Radford et al., "Language Models are Unsupervised Multitask Learners", 2019; layout
  after Karpathy's nanoGPT, https://github.com/karpathy/nanoGPT). Attention follows Vaswani et
  al., "Attention Is All You Need", arXiv:1706.03762, with explicit q/k/v/out ``nn.Linear``.

The ``trained_*`` helpers fix the hyperparameters used by all benchmarks, train each model
once with the loops of :mod:`benchmarks.training` and keep it in the cache of
:mod:`benchmarks.cache` (outside the repository).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.cache import cached
from benchmarks.datasets import (
    char_dataset,
    load_digits_split,
    load_fashion_mnist,
    load_text_corpus,
)
from benchmarks.training import train_char_lm, train_classifier

NUM_THREADS = 2  # the training budgets below were measured with 2 threads

DIGITS_MLP_HPARAMS: dict[str, Any] = {
    "data_seed": 0,
    "init_seed": 0,
    "hidden": [256, 256],
    "epochs": 30,
    "lr": 3e-3,
    "batch_size": 64,
    "weight_decay": 1e-2,
    "seed": 0,
}
FASHION_MLP_HPARAMS: dict[str, Any] = {
    "init_seed": 0,
    "sizes": [784, 512, 256, 10],
    "epochs": 8,
    "lr": 1e-3,
    "batch_size": 128,
    "weight_decay": 1e-2,
    "seed": 0,
}
SMALL_CNN_HPARAMS: dict[str, Any] = {
    "init_seed": 0,
    "channels": [32, 64, 128],
    "hidden": 256,
    "epochs": 1,
    "lr": 2e-3,
    "batch_size": 128,
    "weight_decay": 1e-2,
    "seed": 0,
}
CHAR_LM_HPARAMS: dict[str, Any] = {
    "max_chars": 2_000_000,
    "init_seed": 0,
    "d_model": 128,
    "n_layers": 4,
    "n_heads": 4,
    "block": 64,
    "steps": 800,
    "lr": 2e-3,
    "batch_size": 32,
    "weight_decay": 1e-1,
    "seed": 0,
}

ModelT = TypeVar("ModelT", bound=nn.Module)


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    """Fully connected classifier ``sizes[0] -> ... -> sizes[-1]`` with ReLU in between.

    Inputs of any shape ``(N, ...)`` are flattened to ``(N, sizes[0])``. The layers live in
    ``self.net`` (an ``nn.Sequential`` of ``nn.Linear`` and ``nn.ReLU``).
    """

    def __init__(self, sizes: Sequence[int] = (784, 512, 256, 10)) -> None:
        super().__init__()
        if len(sizes) < 2:
            raise ValueError("sizes needs an input and an output size")
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i > 0:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(n_in, n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class DigitsMLP(MLP):
    """:class:`MLP` for scikit-learn's 8x8 digits: ``64 -> 256 -> 256 -> 10``."""

    def __init__(self, hidden: Sequence[int] = (256, 256), n_classes: int = 10) -> None:
        super().__init__((64, *hidden, n_classes))


class SmallCNN(nn.Module):
    """Convnet for ``(N, 1, 28, 28)`` images, no padding, no BatchNorm.

    ``conv 1->c0 3x3, ReLU, conv c0->c1 3x3, ReLU, maxpool 2, conv c1->c2 3x3, ReLU,
    maxpool 2, flatten, linear -> hidden, ReLU, linear -> n_classes`` with spatial sizes
    28 -> 26 -> 24 -> 12 -> 10 -> 5. Convolutions are in ``self.features``, the
    fully connected layers in ``self.classifier``.
    """

    def __init__(
        self, channels: Sequence[int] = (32, 64, 128), hidden: int = 256, n_classes: int = 10
    ) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c0, 3),
            nn.ReLU(),
            nn.Conv2d(c0, c1, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * 5 * 5, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with explicit ``q``/``k``/``v``/``out`` projections."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        y = F.scaled_dot_product_attention(
            self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x)), is_causal=True
        )
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln1(x))`` then ``x + fc2(gelu(fc1(ln2(x))))``."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Tiny GPT-style character language model returning logits ``(B, T, vocab_size)``.

    Token plus learned position embeddings, ``n_layers`` :class:`TransformerBlock`, a final
    LayerNorm and an untied linear ``head``. Sequences may be at most ``block`` long.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        block: int = 64,
    ) -> None:
        super().__init__()
        self.block = block
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block, d_model)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.apply(_init_gpt_weights)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        n = idx.shape[1]
        if n > self.block:
            raise ValueError(f"sequence length {n} exceeds block size {self.block}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(n, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def _init_gpt_weights(module: nn.Module) -> None:
    """GPT-2 style init: N(0, 0.02) for linear and embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------- presets


def _seeded(seed: int, build: Callable[[], ModelT]) -> ModelT:
    torch.manual_seed(seed)
    return build()


def trained_digits_mlp(
    hparams: Mapping[str, Any] = DIGITS_MLP_HPARAMS,
) -> tuple[DigitsMLP, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Trained (or cached) :class:`DigitsMLP` and its ``(x_train, y_train, x_test, y_test)``."""
    h = dict(hparams)
    data = load_digits_split(seed=h["data_seed"])
    model = cached(
        "digits_mlp",
        lambda: _seeded(h["init_seed"], lambda: DigitsMLP(hidden=h["hidden"])),
        lambda m: train_classifier(
            m, data[0], data[1], h["epochs"], h["lr"], h["batch_size"], h["seed"], h["weight_decay"]
        ),
        h,
    )
    return model, data


def trained_fashion_mlp(
    hparams: Mapping[str, Any] = FASHION_MLP_HPARAMS,
) -> tuple[MLP, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Trained (or cached) Fashion-MNIST :class:`MLP` and its flat ``(x_tr, y_tr, x_te, y_te)``."""
    h = dict(hparams)
    data = load_fashion_mnist(flat=True)
    model = cached(
        "fashion_mlp",
        lambda: _seeded(h["init_seed"], lambda: MLP(sizes=h["sizes"])),
        lambda m: train_classifier(
            m, data[0], data[1], h["epochs"], h["lr"], h["batch_size"], h["seed"], h["weight_decay"]
        ),
        h,
    )
    return model, data


def trained_small_cnn(
    hparams: Mapping[str, Any] = SMALL_CNN_HPARAMS,
) -> tuple[SmallCNN, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Trained (or cached) :class:`SmallCNN` and Fashion-MNIST ``(x_tr, y_tr, x_te, y_te)``."""
    h = dict(hparams)
    data = load_fashion_mnist(flat=False)
    model = cached(
        "fashion_small_cnn",
        lambda: _seeded(
            h["init_seed"], lambda: SmallCNN(channels=h["channels"], hidden=h["hidden"])
        ),
        lambda m: train_classifier(
            m, data[0], data[1], h["epochs"], h["lr"], h["batch_size"], h["seed"], h["weight_decay"]
        ),
        h,
    )
    return model, data


def trained_char_transformer(
    hparams: Mapping[str, Any] = CHAR_LM_HPARAMS,
) -> tuple[CharTransformer, tuple[list[str], torch.Tensor, torch.Tensor]]:
    """Trained (or cached) :class:`CharTransformer` and its ``(vocab, train_ids, val_ids)``."""
    h = dict(hparams)
    vocab, train_ids, val_ids = char_dataset(load_text_corpus(h["max_chars"]), h["block"])
    model = cached(
        "char_transformer",
        lambda: _seeded(
            h["init_seed"],
            lambda: CharTransformer(
                len(vocab), h["d_model"], h["n_layers"], h["n_heads"], h["block"]
            ),
        ),
        lambda m: train_char_lm(
            m,
            train_ids,
            h["block"],
            h["steps"],
            h["lr"],
            h["batch_size"],
            h["seed"],
            h["weight_decay"],
        ),
        {**h, "vocab": "".join(vocab)},
    )
    return model, (vocab, train_ids, val_ids)
