"""Eigen-solvers and damped solves at the cost of what they keep (``docs/scaling.md``).

The closed forms of :mod:`torch_lowrank.solvers` need, per layer, the top-``r`` eigenvectors of a
symmetric positive semi-definite matrix and, for corrective recovery, one solve with a damped
covariance. A full float64 eigendecomposition does both, at ``O(n^3)`` with a large constant;
these functions do each at the cost of what is kept:

* :func:`descending_eigh`: the full decomposition, eigenvalues descending (the reference, and
  what ``energy=`` needs: the whole spectrum to choose the rank from).
* :func:`top_eigh`: the top ``k`` eigenpairs by randomized block subspace iteration, its
  products in float32 where the spectrum allows and every Rayleigh-Ritz step in float64; it
  stops when the kept eigenvalue sum stops moving and falls back to :func:`descending_eigh`
  when it does not converge or cannot be cheaper (:func:`subspace_is_cheaper`).
* :func:`damped_solve`: ``(A + delta I)^{-1} B`` by a Cholesky factorisation (the damped matrix
  is positive definite), with a float64 eigendecomposition as the fallback when rounding makes
  it indefinite.

Everything runs on the matrix's device; the results are float64. :func:`symmetrise_` makes a
large moment exactly symmetric in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Eigen", "descending_eigh", "top_eigh", "subspace_is_cheaper", "damped_solve", "symmetrise_",
]  # fmt: skip


@dataclass
class Eigen:
    """Leading eigenpairs of a symmetric positive semi-definite matrix.

    Attributes:
        values: ``(k,)`` float64, descending, clamped at zero.
        vectors: ``(n, k)`` float64, orthonormal columns.
        method: ``"eigh"`` (full decomposition) or ``"subspace"`` (randomized iteration).
        iterations: subspace iterations run (0 for ``"eigh"``).
        rest: the sum of the eigenvalues after the first ``k = vectors.shape[1]``: those not
            kept (``values`` may hold more than ``k`` of them, or only ``k``).
    """

    values: Tensor
    vectors: Tensor
    method: str = "eigh"
    iterations: int = 0
    rest: float = 0.0


def descending_eigh(matrix: Tensor) -> Eigen:
    """Every eigenpair of the symmetric ``matrix`` in float64, eigenvalues descending and
    clamped at zero (the matrix is symmetrised first).

    Example:
        >>> e = descending_eigh(torch.diag(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)))
        >>> e.values.tolist(), e.vectors[:, 0].abs().tolist()
        ([3.0, 2.0, 1.0], [0.0, 1.0, 0.0])
    """
    matrix = matrix.to(torch.float64)
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return Eigen(values.flip(0).clamp_min(0.0), vectors.flip(1))


def subspace_is_cheaper(n: int, k: int) -> bool:
    """Whether :func:`top_eigh` is expected to beat a full decomposition for the top ``k``
    eigenpairs of an ``n x n`` matrix: it needs ``k + oversampling`` well below ``n`` (a full
    float64 ``eigh`` costs about as much as 25 ``n x n`` products on a CPU, an iteration of a
    ``k``-wide block about ``2 k / n`` of one in float32 plus a float64 Rayleigh-Ritz step),
    and a matrix large enough for the difference to matter.

    Example:
        >>> subspace_is_cheaper(4096, 256), subspace_is_cheaper(768, 300)
        (True, False)
    """
    return n >= 512 and _block(n, k) <= n // 6


def _block(n: int, k: int) -> int:
    return min(n, k + max(16, k // 4))


def _orthonormal(x: Tensor) -> Tensor:
    return torch.linalg.qr(x).Q


def _ritz(matrix: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Rayleigh-Ritz in float64: the eigenpairs of ``matrix`` restricted to ``basis``."""
    small = basis.T @ (matrix @ basis)
    values, rotation = torch.linalg.eigh((small + small.T) / 2)
    return values.flip(0), basis @ rotation.flip(1)


def top_eigh(
    matrix: Tensor,
    k: int,
    *,
    tol: float = 1e-7,
    max_iter: int = 60,
    seed: int = 0,
    force: bool = False,
) -> Eigen:
    r"""The top ``k`` eigenpairs of the symmetric positive semi-definite ``matrix``.

    Randomized block subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4) on a block of
    ``k`` plus oversampling columns: the block is multiplied by the matrix in float32 and
    re-orthonormalised, and every few iterations a Rayleigh-Ritz step in float64 gives the
    current eigenpairs. It stops when the sum of the top ``k`` Ritz values (the energy kept)
    moves by less than ``tol`` times the energy left out, ``trace - kept`` (floored at
    ``tol * trace``): the objectives of :mod:`torch_lowrank.solvers` are that tail, so they
    come out to ``tol`` relative. The float32 products are used only while the spectrum
    allows (the ``k``-th eigenvalue at least ``1e-4`` of the largest); below that, or once
    float32 rounding is what stops the progress, the iteration continues in float64. When
    it is not cheaper (:func:`subspace_is_cheaper`, unless ``force``) or does not converge in
    ``max_iter`` iterations, the answer is :func:`descending_eigh`'s, truncated.

    Args:
        matrix: ``(n, n)`` symmetric positive semi-definite, any float dtype and device.
        k: how many eigenpairs, ``1 <= k <= n``.
        tol: the relative tolerance on the kept energy (see above).
        max_iter: subspace iterations before falling back to a full decomposition.
        seed: the seed of the random start (a generator of its own: the global RNG is not
            touched), so results are reproducible.
        force: iterate even where a full decomposition is expected to be cheaper.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> q = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64)).Q
        >>> a = (q * 0.8 ** torch.arange(300.0, dtype=torch.float64)) @ q.T
        >>> top, full = top_eigh(a, 5, force=True), descending_eigh(a)
        >>> top.method, torch.allclose(top.values, full.values[:5], rtol=1e-9)
        ('subspace', True)
    """
    n = matrix.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}]\nbut got {k}")
    if not (force or subspace_is_cheaper(n, k)):
        return _truncated(descending_eigh(matrix), k)
    exact = matrix.to(torch.float64)
    exact = (exact + exact.T) / 2
    trace = float(torch.diagonal(exact).sum())
    if trace <= 0.0:
        return _truncated(descending_eigh(exact), k)
    gen = torch.Generator(device=exact.device).manual_seed(seed)
    block = torch.randn(n, _block(n, k), generator=gen, dtype=torch.float64, device=exact.device)
    fast = exact.to(torch.float32)
    use_fast = True
    basis = _orthonormal(exact @ block)
    kept = None
    for iteration in range(1, max_iter + 1):
        if use_fast:
            basis = _orthonormal((fast @ basis.to(torch.float32)).to(torch.float64))
        else:
            basis = _orthonormal(exact @ basis)
        values, vectors = _ritz(exact, basis)
        now = float(values[:k].clamp_min(0.0).sum())
        floor = max(trace - now, tol * trace)
        if kept is not None and abs(now - kept) <= tol * floor:
            if use_fast and float(values[k - 1]) < 1e-4 * float(values[0]):
                use_fast = False  # a converged float32 subspace may still miss small pairs
            else:
                top = values[:k].clamp_min(0.0)
                rest = max(trace - float(top.sum()), 0.0)
                return Eigen(top, vectors[:, :k], "subspace", iteration, rest)
        elif use_fast and kept is not None and now <= kept:
            use_fast = False  # float32 rounding stalls the progress: go on in float64
        kept = now
        basis = vectors
    return _truncated(descending_eigh(exact), k)


def _truncated(full: Eigen, k: int) -> Eigen:
    return Eigen(full.values[:k], full.vectors[:, :k], rest=float(full.values[k:].sum()))


def damped_solve(matrix: Tensor, rhs: Tensor, delta: float) -> Tensor:
    r"""``(matrix + delta I)^{-1} rhs`` in float64, for a symmetric positive semi-definite
    ``matrix`` and ``delta >= 0``: one Cholesky factorisation (``n^3 / 3``) and two triangular
    solves, instead of an eigendecomposition. If rounding leaves the damped matrix not
    numerically positive definite, a float64 eigendecomposition with the eigenvalues clamped
    at zero answers instead (the same solution for a positive semi-definite ``matrix``; with
    ``delta = 0`` and a singular one, the pseudo-inverse).

    Example:
        >>> a = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> x = damped_solve(a, torch.eye(2, dtype=torch.float64), 1.0)
        >>> torch.allclose((a + torch.eye(2, dtype=torch.float64)) @ x, torch.eye(2, dtype=x.dtype))
        True
    """
    if not delta >= 0.0:
        raise ValueError(f"delta must be >= 0\nbut got {delta}")
    damped = symmetrise_(matrix.to(torch.float64, copy=True))  # one n x n copy, no temporaries
    damped.diagonal().add_(delta)
    rhs = rhs.to(device=damped.device, dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    damped.diagonal().sub_(delta)
    full = descending_eigh(damped)
    shifted = full.values + delta
    inverse = torch.where(shifted > 0, 1.0 / shifted.clamp_min(1e-300), 0.0)  # 0: pseudo-inverse
    return full.vectors @ ((full.vectors.T @ rhs) * inverse[:, None])


def symmetrise_(matrix: Tensor, block: int = 512) -> Tensor:
    """``matrix`` replaced by ``(matrix + matrix^T) / 2`` in place, a block at a time (no
    second full-size copy); returns it.

    Example:
        >>> symmetrise_(torch.tensor([[1.0, 2.0], [4.0, 3.0]]), block=1).tolist()
        [[1.0, 3.0], [3.0, 3.0]]
    """
    n = matrix.shape[0]
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        diagonal = matrix[lo:hi, lo:hi]
        diagonal.copy_((diagonal + diagonal.T) / 2)
        upper, lower = matrix[lo:hi, hi:], matrix[hi:, lo:hi]
        average = (upper + lower.T) / 2
        upper.copy_(average)
        lower.copy_(average.T)
    return matrix
