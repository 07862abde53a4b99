"""A train-once cache of the benchmark models, kept outside the repository.

:func:`cached` trains a model once and stores its ``state_dict`` under
``~/.cache/torch_lowrank_bench/`` (or ``$TORCH_LOWRANK_BENCH_CACHE``), never in the repository,
with a JSON file of metadata (hyperparameters, training time) next to it. An entry is keyed by
:func:`cache_key`: the model's name and a hash of its hyperparameters, class, parameter shapes
and the torch version.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

CACHE_ENV_VAR = "TORCH_LOWRANK_BENCH_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/torch_lowrank_bench")
CACHE_FORMAT_VERSION = 1

ModelT = TypeVar("ModelT", bound=nn.Module)


def cache_dir() -> Path:
    """Return ``$TORCH_LOWRANK_BENCH_CACHE`` if set, else ``~/.cache/torch_lowrank_bench``."""
    return Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR).expanduser()


def cache_key(name: str, model: nn.Module, hparams: Mapping[str, Any] | None = None) -> str:
    """``name-<hash>``; the hash covers ``hparams``, parameter names/shapes and torch version."""
    material = {
        "version": CACHE_FORMAT_VERSION,
        "name": name,
        "hparams": dict(hparams or {}),
        "class": type(model).__qualname__,
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
        "torch": torch.__version__.split("+")[0],
    }
    blob = json.dumps(material, sort_keys=True, default=repr).encode()
    return f"{name}-{hashlib.sha256(blob).hexdigest()[:16]}"


def cache_paths(
    name: str, model: nn.Module, hparams: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """Return ``(weights.pt, metadata.json)`` paths of a cache entry (they may not exist)."""
    key = cache_key(name, model, hparams)
    return cache_dir() / f"{key}.pt", cache_dir() / f"{key}.json"


def read_cache_meta(
    name: str, model: nn.Module, hparams: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """Metadata saved next to a cache entry (``train_seconds``, ``hparams``, ...), or ``None``."""
    meta_path = cache_paths(name, model, hparams)[1]
    if not meta_path.is_file():
        return None
    return json.loads(meta_path.read_text())


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see halves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached(
    name: str,
    build_fn: Callable[[], ModelT],
    train_fn: Callable[[ModelT], ModelT | None],
    hparams: Mapping[str, Any] | None = None,
) -> ModelT:
    """Return a trained model, training it only when no cache entry exists.

    ``build_fn()`` makes a fresh model (seed inside it for reproducible init); ``train_fn(model)``
    trains it in place. The entry is keyed by :func:`cache_key` (``name``, a hash of
    ``hparams`` and the model's parameter shapes), so pass every setting that changes the
    result in ``hparams``. Weights are loaded with ``torch.load(weights_only=True)``. The
    returned model is in eval mode.
    """
    model = build_fn()
    weights, meta = cache_paths(name, model, hparams)
    if weights.is_file():
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model.eval()
    start = time.perf_counter()
    trained = train_fn(model)
    model = trained if trained is not None else model
    seconds = time.perf_counter() - start
    _atomic_write(weights, lambda p: torch.save(model.state_dict(), p))
    info = {
        "name": name,
        "hparams": dict(hparams or {}),
        "train_seconds": seconds,
        "torch_threads": torch.get_num_threads(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _atomic_write(meta, lambda p: p.write_text(json.dumps(info, indent=2, default=repr)))
    return model.eval()
