"""The documentation's Python examples run as written, and its links point at files that exist.

The README's examples run as they are; so do the pages' in docs/, except those that need a
process group or an optional dependency that is missing. Every public function of the package
carries an example in its docstring (run by ``--doctest-modules``).
"""

import ast
import importlib.util
import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted(p for p in (ROOT / "docs").glob("*.md") if not p.name.startswith("_"))


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


EXAMPLES = [
    pytest.param(block, id=f"{path.relative_to(ROOT)}-{i}")
    for path in [README, *PAGES]
    for i, block in enumerate(python_blocks(path))
]


def test_readme_has_python_examples():
    assert len(python_blocks(README)) >= 3


@pytest.mark.parametrize("code", EXAMPLES)
def test_example_runs(code, single_thread, capsys):
    if "init_process_group" in code:
        pytest.skip("needs a process group")
    if "transformers" in code and importlib.util.find_spec("transformers") is None:
        pytest.skip("needs transformers")
    start = time.perf_counter()
    exec(compile(code, "<documentation example>", "exec"), {"__name__": "docs_example"})
    assert capsys.readouterr().out  # every example shows something
    assert time.perf_counter() - start < 20, "keep the documentation's examples fast"


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: p.name)
def test_links_exist(path):
    for link in re.findall(r"\]\(([^)#\s]+)", path.read_text()):
        if "://" in link:
            continue
        assert not link.startswith("/"), link
        target = (path.parent / link).resolve()
        assert target.is_relative_to(ROOT), f"{link} leaves the repository"
        assert target.exists(), link


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: p.name)
def test_no_dated_measurements(path):
    text = path.read_text()
    for pattern in (r"\b20[0-9]{2}-[01][0-9]\b", "this machine", "measured on", "shared/"):
        assert not re.search(pattern, text), f"{path.name}: {pattern}"


def test_readme_size_and_test_command():
    text = README.read_text()
    assert len(text.encode()) <= 16384
    assert "## Tests" in text and "python -m pytest" in text


def test_every_public_function_has_an_example():
    """Every module-level function of the package whose name has no leading underscore has a
    docstring with a doctest example (``>>>``)."""
    missing = []
    for path in sorted((ROOT / "torch_lowrank").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            public = isinstance(node, ast.FunctionDef) and not node.name.startswith("_")
            if public and ">>>" not in (ast.get_docstring(node) or ""):
                missing.append(f"{path.name}:{node.lineno} {node.name}")
    assert not missing, "public functions without an example:\n" + "\n".join(missing)
