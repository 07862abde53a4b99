"""Tests of the nuclear-norm solver (torch_lowrank/nuclear.py) on planted models: the rank it
meets, never worse than its start on the penalised objective."""

import pytest
import torch
from planted import assert_orthonormal, linear_start, planted

from torch_lowrank import nuclear, projected

pytestmark = pytest.mark.usefixtures("single_thread")


def penalised(weight, bias, x, factors, lam) -> float:
    nuclear_norm = torch.linalg.svdvals(factors.up @ factors.down).sum().item()
    return projected.objective(weight, bias, x, factors, "relu") + lam * nuclear_norm


@pytest.mark.parametrize("seed, rank", [(0, 1), (1, 2), (2, 3)])
def test_nuclear_meets_the_rank_and_is_never_worse(seed, rank):
    """``rank=k``: the result's matrix rank is <= k, ``up`` orthonormal, ``lam > 0``, and
    ``f_relu + lam ||Z||_*`` (recomputed here) is <= its value at the start (1e-12 rel.)."""
    weight, bias, sample = planted(seed, sigma=0.1)
    x = sample(150)
    start = linear_start(weight, bias, x, 5)
    fit = nuclear.nuclear(weight, bias, x, start, rank=rank, max_iter=100)
    lam = fit.info["lam"]
    assert lam > 0 and fit.rank <= rank
    assert torch.linalg.matrix_rank(fit.up @ fit.down) <= rank
    assert_orthonormal(fit.up)
    before = penalised(weight, bias, x, start, lam)
    assert penalised(weight, bias, x, fit, lam) <= before * (1 + 1e-12)
    assert fit.info["objective_before"] == pytest.approx(before, rel=1e-9)
    assert fit.error == pytest.approx(projected.objective(weight, bias, x, fit, "relu"), rel=1e-9)


def test_nuclear_with_given_lam():
    """A huge ``lam`` thresholds everything (Z = 0, returned as one zero direction); ``lam=0``
    fits without a rank limit and is never worse than the start on ``f_relu``."""
    weight, bias, sample = planted(0)
    x = sample(100)
    start = linear_start(weight, bias, x, 2)
    zero = nuclear.nuclear(weight, bias, x, start, lam=1e9)
    assert zero.rank == 1 and torch.equal(zero.down, torch.zeros_like(zero.down))
    free = nuclear.nuclear(weight, bias, x, start, lam=0.0)
    assert free.info["lam"] == 0.0
    assert free.error <= projected.objective(weight, bias, x, start, "relu")
