"""Build ``benchmarks/RESULTS.md`` (tables and PNG plots) from the suite's JSON files.

Only files written by ``benchmarks/run.py`` (a dict with a ``"benchmark"`` key) are read; the
older per-script result files in the same folder are ignored. Called by ``run.py``; also
``python -m benchmarks.results_page [DIR]`` rebuilds the page without running anything. The
Cost section is rendered by :mod:`benchmarks.results_cost`.

The published page, ``benchmarks/RESULTS.md``, is built only from full runs in the default
folder ``benchmarks/results/``; any other folder, or a folder holding quick runs, gets its own
``DIR/RESULTS.md`` (see :func:`page_for`).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

from benchmarks.bench_quality import METHODS, OURS, WORKLOADS
from benchmarks.results_cost import cost_section, markdown_table

__all__ = ["DEFAULT_FOLDER", "PUBLISHED_PAGE", "load", "page_for", "write", "quality_plot"]

#: Where ``benchmarks/run.py`` writes the JSON files of a full run by default.
DEFAULT_FOLDER = Path(__file__).resolve().parent / "results"
#: The published results page, linked from the README.
PUBLISHED_PAGE = Path(__file__).resolve().parent / "RESULTS.md"

LABELS = {
    "svd": "SVD (weights only)",
    "asvd": "ASVD (alpha 0.5)",
    "svd_llm": "SVD-LLM (whitening)",
    "linear": "ours: linear",
    "relu": "ours: relu",
    "corrective": "ours: relu + corrective (default)",
    "global": "ours: + global allocation",
    "loss_aware": "ours: + loss-aware allocation",
    "refined": "ours: + block refinement",
    "both": "ours: + loss-aware allocation + block refinement",
    "finetuned": "ours: + fine-tuned (after global)",
}
#: benchmarks run only on request, rendered by their module's ``table(rows)``
EXTRAS = {
    "corrective_modes": (
        "benchmarks.bench_corrective",
        "Parallel, GPTQ-style sequential and corrective recovery",
    ),
    "block_caching": ("benchmarks.bench_block_cache", "Corrective recovery with block caching"),
    "quantized_factors": ("benchmarks.bench_quant", "Low rank and int8 at equal bytes"),
    "gpu_check": ("benchmarks.bench_gpu", "GPU check"),
}


def load(folder: Path) -> dict[str, dict]:
    """Every suite record in ``folder``, by benchmark name."""
    found = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "benchmark" in record:
            found[record["benchmark"]] = record
    return found


def _better(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


def quality_plot(records: dict[str, dict], path: Path) -> Path | None:
    """Metric against ratio, one panel per workload, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = [records[f"quality_{w}"]["results"] for w in WORKLOADS if f"quality_{w}" in records]
    if not found:
        return None
    cols = min(2, len(found))
    rows = -(-len(found) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat[len(found) :]:
        ax.set_visible(False)
    for ax, res in zip(axes.flat, found):
        dense = res["rows"][0]["value"]
        for method in METHODS:
            pts = sorted((r["ratio"], r["value"]) for r in res["rows"] if r["method"] == method)
            if pts:
                style = "--" if method not in OURS else "-"
                ax.plot(*zip(*pts), style, marker="o", ms=3, label=LABELS[method])
        ax.axhline(dense, color="grey", lw=0.8, ls=":", label="dense")
        ax.set_title(res["workload"])
        ax.set_xlabel("fraction of weights kept")
        ax.set_ylabel(res["metric"])
        ax.invert_xaxis()
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _quality(records: dict[str, dict]) -> tuple[list[str], list[str]]:
    lines, misses = [], []
    for workload in WORKLOADS:
        record = records.get(f"quality_{workload}")
        if record is None:
            continue
        res = record["results"]
        higher = res["higher_is_better"]
        ratios = [r for r in dict.fromkeys(row["ratio"] for row in res["rows"]) if r != 1.0]
        cell = {(r["method"], r["ratio"]): r for r in res["rows"]}
        s = res["settings"]
        lines += [
            f"### {workload}: {res['metric']} ({'higher' if higher else 'lower'} is better)",
            "",
            f"Dense: {res['rows'][0]['value']:.4f}. Calibration: {s['calibration']} "
            f"{'batches of 32 x 64 characters' if workload == 'char_lm' else 'images'}; "
            f"reservoir {s['samples']} rows; solver options {s['options'] or 'default'}; "
            f"fine-tuning {s['ft_steps']} steps (KL, lr {s['finetune_lr']}). "
            f"{'Quick' if record['quick'] else 'Full'} run, {record['seconds']:.0f} s.",
            "",
        ]
        rows = [["weights kept", *(f"{cell[('linear', r)]['kept']:.3f}" for r in ratios)]]
        ran = [m for m in METHODS if all((m, r) in cell for r in ratios)]  # older runs lack some
        for method in ran:
            values = []
            for r in ratios:
                v = cell[(method, r)]["value"]
                best = all(not _better(cell[(m, r)]["value"], v, higher) for m in ran)
                values.append(f"**{v:.4f}**" if best else f"{v:.4f}")
            rows.append([LABELS[method], *values])
        lines += markdown_table(["method", *(str(r) for r in ratios)], rows)
        for r in ratios:
            base = max if higher else min
            best_base = base(cell[(m, r)]["value"] for m in ("svd", "asvd", "svd_llm"))
            post = [cell[(m, r)]["value"] for m in OURS if m != "finetuned" and m in ran]
            if not _better(base(post), best_base, higher):
                misses.append(
                    f"{workload} at {r}: best post-training method of ours {base(post):.4f}, "
                    f"best baseline {best_base:.4f}"
                )
            lin, llm = cell[("linear", r)]["value"], cell[("svd_llm", r)]["value"]
            if not _better(lin, llm, higher):
                tie = "ties" if lin == llm else "beats"
                misses.append(
                    f"{workload} at {r}: SVD-LLM {tie} our per-layer `linear` ({llm:.4f} vs "
                    f"{lin:.4f})"
                )
    return lines, misses


def write(folder: Path, page: Path) -> Path:
    """Regenerate ``page`` (markdown) and its plots from the suite records in ``folder``."""
    folder, page = Path(folder), Path(page)
    records = load(folder)
    plot = quality_plot(records, folder / "quality.png")
    quality, misses = _quality(records)
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python benchmarks/run.py` from the JSON files in "
        f"`{os.path.relpath(folder, page.parent)}/`; do not edit by hand. Only ratios "
        "measured in one process compare across machines.",
        "",
    ]
    runs = sorted(records.values(), key=lambda r: r["started"])
    if runs:
        m, v = runs[-1]["machine"], runs[-1]["versions"]
        lines += [
            f"Machine: {m['cpu']}, {m['cpus_available']} CPUs available, "
            f"{m['torch_threads']} torch threads; torch {v['torch']}, torch_lowrank "
            f"{v['torch_lowrank']}, Python {v['python']}, commit "
            f"{(v['git_commit'] or '?')[:10]}{' (dirty tree)' if v['git_dirty'] else ''}.",
            "",
            *markdown_table(
                ["benchmark", "mode", "started", "seconds", "load average"],
                [
                    [
                        r["benchmark"],
                        "quick" if r["quick"] else "full",
                        r["started"],
                        f"{r['seconds']:.0f}",
                        " / ".join(f"{x:.1f}" for x in r["machine"]["load_average"] or []),
                    ]
                    for r in runs
                ],
            ),
        ]
    if quality:
        lines += [
            "## Quality at the same parameter count",
            "",
            "Every method compresses the same layers to the same ranks (the uniform "
            "ratio's; global allocation gets exactly the same number of weights) from the "
            "same calibration batches. Baselines keep the original bias. Best per column in "
            "bold.",
            "",
        ]
        if plot:
            lines += [f"![quality against ratio]({os.path.relpath(plot, page.parent)})", ""]
        lines += quality
        lines += ["### Where our recovery does not lead", ""]
        lines += [f"* {m}" for m in misses] or ["* nowhere: ours leads at every ratio"]
        lines.append("")
    for name, (module, title) in EXTRAS.items():
        if name in records:
            table = importlib.import_module(module).table
            lines += [f"## {title}", "", table(records[name]["results"]["rows"]), ""]
    cost = cost_section(records)
    if cost:
        lines += ["## Cost", "", *cost]
    page.write_text("\n".join(lines).rstrip() + "\n")
    return page


def page_for(folder: Path, quick: bool) -> Path:
    """The results page for the JSON files in ``folder``: the published ``benchmarks/RESULTS.md``
    for a full run in the default folder, else ``folder/RESULTS.md`` next to the JSON files."""
    folder = Path(folder)
    if not quick and folder.resolve() == DEFAULT_FOLDER.resolve():
        return PUBLISHED_PAGE
    return folder / "RESULTS.md"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_FOLDER
    quick = any(record["quick"] for record in load(target).values())
    print(write(target, page_for(target, quick)))
