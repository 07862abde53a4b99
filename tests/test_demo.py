"""The README's demo: real data (scikit-learn's digits), data-driven recovery beats SVD."""

import io

import pytest

pytest.importorskip("sklearn")

from torch_lowrank import demo  # noqa: E402


def test_demo_linear_beats_svd_at_every_printed_ratio():
    out = io.StringIO()
    results = demo.run(ratios=demo.DEFAULT_RATIOS, out=out)
    assert results[1.0]["dense"] > 0.95
    for ratio in demo.DEFAULT_RATIOS:
        row = results[ratio]
        assert row["linear"] > row["svd"], (ratio, row)
        assert row["relu+corrective"] > row["svd"], (ratio, row)
    text = out.getvalue()
    assert "report for ratio=" in text and "corrective recovery:" in text
    assert text.splitlines()[-4].split() == [
        "ratio",
        "(hidden-layer",
        "parameters",
        "kept)",
        *demo.VARIANTS,
    ]
