"""A demo on real data in seconds: ``python -m torch_lowrank.demo``.

Trains a small MLP on scikit-learn's bundled handwritten digits (8x8 images, no download),
compresses the two hidden layers of a copy at a few ratios (the 10-way classifier head stays
dense) with the data-agnostic ``svd`` baseline, the data-driven ``linear`` recovery and the
library's default (activation-aware ``relu`` with corrective recovery), and prints the recovery
reports and the test accuracies.
Needs scikit-learn (``pip install torch_lowrank[demo]``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import TextIO

import torch
from torch import Tensor, nn

from .pipeline import compress

__all__ = ["DEFAULT_RATIOS", "VARIANTS", "load_digits", "train_mlp", "accuracy", "run", "main"]

#: The ratios the demo prints (fraction of each hidden layer's weight parameters kept).
DEFAULT_RATIOS = (0.2, 0.1, 0.05)


def load_digits(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``, pixels in [0, 1],
    a seeded 80/20 split.

    Example:
        >>> import pytest
        >>> _ = pytest.importorskip("sklearn")  # the demo's one extra dependency
        >>> x_train, y_train, x_test, y_test = load_digits()
        >>> x_train.shape, x_test.shape, bool(x_train.max() <= 1)
        (torch.Size([1437, 64]), torch.Size([360, 64]), True)
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the demo needs scikit-learn: pip install 'torch_lowrank[demo]'") from err
    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


def train_mlp(
    x: Tensor, y: Tensor, hidden: int = 256, epochs: int = 60, seed: int = 0
) -> nn.Module:
    """A ``64 -> hidden -> hidden -> 10`` ReLU MLP trained with Adam (seconds on a CPU).

    Example:
        >>> x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
        >>> model = train_mlp(x, y, hidden=16, epochs=2)
        >>> model(x).shape, model.training
        (torch.Size([32, 10]), False)
    """
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(x.shape[1], hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``.

    Example:
        >>> accuracy(nn.Identity(), torch.eye(4), torch.tensor([0, 1, 2, 0]))  # 3 of 4 right
        0.75
    """
    return (model(x).argmax(1) == y).float().mean().item()


#: The variants the demo compares: column name -> (method, corrective).
VARIANTS = {
    "svd": ("svd", False),
    "linear": ("linear", False),
    "relu+corrective": ("relu", True),
}


def run(
    ratios: tuple[float, ...] = DEFAULT_RATIOS,
    seed: int = 0,
    out: TextIO = sys.stdout,
) -> dict[float, dict[str, float]]:
    """Train, compress at each ratio with every variant of :data:`VARIANTS`, write the reports
    and accuracies to ``out``.

    ``svd`` and ``linear`` recover each layer from its own input (parallel); ``relu+corrective``
    is the library's default (``compress(model, data)``). Returns ``{ratio: {variant: acc}}``
    plus ``{1.0: {"dense": acc}}``.

    Example:
        >>> import io
        >>> results = run(ratios=(0.1,), out=io.StringIO())  # doctest: +SKIP
        >>> results[0.1]["linear"] > results[0.1]["svd"]  # doctest: +SKIP
        True
    """
    x_train, y_train, x_test, y_test = load_digits(seed)
    dense = train_mlp(x_train, y_train, seed=seed)
    results: dict[float, dict[str, float]] = {1.0: {"dense": accuracy(dense, x_test, y_test)}}
    calibration = list(x_train.split(256))
    out.write(f"dense MLP: test accuracy {results[1.0]['dense']:.4f}\n\n")
    for ratio in ratios:
        results[ratio] = {}
        for variant, (method, corrective) in VARIANTS.items():
            torch.manual_seed(seed)
            model, report = compress(
                copy.deepcopy(dense),
                calibration,
                ratio=ratio,
                method=method,
                corrective=corrective,
                exclude="4",
            )
            results[ratio][variant] = accuracy(model, x_test, y_test)
            if ratio == ratios[0] and variant != "svd":
                out.write(f"report for ratio={ratio}, {variant}:\n{report}\n\n")
    header = "ratio (hidden-layer parameters kept)"
    out.write(f"{header}  " + "  ".join(f"{v:>15}" for v in VARIANTS) + "\n")
    for ratio in ratios:
        cells = "  ".join(f"{results[ratio][v]:>15.4f}" for v in VARIANTS)
        out.write(f"{ratio:<{len(header)}}  {cells}\n")
    return results


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point of the demo.

    Example:
        >>> import contextlib, io
        >>> out = io.StringIO()
        >>> with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        ...     main(["--help"])
        >>> all(option in out.getvalue() for option in ("--ratios", "--seed", "--plot"))
        True
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--plot",
        default=None,
        help="also compress with global allocation at the first ratio and save report.plot here",
    )
    args = parser.parse_args(argv)
    run(tuple(args.ratios), seed=args.seed)
    if args.plot:
        x_train, y_train, _, _ = load_digits(args.seed)
        model = train_mlp(x_train, y_train, seed=args.seed)
        _, report = compress(
            model, list(x_train.split(256)), ratio=args.ratios[0], allocation="global",
            method="linear", corrective=False, progress=False,
        )  # fmt: skip
        report.plot(args.plot)


if __name__ == "__main__":
    main()
