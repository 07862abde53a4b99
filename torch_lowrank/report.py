"""The recovery report: one row per layer, printable as a table and convertible to a dict/JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

__all__ = ["LayerReport", "Report"]


@dataclass
class LayerReport:
    """What happened to one layer.

    Attributes:
        name: qualified module name (``""`` for a module recovered on its own).
        shape: the dense weight's shape, e.g. ``(out, in)``.
        rank: the rank kept (``None`` when the layer stayed dense).
        params_before / params_after: weight and bias parameters of the layer.
        relative_error: ``E||y - y_hat||^2 / E||y - E y||^2`` on the calibration data (the fraction
            of the output variance lost); ``nan`` when unknown.
        method: the recovery method, or ``"dense"`` for layers left dense.
        seconds: wall time of the solve.
        note: why a layer stayed dense, or anything else worth saying.
        activation: the activation the recovery targeted (``"-"``: none, the layer is linear).
        spectrum: the descending eigenvalues the rank was chosen from (for :meth:`Report.plot`).
    """

    name: str
    shape: tuple[int, ...]
    rank: int | None
    params_before: int
    params_after: int
    relative_error: float
    method: str
    seconds: float
    note: str = ""
    activation: str = "-"
    spectrum: list[float] | None = field(default=None, repr=False)


@dataclass
class Report:
    """The per-layer rows of a recovery, with totals.

    Example:
        >>> row = LayerReport("fc", (8, 4), 2, 36, 32, 0.01, "linear", 0.001)
        >>> report = Report([row])
        >>> report.params_after, report.to_dict()["layers"][0]["rank"]
        (32, 2)
    """

    layers: list[LayerReport] = field(default_factory=list)
    #: Run facts: ``mode`` (parallel or corrective), ``waves``, ``forward_passes``, ``seconds``
    info: dict = field(default_factory=dict)

    @property
    def params_before(self) -> int:
        return sum(row.params_before for row in self.layers)

    @property
    def params_after(self) -> int:
        return sum(row.params_after for row in self.layers)

    @property
    def seconds(self) -> float:
        return sum(row.seconds for row in self.layers)

    def __getitem__(self, name: str) -> LayerReport:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``{"layers": [...], "total": {...}}`` (``nan`` becomes ``None``)."""

        def clean(row: LayerReport) -> dict:
            d = asdict(row)
            d.pop("spectrum")
            d["shape"] = list(row.shape)
            if isinstance(d["relative_error"], float) and not math.isfinite(d["relative_error"]):
                d["relative_error"] = None
            return d

        return {
            "layers": [clean(row) for row in self.layers],
            "total": {
                "params_before": self.params_before,
                "params_after": self.params_after,
                "seconds": self.seconds,
            },
            "info": dict(self.info),
        }

    def to_json(self, **kwargs) -> str:
        """The dict of :meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), **kwargs)

    def plot(self, path: str) -> None:
        """Draw the per-layer spectra with the chosen ranks marked, and each layer's error
        against its kept parameters, to an image file (needs matplotlib:
        ``pip install torch_lowrank[plot]``).

        Example:
            >>> import os, tempfile
            >>> row = LayerReport("fc", (8, 4), 2, 36, 32, 0.1, "relu", 0.0, spectrum=[4, 2, 1, 1])
            >>> path = os.path.join(tempfile.mkdtemp(), "report.png")
            >>> Report([row]).plot(path)  # doctest: +SKIP
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ImportError(
                "Report.plot needs matplotlib: pip install 'torch_lowrank[plot]'"
            ) from err
        rows = [r for r in self.layers if r.spectrum and r.rank is not None]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for row in rows:
            total = sum(row.spectrum) or 1.0
            values = list(row.spectrum)
            normalised = [max(v / total, 1e-12) for v in values]  # floor: exact zeros
            (line,) = left.semilogy(range(1, len(values) + 1), normalised, label=row.name)
            left.plot([row.rank], [normalised[row.rank - 1]], "o", color=line.get_color())
            per_rank = row.params_after / row.params_before / row.rank  # kept fraction per rank
            upto = max(row.rank, min(len(values), int(1 / per_rank)))  # up to break-even
            tail = [sum(values[r:]) / total for r in range(1, upto + 1)]
            kept = [r * per_rank for r in range(1, upto + 1)]
            right.plot(kept, tail, color=line.get_color())
            right.plot([kept[row.rank - 1]], [tail[row.rank - 1]], "o", color=line.get_color())
        left.set(xlabel="rank", ylabel="eigenvalue / total", title="output spectra, chosen ranks")
        right.set(xlabel="fraction of parameters kept", ylabel="relative error (spectrum tail)",
                  title="error against parameters")  # fmt: skip
        if len(rows) <= 12:
            left.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def __str__(self) -> str:
        header = (
            "layer",
            "shape",
            "rank",
            "params",
            "kept",
            "rel. error",
            "act",
            "method",
            "s",
            "note",
        )
        rows = [header]
        for r in self.layers:
            kept = r.params_after / r.params_before if r.params_before else 1.0
            err = "-" if math.isnan(r.relative_error) else f"{r.relative_error:.4f}"
            rows.append(
                (
                    r.name or "<module>",
                    "x".join(map(str, r.shape)),
                    "-" if r.rank is None else str(r.rank),
                    f"{r.params_after:,}",
                    f"{kept:.2f}",
                    err,
                    r.activation,
                    r.method,
                    f"{r.seconds:.3f}",
                    r.note,
                )
            )
        total_kept = self.params_after / self.params_before if self.params_before else 1.0
        rows.append(
            (
                "total",
                "",
                "",
                f"{self.params_after:,}",
                f"{total_kept:.2f}",
                "",
                "",
                "",
                f"{self.seconds:.3f}",
                "",
            )
        )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        if self.info.get("mode") == "corrective":
            blocks = self.info.get("block_passes", 0)
            lines.append(
                f"corrective recovery: {self.info['waves']} waves, "
                f"{self.info['forward_passes']} forward passes"
                + (f" + {blocks} block passes" if blocks else "")
                + f", {self.info['seconds']:.2f} s"
            )
        if "peak_stat_bytes" in self.info:
            lines.append(f"peak statistics memory: {self.info['peak_stat_bytes'] / 2**20:.1f} MiB")
        return "\n".join(lines)
