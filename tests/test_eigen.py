"""The solves at the cost of what they keep (torch_lowrank/eigen.py), each checked against the
float64 ``eigh`` solution: same objective to a stated relative tolerance, on planted low-rank
plus noise and on ill-conditioned inputs."""

import pytest
import torch

from torch_lowrank import eigen, solvers

f64 = torch.float64


def psd(n: int, spectrum: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=f64)).Q
    return (q * spectrum) @ q.T


def planted(n: int, k: int, seed: int, noise: float = 1e-3) -> torch.Tensor:
    """A rank-k signal of eigenvalues 1..10 plus isotropic noise."""
    values = torch.full((n,), noise, dtype=f64)
    values[:k] = torch.linspace(10.0, 1.0, k, dtype=f64)
    return psd(n, values, seed)


def tail(matrix: torch.Tensor, vectors: torch.Tensor) -> float:
    """The objective of the closed forms: the energy outside span(vectors)."""
    return float(torch.trace(matrix) - torch.trace(vectors.T @ matrix @ vectors))


@pytest.mark.parametrize(
    "name, spectrum",
    [
        ("planted", None),
        ("geometric 1e-14", torch.logspace(0, -14, 600, dtype=f64)),  # float32 cannot resolve it
        ("flat", 1.0 + 0.01 * torch.rand(600, generator=torch.Generator().manual_seed(3))),
    ],
)
def test_top_eigh_keeps_the_same_energy_as_eigh(name, spectrum):
    """Subspace iteration: the objective (energy left out) matches the full float64 eigh to
    1e-6 relative (the flat spectrum: 1e-6 of the trace), and the top values to 1e-6."""
    n, k = 600, 20
    matrix = planted(n, k, seed=1) if spectrum is None else psd(n, spectrum.to(f64), seed=2)
    full = eigen.descending_eigh(matrix)
    top = eigen.top_eigh(matrix, k, force=True)
    assert top.vectors.shape == (n, k) and top.values.dtype == f64
    torch.testing.assert_close(
        top.vectors.T @ top.vectors, torch.eye(k, dtype=f64), atol=1e-10, rtol=0
    )
    reference = float(full.values[k:].sum())
    scale = max(reference, 1e-6 * float(full.values.sum()))
    assert abs(tail(matrix, top.vectors) - reference) <= 1e-6 * scale
    assert abs(top.rest - reference) <= 1e-6 * scale
    torch.testing.assert_close(
        top.values, full.values[:k], rtol=1e-6, atol=1e-12 * float(full.values[0])
    )


def test_top_eigh_falls_back_to_eigh_where_it_is_not_cheaper():
    matrix = planted(64, 4, seed=0)
    top, full = eigen.top_eigh(matrix, 4), eigen.descending_eigh(matrix)
    assert top.method == "eigh" and torch.allclose(top.values, full.values[:4])
    assert eigen.subspace_is_cheaper(4096, 300) and not eigen.subspace_is_cheaper(768, 300)


@pytest.mark.parametrize("decades", [2, 8, 14, None])
def test_damped_solve_matches_the_eigendecomposition(decades):
    """Cholesky of the damped matrix against the eigh inverse: with the damping of corrective
    recovery (1e-2 of the mean eigenvalue) the same solution to 1e-10 relative; with 1e-12 of
    it (condition numbers near 1e14) a backward-stable one, residual <= 1e-12 relative.
    ``None``: a singular matrix (half of its eigenvalues zero)."""
    n = 200
    values = torch.logspace(0, -(decades or 4), n, dtype=f64)
    if decades is None:
        values[n // 2 :] = 0.0
    matrix = psd(n, values, seed=4)
    rhs = torch.randn(n, 7, generator=torch.Generator().manual_seed(5), dtype=f64)
    s, v = torch.linalg.eigh(matrix)
    for damping in (1e-2, 1e-12):
        delta = damping * float(values.sum()) / n
        got = eigen.damped_solve(matrix, rhs, delta)
        damped = matrix + delta * torch.eye(n, dtype=f64)
        if damping == 1e-2:
            reference = v @ ((v.T @ rhs) / (s.clamp_min(0) + delta)[:, None])
            error = torch.linalg.matrix_norm(got - reference) / torch.linalg.matrix_norm(reference)
            assert error <= 1e-10
        residual = torch.linalg.matrix_norm(damped @ got - rhs)
        scale = torch.linalg.matrix_norm(damped, 2) * torch.linalg.matrix_norm(got)
        assert residual <= 1e-12 * scale


def test_damped_solve_without_damping_gives_the_pseudo_inverse():
    matrix = torch.diag(torch.tensor([2.0, 0.0], dtype=f64))
    got = eigen.damped_solve(matrix, torch.ones(2, 1, dtype=f64), 0.0)
    assert got.flatten().tolist() == [0.5, 0.0]


def eigh_corrective(w, mean_t, cov_t, mean, cov, cross, rank, damping=1e-2):
    """The float64 eigh formulation the Cholesky solve replaced (centred, with intercept)."""
    s, v = torch.linalg.eigh(cov_t)
    s = s.clamp_min(0)
    delta = damping * float(s.sum()) / s.shape[0]
    b = w @ ((cross.T + delta * torch.eye(w.shape[1], dtype=f64)) @ ((v / (s + delta)) @ v.T))
    fit = solvers.linear(b, w @ mean - b @ mean_t, mean_t, cov_t, rank=rank)
    z = fit.up @ fit.down
    error = (
        torch.trace(w @ cov @ w.T)
        - 2 * torch.trace(w @ cross.T @ z.T)
        + torch.trace(z @ cov_t @ z.T)
    )
    return z, float(error)


@pytest.mark.parametrize("kind", ["planted", "ill-conditioned"])
@pytest.mark.parametrize("shape", [(24, 96), (96, 24)])
def test_corrective_cholesky_path_matches_the_eigh_path(kind, shape):
    """Same factors (1e-7) and same corrective error (1e-9 relative) as the eigh formulation,
    on inputs near a low-dimensional subspace and on inputs whose covariance spans 12 decades."""
    m, n = shape
    gen = torch.Generator().manual_seed(7)
    rows = 4000
    if kind == "planted":
        x = torch.randn(rows, 6, generator=gen, dtype=f64) @ torch.randn(
            6, n, generator=gen, dtype=f64
        )
        x = x + 1e-3 * torch.randn(rows, n, generator=gen, dtype=f64)
    else:
        scales = torch.logspace(0, -6, n, dtype=f64)  # covariance eigenvalues over 12 decades
        x = torch.randn(rows, n, generator=gen, dtype=f64) * scales
    x_tilde = x + 0.05 * torch.randn(rows, n, generator=gen, dtype=f64) * x.std(0)
    w = torch.randn(m, n, generator=gen, dtype=f64)
    mean, mean_t = x.mean(0), x_tilde.mean(0)
    xc, tc = x - mean, x_tilde - mean_t
    cov, cov_t, cross = xc.T @ xc / rows, tc.T @ tc / rows, tc.T @ xc / rows
    rank = 5
    z_ref, error_ref = eigh_corrective(w, mean_t, cov_t, mean, cov, cross, rank)
    fit = solvers.corrective(w, None, mean_t, cov_t, mean, cov, cross, rank=rank)
    torch.testing.assert_close(
        fit.up @ fit.down, z_ref, rtol=1e-7, atol=1e-7 * float(z_ref.abs().max())
    )
    assert fit.error == pytest.approx(error_ref, rel=1e-9, abs=1e-12 * fit.variance)


def test_linear_by_subspace_iteration_matches_eigh():
    """A wide layer at a small rank goes through top_eigh: same error (1e-6 relative) and the
    same output of the factors as the full decomposition."""
    gen = torch.Generator().manual_seed(11)
    n, m, rank = 640, 1200, 30  # inputs near a 30-dimensional subspace
    x = torch.randn(3000, rank, generator=gen, dtype=f64) @ torch.randn(
        rank, n, generator=gen, dtype=f64
    )
    x = x + 0.01 * torch.randn(3000, n, generator=gen, dtype=f64)
    w = torch.randn(m, n, generator=gen, dtype=f64)
    mean, cov = x.mean(0), torch.cov(x.T, correction=0)
    fit = solvers.linear(w, None, mean, cov, rank=rank)
    assert fit.spectrum.shape[0] == rank  # the subspace path keeps only the top values
    # the reference: the m x m output covariance, full float64 eigh
    full = eigen.descending_eigh(w @ cov @ w.T)
    assert fit.error == pytest.approx(float(full.values[rank:].sum()), rel=1e-6)
    assert fit.variance == pytest.approx(float(full.values.sum()), rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_solves_stay_on_the_device():
    matrix = planted(600, 8, seed=0).cuda()
    assert eigen.top_eigh(matrix, 8, force=True).vectors.device.type == "cuda"
    assert eigen.damped_solve(matrix, matrix[:, :3], 1e-3).device.type == "cuda"
