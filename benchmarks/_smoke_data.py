"""Smoke test of the benchmark datasets and models; also fills the trained-model cache.

Run from the repository root with ``python -m benchmarks._smoke_data``. For each dataset it
prints the tensor sizes and load time; for each model it trains it (or loads it from the cache
in :func:`benchmarks.cache.cache_dir`), then prints the parameter count, the training time
(recorded when the entry was first trained) and the test metric: accuracy for classifiers,
validation cross-entropy in nats per character for the character model, next to the unigram
baseline. Uses ``torch.set_num_threads(2)`` (``benchmarks.models.NUM_THREADS``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks import cache, datasets, models, training


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _describe(tensors: tuple[torch.Tensor, ...]) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in tensors)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _report_model(
    label: str, name: str, model: nn.Module, hparams: dict[str, Any], seconds: float
) -> None:
    meta = cache.read_cache_meta(name, model, hparams) or {}
    trained = meta.get("train_seconds", float("nan"))
    print(
        f"{label}: {_n_params(model):,} parameters, trained in {trained:.1f} s "
        f"({meta.get('torch_threads', '?')} threads; this call {seconds:.1f} s)"
    )


def smoke_datasets() -> None:
    """Load every dataset once and print shapes, dtypes and load time."""
    digits, secs = _timed(datasets.load_digits_split)
    print(f"digits: {_describe(digits)} in {secs:.1f} s")
    fashion, secs = _timed(datasets.load_fashion_mnist)
    print(f"fashion-mnist: {_describe(fashion)} in {secs:.1f} s")
    mean, std = float(fashion[0].mean()), float(fashion[0].std())
    print(f"  train mean {mean:.3f}, std {std:.3f}; labels {fashion[1].unique().tolist()}")
    text, secs = _timed(lambda: datasets.load_text_corpus(models.CHAR_LM_HPARAMS["max_chars"]))
    vocab, train_ids, val_ids = datasets.char_dataset(text, models.CHAR_LM_HPARAMS["block"])
    print(
        f"text: {len(text):,} chars in {secs:.1f} s, vocab {len(vocab)}, "
        f"train {len(train_ids):,} / val {len(val_ids):,} ids"
    )
    print(f"  sample: {text[1000:1160]!r}")


def smoke_models() -> None:
    """Train or load every preset model and print its test metric."""
    for label, name, preset, hparams in (
        ("DigitsMLP", "digits_mlp", models.trained_digits_mlp, models.DIGITS_MLP_HPARAMS),
        ("Fashion MLP", "fashion_mlp", models.trained_fashion_mlp, models.FASHION_MLP_HPARAMS),
        ("SmallCNN", "fashion_small_cnn", models.trained_small_cnn, models.SMALL_CNN_HPARAMS),
    ):
        (model, (_, _, x_test, y_test)), secs = _timed(preset)
        _report_model(label, name, model, hparams, secs)
        print(f"  test accuracy {training.evaluate_accuracy(model, x_test, y_test):.4f}")

    (model, (vocab, train_ids, val_ids)), secs = _timed(models.trained_char_transformer)
    hparams = {**models.CHAR_LM_HPARAMS, "vocab": "".join(vocab)}
    _report_model("CharTransformer", "char_transformer", model, hparams, secs)
    block = models.CHAR_LM_HPARAMS["block"]
    val_loss = training.evaluate_lm_loss(model, val_ids, block)
    baseline = datasets.unigram_loss(train_ids, val_ids, len(vocab))
    print(f"  val loss {val_loss:.3f} nats/char (unigram baseline {baseline:.3f})")


def main() -> None:
    torch.set_num_threads(models.NUM_THREADS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"cache: {cache.cache_dir()}")
    smoke_datasets()
    smoke_models()


if __name__ == "__main__":
    main()
