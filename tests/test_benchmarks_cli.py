"""Where ``benchmarks/run.py`` writes its results page, checked without running any benchmark.

A quick run or a run with ``--out DIR`` must leave the published ``benchmarks/RESULTS.md`` alone
and write ``DIR/RESULTS.md`` next to its JSON files.
"""

import json
from pathlib import Path

import pytest
import torch

from benchmarks import results_page, run

PUBLISHED = Path(run.__file__).resolve().parent / "RESULTS.md"


@pytest.fixture
def fake_suite(monkeypatch, tmp_path):
    """A suite of one instant benchmark; the published locations point into ``tmp_path``."""
    root = tmp_path / "root"
    (root / "benchmarks" / "results").mkdir(parents=True)
    monkeypatch.setattr(run, "ROOT", root)
    monkeypatch.setattr(run, "BENCHMARKS", {"fake": (lambda quick: {"rows": []}, "quick")})
    monkeypatch.setattr(results_page, "DEFAULT_FOLDER", root / "benchmarks" / "results", False)
    monkeypatch.setattr(results_page, "PUBLISHED_PAGE", root / "benchmarks" / "RESULTS.md", False)
    monkeypatch.setattr(run, "QUICK_OUT", tmp_path / "quick_default", False)
    threads = torch.get_num_threads()
    before = PUBLISHED.read_bytes() if PUBLISHED.exists() else None
    yield root
    torch.set_num_threads(threads)
    assert (PUBLISHED.read_bytes() if PUBLISHED.exists() else None) == before


@pytest.mark.parametrize("quick", [True, False])
def test_out_dir_gets_the_page(fake_suite, tmp_path, quick):
    out = tmp_path / "out"
    run.main([*(["--quick"] if quick else []), "--out", str(out)])
    assert json.loads((out / "fake.json").read_text())["quick"] is quick
    assert (out / "RESULTS.md").read_text().startswith("# Benchmark results")
    assert not (fake_suite / "benchmarks" / "RESULTS.md").exists()


def test_quick_run_without_out_keeps_away_from_published_results(fake_suite, tmp_path):
    run.main(["--quick"])
    assert (tmp_path / "quick_default" / "RESULTS.md").exists()
    assert not (fake_suite / "benchmarks" / "RESULTS.md").exists()
    assert not list((fake_suite / "benchmarks" / "results").iterdir())


def test_page_for():
    assert results_page.page_for(results_page.DEFAULT_FOLDER, quick=False) == PUBLISHED
    assert results_page.page_for(results_page.DEFAULT_FOLDER, quick=True) != PUBLISHED
    assert results_page.page_for(Path("elsewhere"), quick=False) == Path("elsewhere/RESULTS.md")
