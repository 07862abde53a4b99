"""Plumbing metrics of the installed (or importable) ``torch_lowrank``: how many library files,
classes and functions one call passes through, and how big the package and its README are.

    python benchmarks/plumbing_metrics.py [--json PATH]
    python benchmarks/plumbing_metrics.py --roots OLD_CHECKOUT NEW_CHECKOUT

The second form runs the first in one subprocess per checkout (``PYTHONPATH=<checkout>``) and
prints the figures side by side. Nothing is downloaded; the model is a small random MLP.

Measured:

* **recover**: one ``tl.recover_(model, method="linear")`` on a converted MLP (three Linears,
  ReLUs between them) that has seen three calibration batches; **recover (relu)** the same with
  the default method; **recover (corrective)** ``tl.recover_(model, data=batches)`` (default
  method, two batches); **module recover_** one calibrated ``LowRankLinear``'s own
  ``recover_("linear")``.
* **calibrate (first)** / **calibrate (steady)**: one ``tl.calibrate(model, [batch])`` on a freshly
  converted MLP (its first batch: activation detection), then one more on the same model.

For each call, a ``sys.setprofile`` hook records every Python function entered whose code lives
in a file of the package: the distinct files, classes (the qualified name's enclosing class)
and functions (comprehensions and generator expressions not counted). Each such call is
attributed to the nearest *library* frame below it on the stack (so a forward hook that
``torch.nn.Module.__call__`` runs counts as a call from the library file that ran the module),
which gives the call edges between files. An edge ``A -> B`` *climbs back up the import graph*
when ``B`` imports ``A`` (statically, anywhere in the file, ``import`` or ``from ... import``):
the callee depends on the caller, yet the caller calls it (through a hook, a lazy import or an
object handed down).

Static figures: line counts of the package's ``.py`` files (largest, number over 400 lines),
the public names of ``torch_lowrank`` (``dir()`` without ``_`` names, submodules and
``__future__`` features) and the size of ``README.md`` next to the package.
"""

from __future__ import annotations
import __future__

import argparse
import ast
import json
import os
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

COMPREHENSIONS = ("<genexpr>", "<listcomp>", "<dictcomp>", "<setcomp>")


def _package_dir() -> Path:
    import torch_lowrank

    return Path(torch_lowrank.__file__).resolve().parent


def import_graph(package: Path) -> dict[str, set[str]]:
    """``file -> files of the package it imports`` (names relative to the package's parent)."""
    files = {p.relative_to(package.parent).as_posix(): p for p in package.rglob("*.py")}
    modules = {}
    for name in files:
        dotted = name[:-3].replace("/", ".")
        modules[dotted.removesuffix(".__init__")] = name
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        here = name[:-3].replace("/", ".").split(".")[:-1]  # the package the file is in
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                stem = ".".join([*base, *(node.module.split(".") if node.module else [])])
                targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in modules and modules[target] != name:
                    found.add(modules[target])
        graph[name] = found
    return graph


class Tracer:
    """Records library functions entered, and file-to-file call edges (see module docstring)."""

    def __init__(self, package: Path) -> None:
        self.root = str(package) + os.sep
        self.base = str(package.parent) + os.sep
        self.functions: Counter[tuple[str, str]] = Counter()
        self.edges: Counter[tuple[str, str]] = Counter()

    def _lib(self, filename: str) -> str | None:
        return filename[len(self.base) :] if filename.startswith(self.root) else None

    def __call__(self, frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        here = self._lib(code.co_filename)
        if here is None or code.co_name in COMPREHENSIONS:
            return
        self.functions[(here, getattr(code, "co_qualname", code.co_name))] += 1
        back = frame.f_back
        while back is not None:
            caller = self._lib(back.f_code.co_filename)
            if caller is not None:
                if caller != here:
                    self.edges[(caller, here)] += 1
                break
            back = back.f_back

    def run(self, fn):
        sys.setprofile(self)
        try:
            return fn()
        finally:
            sys.setprofile(None)

    def summary(self, graph: dict[str, set[str]]) -> dict:
        classes = set()
        for file, qualname in self.functions:
            parts = qualname.split(".")
            if len(parts) > 1 and parts[-2] != "<locals>":
                classes.add(f"{file}:{parts[-2]}")
        climbs = {f"{a} -> {b}": n for (a, b), n in self.edges.items() if a in graph.get(b, ())}
        return {
            "files": len({f for f, _ in self.functions}),
            "classes": len(classes),
            "functions": len(self.functions),
            "calls": sum(self.functions.values()),
            "file_list": sorted({f for f, _ in self.functions}),
            "class_list": sorted(classes),
            "edges": len(self.edges),
            "edge_list": {f"{a} -> {b}": n for (a, b), n in sorted(self.edges.items())},
            "climbs": len(climbs),
            "climb_calls": sum(climbs.values()),
            "climb_list": climbs,
        }


def _mlp():
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    ).eval()
    data = [torch.randn(128, 32) for _ in range(4)]
    return model, data


def measure() -> dict:
    """The figures of the importable ``torch_lowrank`` (one process)."""
    import torch

    import torch_lowrank as tl

    package = _package_dir()
    graph = import_graph(package)
    out: dict = {"package": str(package)}

    model, data = _mlp()
    tl.convert(model, ratio=0.5)
    tl.calibrate(model, data[:3], progress=False)
    tracer = Tracer(package)
    tracer.run(lambda: tl.recover_(model, method="linear", progress=False))
    out["recover"] = tracer.summary(graph)

    for key, kwargs in (("recover_relu", {}), ("recover_corrective", {"data": None})):
        model, data = _mlp()
        tl.convert(model, ratio=0.5)
        tl.calibrate(model, data[:3], progress=False)
        if "data" in kwargs:
            kwargs = {"data": data[:2]}
        tracer = Tracer(package)
        tracer.run(lambda m=model, kw=kwargs: tl.recover_(m, progress=False, **kw))
        out[key] = tracer.summary(graph)

    torch.manual_seed(0)
    layer = tl.LowRankLinear.from_linear(torch.nn.Linear(32, 16), rank=4)
    layer(torch.randn(64, 32))
    tracer = Tracer(package)
    tracer.run(lambda: layer.recover_("linear"))
    out["recover_module"] = tracer.summary(graph)

    model, data = _mlp()
    tl.convert(model, ratio=0.5)
    for key, batch in (("calibrate_first", data[0]), ("calibrate_steady", data[1])):
        tracer = Tracer(package)
        tracer.run(lambda batch=batch: tl.calibrate(model, [batch], progress=False))
        out[key] = tracer.summary(graph)

    lines = {}
    for path in sorted(package.rglob("*.py")):
        with path.open() as f:
            lines[path.relative_to(package.parent).as_posix()] = sum(1 for _ in f)
    largest = max(lines, key=lines.get)
    out["lines"] = {
        "files": len(lines),
        "total": sum(lines.values()),
        "largest": largest,
        "largest_lines": lines[largest],
        "over_400": sorted(f for f, n in lines.items() if n > 400),
    }
    public = [
        name
        for name in dir(tl)
        if not name.startswith("_")
        and not isinstance(getattr(tl, name), (types.ModuleType, __future__._Feature))
    ]
    out["public_names"] = {"count": len(public), "names": public}
    readme = package.parent / "README.md"
    out["readme_bytes"] = readme.stat().st_size if readme.is_file() else None
    return out


ROWS = [
    ("recover_ (linear): library files entered", ("recover", "files")),
    ("recover_: classes entered", ("recover", "classes")),
    ("recover_: functions entered", ("recover", "functions")),
    ("recover_: file-to-file call edges", ("recover", "edges")),
    ("recover_: edges climbing the import graph", ("recover", "climbs")),
    ("recover_ (relu): files / climbing edges", ("recover_relu", "files", "climbs")),
    ("recover_ (corrective): files / climbing edges", ("recover_corrective", "files", "climbs")),
    ("module recover_ (linear): files / climbing edges", ("recover_module", "files", "climbs")),
    ("calibrate, first batch: files", ("calibrate_first", "files")),
    ("calibrate, first batch: classes", ("calibrate_first", "classes")),
    ("calibrate, first batch: functions", ("calibrate_first", "functions")),
    ("calibrate, first batch: edges / climbing", ("calibrate_first", "edges", "climbs")),
    ("calibrate, next batch: files", ("calibrate_steady", "files")),
    ("calibrate, next batch: classes", ("calibrate_steady", "classes")),
    ("calibrate, next batch: functions", ("calibrate_steady", "functions")),
    ("calibrate, next batch: edges / climbing", ("calibrate_steady", "edges", "climbs")),
    ("library .py files", ("lines", "files")),
    ("library lines", ("lines", "total")),
    ("largest file (lines)", None),
    ("files over 400 lines", None),
    ("public names in dir(torch_lowrank)", ("public_names", "count")),
    ("README.md bytes", ("readme_bytes",)),
]


def _cell(result: dict, label: str, keys) -> str:
    if label.startswith("largest"):
        lines = result["lines"]
        return f"{lines['largest_lines']} ({Path(lines['largest']).name})"
    if label.startswith("files over 400"):
        return str(len(result["lines"]["over_400"]))
    if len(keys) == 3:
        part = result[keys[0]]
        return f"{part[keys[1]]} / {part[keys[2]]}"
    value = result
    for key in keys:
        value = value[key]
    return str(value)


def table(results: dict[str, dict]) -> str:
    names = list(results)
    lines = [f"| metric | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
    for label, keys in ROWS:
        cells = [_cell(results[n], label, keys) for n in names]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roots", nargs="+", help="checkouts to compare, one subprocess each")
    parser.add_argument("--json", help="write the full figures here")
    args = parser.parse_args()
    if not args.roots:
        result = measure()
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        print(table({"this checkout": result}))
        return
    results = {}
    for root in args.roots:
        env = {**os.environ, "PYTHONPATH": str(Path(root).resolve())}
        code = (
            "import json, runpy; "
            f"m = runpy.run_path({str(Path(__file__).resolve())!r}, run_name='plumbing'); "
            "print(json.dumps(m['measure']()))"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )  # cwd: ``-c`` puts the working directory first on sys.path
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if Path(result["package"]) != Path(root).resolve() / "torch_lowrank":
            raise RuntimeError(f"{root}: imported {result['package']} instead")
        results[root] = result
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
