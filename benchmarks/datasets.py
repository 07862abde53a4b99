"""Offline, seeded dataset loaders for the ``torch_lowrank`` benchmarks.

Nothing here downloads anything at run time; every loader reads files that are already on
disk and raises :class:`FileNotFoundError` with the install command when they are missing.

Sources:

* Digits: the 8x8 hand-written digits bundled with scikit-learn
  (:func:`sklearn.datasets.load_digits`; a copy of the test set of the UCI "Optical
  Recognition of Handwritten Digits" data, Alpaydin & Kaynak 1998). 1797 images, 64 features.
* Fashion-MNIST: Xiao, Rasul & Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
  Benchmarking Machine Learning Algorithms", arXiv:1708.07747 (2017),
  https://github.com/zalandoresearch/fashion-mnist. Read from the gzipped idx files that
  Debian's ``dataset-fashion-mnist`` package installs under ``/usr/share/datasets/fashion-mnist``.
  The idx format is described at http://yann.lecun.com/exdb/mnist/ (LeCun et al.).
* Text: the reStructuredText sources of the Python 3.11 documentation
  (https://docs.python.org/3.11/, PSF licence), installed by Debian's ``python3.11-doc`` under
  ``/usr/share/doc/python3.11/html/_sources`` as ``*.rst.txt``. Markup is stripped lightly
  (:mod:`benchmarks.rst_text`) to leave mostly plain English prose for a character-level
  language model.

All feature tensors are ``float32``; class labels and token ids are ``int64`` so they can be
fed straight to :func:`torch.nn.functional.cross_entropy`.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks.rst_text import rst_to_text

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_APT = "apt-get update && apt-get install -y dataset-fashion-mnist"
PYTHON_DOC_SOURCES_DIR = Path("/usr/share/doc/python3.11/html/_sources")
PYTHON_DOC_APT = "apt-get update && apt-get install -y python3.11-doc"
DEFAULT_MAX_CHARS = 2_000_000
VAL_FRACTION_DENOM = 10  # every 10th chunk goes to validation: a 90/10 split
TEXT_SPLIT_CHUNK = 4096  # characters per chunk for the interleaved train/val split

# idx type codes -> numpy dtypes (big-endian on disk), from the MNIST page's format notes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# --------------------------------------------------------------------------- digits


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)`` for scikit-learn's 8x8 digits.

    Pixels are scaled from ``0..16`` to ``[0, 1]`` (64 float32 features); labels are int64.
    The split is stratified by class and seeded (``test_fraction`` of the 1797 images, 20%
    by default, go to the test set).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return (
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
    )


# --------------------------------------------------------------------------- fashion-mnist


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one idx file (optionally gzipped) into a numpy array of its stored dtype."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {raw[:4]!r})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) != header + count * dtype.itemsize:
        raise ValueError(f"{path}: size does not match idx header shape {shape}")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header)
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx_file(root: Path, stem: str) -> Path:
    """Return ``root/stem`` or ``root/stem.gz``, whichever exists."""
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. "
        f"Install the Debian package with: {FASHION_MNIST_APT}"
    )


def load_fashion_mnist(
    flat: bool = False, root: str | Path = FASHION_MNIST_DIR
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)`` for Fashion-MNIST (60000/10000 images).

    Images are scaled to ``[0, 1]`` and then standardised with the scalar mean and standard
    deviation of the training pixels (about 0.286 and 0.353). Shape is ``(N, 1, 28, 28)``, or
    ``(N, 784)`` when ``flat``. Labels are int64 in ``0..9``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder {root} is missing. "
            f"Install the Debian package with: {FASHION_MNIST_APT}"
        )
    arrays = [
        read_idx(_find_idx_file(root, stem))
        for stem in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    ]
    x_tr, y_tr, x_te, y_te = arrays
    x_tr = x_tr.astype(np.float32) / 255.0
    x_te = x_te.astype(np.float32) / 255.0
    mean, std = float(x_tr.mean(dtype=np.float64)), float(x_tr.std(dtype=np.float64))
    x_tr = (x_tr - mean) / std
    x_te = (x_te - mean) / std
    shape = (-1, 28 * 28) if flat else (-1, 1, 28, 28)
    return (
        torch.from_numpy(np.ascontiguousarray(x_tr, dtype=np.float32).reshape(shape)),
        torch.from_numpy(y_tr.astype(np.int64)),
        torch.from_numpy(np.ascontiguousarray(x_te, dtype=np.float32).reshape(shape)),
        torch.from_numpy(y_te.astype(np.int64)),
    )


# --------------------------------------------------------------------------- text


def load_text_corpus(
    max_chars: int | None = DEFAULT_MAX_CHARS,
    root: str | Path = PYTHON_DOC_SOURCES_DIR,
    sections: Sequence[str] | None = None,
) -> str:
    """Return up to ``max_chars`` characters of plain English text from the Python 3.11 docs.

    Reads every ``*.rst.txt`` (or ``*.txt``/``*.rst``) file under ``root`` in sorted
    relative-path order, converts each with :func:`benchmarks.rst_text.rst_to_text` and joins
    them with blank lines, so the result is deterministic. ``sections`` optionally restricts the
    read to some top-level folders (e.g. ``("tutorial", "library")``). ``max_chars=None``
    returns all text (about 8 million characters).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Python documentation sources {root} are missing. "
            f"Install the Debian package with: {PYTHON_DOC_APT}"
        )
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.name.endswith((".txt", ".rst"))),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if sections is not None:
        wanted = set(sections)
        files = [p for p in files if p.relative_to(root).parts[0] in wanted]
    if not files:
        raise FileNotFoundError(
            f"No .rst.txt sources found under {root}. "
            f"Install the Debian package with: {PYTHON_DOC_APT}"
        )
    pieces: list[str] = []
    total = 0
    for path in files:
        text = rst_to_text(path.read_text(encoding="utf-8", errors="replace"))
        pieces.append(text)
        total += len(text) + 1
        if max_chars is not None and total >= max_chars:
            break
    corpus = "\n".join(pieces)
    return corpus if max_chars is None else corpus[:max_chars]


def char_dataset(text: str, block: int = 64) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Encode ``text`` per character and split it 90/10 into train and validation ids.

    Returns ``(vocab, train_ids, val_ids)``: ``vocab`` is the sorted list of distinct
    characters (id = index), the id tensors are 1-D int64. The split is deterministic and
    interleaved: the text is cut into chunks of ``TEXT_SPLIT_CHUNK`` characters and every
    10th chunk goes to validation, so both parts cover all documentation sections. Both parts
    are guaranteed to hold more than ``block + 1`` ids.
    """
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.int64)
    chunk = max(TEXT_SPLIT_CHUNK, block + 2)
    chunks = list(torch.split(ids, chunk))
    if len(chunks) < VAL_FRACTION_DENOM:  # short text: plain contiguous 90/10 split
        cut = (len(ids) * (VAL_FRACTION_DENOM - 1)) // VAL_FRACTION_DENOM
        train, val = ids[:cut], ids[cut:]
    else:
        is_val = [(i % VAL_FRACTION_DENOM) == VAL_FRACTION_DENOM - 1 for i in range(len(chunks))]
        train = torch.cat([c for c, v in zip(chunks, is_val) if not v])
        val = torch.cat([c for c, v in zip(chunks, is_val) if v])
    if len(train) <= block + 1 or len(val) <= block + 1:
        raise ValueError(f"text of {len(text)} characters is too short for block={block}")
    return vocab, train, val


def encode(text: str, vocab: Sequence[str]) -> torch.Tensor:
    """Map ``text`` to int64 ids with ``vocab`` (characters outside it raise ``KeyError``)."""
    index = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.int64)


def decode(ids: torch.Tensor | Sequence[int], vocab: Sequence[str]) -> str:
    """Map int ids back to a string with ``vocab``."""
    return "".join(vocab[int(i)] for i in ids)


def batches_from_ids(
    ids: torch.Tensor, block: int, batch_size: int, n_batches: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``n_batches`` random next-character batches ``(x, y)`` from a 1-D id tensor.

    ``x`` and ``y`` are int64 of shape ``(batch_size, block)`` with ``y[:, t] = ids[s + t + 1]``
    for window start ``s``. Window starts are drawn uniformly with a ``torch.Generator`` seeded
    by ``seed``, so the sequence of batches is reproducible and independent of global RNG state.
    """
    if ids.dim() != 1 or len(ids) <= block + 1:
        raise ValueError(f"need a 1-D tensor longer than block + 1 = {block + 1}")
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(block + 1)
    for _ in range(n_batches):
        starts = torch.randint(0, len(ids) - block, (batch_size,), generator=gen)
        windows = ids[starts[:, None] + offsets]
        yield windows[:, :-1], windows[:, 1:]


def unigram_loss(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats per character) of ``val_ids`` under train unigram frequencies.

    Add-one smoothing keeps it finite. This is the baseline a character LM must beat.
    """
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    log_p = torch.log(counts / counts.sum())
    return float(-log_p[val_ids].mean())
