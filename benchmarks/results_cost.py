"""The Cost section of ``benchmarks/RESULTS.md`` and the page's table format.

:func:`cost_section` renders the cost benchmarks' records (calibration overhead, recovery time
per layer, the projected gradient and the recovery time of whole models, peak memory,
inference speed) as markdown; :func:`markdown_table` is the table format of the whole page.
Used by :mod:`benchmarks.results_page`.
"""

from __future__ import annotations

import statistics

from benchmarks.bench_quality import WORKLOADS

__all__ = ["cost_section", "markdown_table"]

MiB = 2**20
CALIBRATION_HEADER = (
    "workload, batches x size, reservoir rows, forward ms, calibrate ms, overhead, "
    "overhead without reservoir (samples=0), overhead (`PASSIVE`), "
    "without reservoir (`PASSIVE`)"
)
RECOVERY_HEADER = (
    "workload, layers, eigh ms, linear ms, SVD-LLM ms, SVD ms, linear / eigh, SVD-LLM / linear"
)


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table, followed by a blank line, as the lines of the page."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def cost_section(records: dict[str, dict]) -> list[str]:
    """The lines of the page's Cost section (empty when no cost benchmark ran)."""
    lines = []
    if "calibration" in records:
        res = records["calibration"]["results"]
        lines += [
            "### Calibration overhead",
            "",
            f"`tl.calibrate` on a freshly converted model (ratio {res['ratio']}) / a plain "
            f"no-grad forward of the same batches: median over {res['repeats']} repeats of the "
            "ratio to the mean of the two forwards around each calibration. The first columns "
            "are measured in a child process with GNU OpenMP's default wait policy, the one a "
            "user gets; the last two in the suite's process (`OMP_WAIT_POLICY=PASSIVE`, set for "
            "training on a busy machine, where every parallel operation wakes sleeping "
            "threads).",
            "",
        ]
        rows = [
            [
                r["workload"],
                f"{r['batches']} x {r.get('rows_per_batch', '?')}",
                r["samples"],
                f"{1e3 * r['forward_s']:.1f}",
                f"{1e3 * r['calibrate_s']:.1f}",
                f"**{r['overhead']:.2f}x**",
                f"{r['overhead_covariance_only']:.2f}x",
                f"{r['passive_omp']['overhead']:.2f}x" if "passive_omp" in r else "",
                f"{r['passive_omp']['overhead_covariance_only']:.2f}x"
                if "passive_omp" in r
                else "",
            ]
            for r in res["rows"]
        ]
        lines += markdown_table(CALIBRATION_HEADER.split(", "), rows)
        for r in res["rows"]:
            if r["profile"]:
                top = ", ".join(f"{p['op']} {100 * p['share']:.0f}%" for p in r["profile"][:6])
                lines.append(f"* {r['workload']} calibration profile (self CPU time): {top}")
        lines.append("")
    if "recovery" in records:
        res = records["recovery"]["results"]
        lines += [
            "### Recovery time per layer",
            "",
            f"float64 solves with the real calibration statistics (ratio {res['ratio']}; "
            f"synthetic shapes at 0.5), median of {res['repeats']} interleaved runs; "
            "`eigh` is one `torch.linalg.eigh` of size min(m, n).",
            "",
        ]
        rows = []
        for w in dict.fromkeys(r["workload"] for r in res["rows"]):
            mine = [r for r in res["rows"] if r["workload"] == w]
            groups = [[r] for r in mine] if w == "synthetic" else [mine]
            for group in groups:
                label = group[0]["layer"] if w == "synthetic" else f"{len(group)} layers"
                total = {
                    k: sum(r[f"{k}_s"] for r in group) for k in ("eigh", "linear", "svd_llm", "svd")
                }
                rows.append(
                    [
                        w,
                        label,
                        *(f"{1e3 * total[k]:.1f}" for k in total),
                        f"{total['linear'] / total['eigh']:.2f}",
                        f"{total['svd_llm'] / total['linear']:.2f}",
                    ]
                )
        lines += markdown_table(RECOVERY_HEADER.split(", "), rows)
    lines += _projected(records)
    if "peak_memory" in records:
        res = records["peak_memory"]["results"]
        lines += [
            "### Peak memory",
            "",
            "Resident memory above the starting level while compressing at ratio "
            f"{res['ratio']} (sampled every ms; MiB), and the statistics our layers hold "
            "after calibration (covariance + reservoir).",
            "",
        ]
        keys = [
            k
            for k in ("forward", "linear", "relu_corrective", "svd_llm")
            if f"{k}_peak_bytes" in res["rows"][0]
        ]
        rows = [
            [
                r["workload"],
                f"{r['model_bytes'] / MiB:.1f}",
                f"{r['statistics_bytes'] / MiB:.1f}",
                *(f"{r[f'{k}_peak_bytes'] / MiB:.1f}" for k in keys),
            ]
            for r in res["rows"]
        ]
        lines += markdown_table(["workload", "model", "statistics", *keys], rows)
    if "inference" in records:
        res = records["inference"]["results"]
        lines += [
            "### Inference speed",
            "",
            f"Dense / low-rank wall time, float32, {res['threads']} threads, median of "
            f"{res['repeats']} interleaved rounds.",
            "",
        ]
        rows = [
            [
                r["workload"],
                r["ratio"],
                "x".join(map(str, r["batch"])),
                f"{r['dense_ms']:.2f}",
                f"{r['lowrank_ms']:.2f}",
                f"{r['speedup']:.2f}x",
            ]
            for r in res["workloads"]
        ]
        lines += markdown_table(
            ["model", "ratio", "batch", "dense ms", "low-rank ms", "speedup"], rows
        )
        rows = [
            [r["shape"], r["batch"], r["rank"], f"{r['speedup']:.2f}x", f"{r['flop_ratio']:.2f}x"]
            for r in res["linear"] + res["conv"]
        ]
        lines += markdown_table(["layer", "batch", "rank", "speedup", "FLOP ratio"], rows)
    return lines


def _projected(records: dict[str, dict]) -> list[str]:
    lines = []
    if "projected" in records:
        res = records["projected"]["results"]
        m, n = res["shape"]
        lines += [
            "### Projected gradient",
            "",
            f"One `relu` iteration on a {m} x {n} layer, {res['rows']} rows, rank "
            f"{res['rank']}, float64, median of {res['repeats']}:",
            "",
        ]
        rows = [
            [
                p["projection"],
                f"{p['iterations_per_s']:.2f}",
                f"{1e3 * p['seconds_per_iteration']:.1f}",
                f"{p['speedup']:.2f}x",
            ]
            for p in res["projections"]
        ]
        lines += markdown_table(
            ["projection", "iterations / s", "ms / iteration", "speed-up"], rows
        )
    rows = []
    for w in WORKLOADS:
        rec = records.get(f"quality_{w}")
        if rec is None:
            continue
        res = rec["results"]
        ratios = [r for r in dict.fromkeys(row["ratio"] for row in res["rows"]) if r != 1.0]
        cell = {(r["method"], r["ratio"]): r for r in res["rows"]}
        relu = [sum(la["seconds"] for la in cell[("relu", r)]["layers"]) for r in ratios]
        lin = [sum(la["seconds"] for la in cell[("linear", r)]["layers"]) for r in ratios]
        rows.append(
            [
                w,
                f"{statistics.median(lin):.2f}",
                f"{statistics.median(relu):.2f}",
                f"{statistics.median(relu) / max(statistics.median(lin), 1e-9):.0f}x",
                res["settings"]["options"] or "default",
            ]
        )
    if rows:
        lines += [
            "Recovery time of all layers of a model (median over ratios, from the quality "
            "runs; `relu` = projected gradient from the `linear` start):",
            "",
        ]
        lines += markdown_table(
            ["workload", "linear s", "relu s", "relu / linear", "solver options"], rows
        )
    return lines
