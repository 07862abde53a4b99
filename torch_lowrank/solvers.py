"""Pure solver functions: a dense layer and its input statistics in, low-rank factors out.

A layer is the matrix ``W`` (m x n, out x in) and bias ``b``; a conv is its weight reshaped to
``C_out x (C_in kh kw)``. Every solver returns :class:`Factors` with ``up`` (m x r), ``down``
(r x n) and the new bias ``c``, so that the layer becomes ``x -> up @ (down @ x) + c``.

* :func:`svd` — truncated SVD of ``W``: the data-agnostic baseline.
* :func:`linear` — the exact optimum of ``min_{rank Z <= r, c} E || (W x + b) - (Z x + c) ||^2``
  (``docs/methods.md``; Zhang & Saab, arXiv 2502.02766): ``P_r`` = top-r eigenvectors of the output
  covariance ``W C W^T``, ``Z = P_r P_r^T W``, ``c = b + (W - Z) mu``. Its error is the
  eigenvalue tail. It never inverts or Cholesky-factors ``C``, so a singular ``C`` is fine.
* :func:`linear_from_outputs` — the same optimum from the moments of ``W x`` (``m x m``), what a
  layer that narrows (``m < n``) collects. Everything is in float64 on the weight's device
  (the eigenvectors and damped solves: :mod:`torch_lowrank.eigen`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .eigen import Eigen, damped_solve, descending_eigh, subspace_is_cheaper, top_eigh

__all__ = [
    "Factors", "relative_error", "select_rank", "svd", "linear", "linear_from_outputs",
    "corrective", "output_error",
]  # fmt: skip


@dataclass
class Factors:
    """The result of a solve: ``x -> up @ (down @ x) + bias``.

    Attributes:
        up: ``(m, r)`` float64, orthonormal columns.
        down: ``(r, n)`` float64.
        bias: ``(m,)`` float64, or ``None`` for a layer without bias.
        error: ``E || y - y_hat ||^2`` on the calibration data (``nan`` when there is none).
        variance: ``E || y - E y ||^2``, the output variance of the dense layer (``nan`` likewise).
        spectrum: the descending eigenvalues the rank was chosen from (output covariance for
            ``linear``, squared singular values of ``W`` for ``svd``); only the top ``r``
            where a fixed rank was solved by subspace iteration (``docs/scaling.md``).
        info: anything else a solver reports (iterations, objective before/after, ...).
    """

    up: Tensor
    down: Tensor
    bias: Tensor | None
    error: float
    variance: float
    spectrum: Tensor
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def relative_error(self) -> float:
        """``error / variance``: the fraction of the output variance the factors lose."""
        return relative_error(self.error, self.variance)


def relative_error(error: float, variance: float) -> float:
    """``error / variance``, the fraction of the output variance lost; ``nan`` when unknown or
    undefined (some error, but no variance: constant outputs), never ``inf``.

    Example:
        >>> relative_error(1.0, 4.0), relative_error(0.0, 0.0)
        (0.25, 0.0)
    """
    if math.isnan(error) or math.isnan(variance) or (variance <= 0.0 < error):
        return math.nan
    return 0.0 if variance <= 0.0 else error / variance


def select_rank(spectrum: Tensor, rank: int | None = None, energy: float | None = None) -> int:
    """The rank to keep: ``rank`` itself, or the smallest rank whose leading eigenvalues hold
    at least ``energy`` of the total.

    Example:
        >>> select_rank(torch.tensor([8.0, 1.0, 1.0]), energy=0.8), select_rank(
        ...     torch.tensor([8.0, 1.0, 1.0]), energy=0.85)
        (1, 2)
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank or energy")
    k = spectrum.shape[0]
    if rank is not None:
        if not 1 <= rank <= k:
            raise ValueError(f"rank must be in [1, {k}]\nbut got {rank}")
        return rank
    total = float(spectrum.sum())
    if total <= 0.0:
        return 1
    kept = torch.cumsum(spectrum, 0) / total
    # Tolerate rounding so that energy=1.0 stops at the numerical rank, not at k.
    return min(k, int((kept < energy - 1e-12).sum()) + 1)


def _leading(matrix: Tensor, rank: int | None, energy: float | None) -> Eigen:
    """The top-r eigenpairs of ``matrix`` for the rank asked (``rest``: the eigenvalues left
    out). ``values`` is the whole spectrum, or only the top r where a fixed rank lets
    :func:`~torch_lowrank.eigen.top_eigh` iterate more cheaply than a full decomposition."""
    if (
        rank is not None
        and 1 <= rank <= matrix.shape[0]
        and subspace_is_cheaper(matrix.shape[0], rank)
    ):
        top = top_eigh(matrix, rank)
        if top.method == "subspace":
            return top
    full = descending_eigh(matrix)
    r = select_rank(full.values, rank, energy)
    return Eigen(full.values, full.vectors[:, :r], rest=float(full.values[r:].sum()))


def output_error(
    target: Tensor,
    predict: Tensor,
    bias: Tensor | None,
    new_bias: Tensor | None,
    mean: Tensor,
    cov: Tensor,
    paired: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[float, float]:
    """``E || (T x + b) - (P x~ + c) ||^2`` and the variance ``E || T x - E T x ||^2``, from the
    moments of ``x`` (``x~ = x``; with ``D = T - P`` the error is ``tr(D C D^T) +
    || D mu + b - c ||^2``) or, with ``paired = (mu~, C~, E[(x~ - mu~)(x - mu)^T])``, of the pairs.

    Example:
        >>> w, c = torch.randn(3, 4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
        >>> error, variance = output_error(w, 0 * w, None, None, torch.zeros(4).double(), c)
        >>> math.isclose(error, variance)  # nothing predicted: all the variance is lost
        True
    """
    T = target.detach().to(torch.float64)
    mean, cov = mean.to(T), cov.to(T)
    variance = float(((T @ cov) * T).sum())
    if paired is None:
        D = T - predict
        spread, offset = float(((D @ cov) * D).sum()), D @ mean
    else:
        mean_t, cov_t, cross = (t.to(T) for t in paired)
        spread = variance - 2 * float(((T @ cross.T) * predict).sum())
        spread += float(((predict @ cov_t) * predict).sum())
        offset = T @ mean - predict @ mean_t
    if bias is not None:
        offset = offset + bias.detach().to(T)
    if new_bias is not None:
        offset = offset - new_bias
    return max(spread + float(offset.square().sum()), 0.0), variance


def svd(
    weight: Tensor,
    bias: Tensor | None,
    rank: int | None = None,
    energy: float | None = None,
    mean: Tensor | None = None,
    cov: Tensor | None = None,
    *,
    outputs: bool = False,
) -> Factors:
    """Truncated SVD of the weight (data-agnostic); the bias is kept as it is. ``mean``/``cov``
    only serve to report the error: moments of ``x``, or of ``W x`` with ``outputs=True``.

    Example:
        >>> w = torch.randn(6, 4, dtype=torch.float64)
        >>> f = svd(w, None, rank=4)
        >>> torch.allclose(f.up @ f.down, w)
        True
    """
    W = weight.detach().to(torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = select_rank(S.square(), rank, energy)
    up, down = U[:, :r], S[:r, None] * Vh[:r]
    new_bias = None if bias is None else bias.detach().to(torch.float64).clone()
    error = variance = math.nan
    if mean is not None and cov is not None and outputs:
        # W - up down = (I - up up^T) W: the error is the part of W x outside span(up)
        cov = cov.to(device=W.device, dtype=torch.float64)
        mean = mean.to(device=W.device, dtype=torch.float64)
        lost_cov = cov - up @ (up.T @ cov)
        lost_cov = lost_cov - (lost_cov @ up) @ up.T
        lost_mean = mean - up @ (up.T @ mean)
        error = float(torch.trace(lost_cov) + lost_mean.square().sum())
        variance = float(torch.trace(cov))
    elif mean is not None and cov is not None:
        error, variance = output_error(W, up @ down, bias, new_bias, mean, cov)
    return Factors(up, down, new_bias, error, variance, S.square())


def linear(
    weight: Tensor,
    bias: Tensor | None,
    mean: Tensor,
    cov: Tensor,
    rank: int | None = None,
    energy: float | None = None,
    add_bias: bool = True,
) -> Factors:
    r"""The exact data-driven optimum of ``docs/methods.md``.

    Solves :math:`\min_{\mathrm{rank}\,Z \le r,\ c} E\,\|(Wx + b) - (Zx + c)\|^2` over inputs of
    mean ``mean`` and covariance ``cov``. The optimum projects ``W`` on the top-r eigenvectors
    ``P_r`` of the output covariance ``W C W^T`` and corrects the bias with the mean. A layer
    without bias and ``add_bias=False`` is solved on the uncentred second moment (the optimum
    without an intercept) and stays without bias.

    Cost: ``min(m, n)^3 + m n min(m, n)``, in the smaller space (one ``m x m`` or two ``n x n``
    eigendecompositions, the top-r one by subspace iteration where cheaper).

    Args:
        weight: ``(m, n)``. bias: ``(m,)`` or ``None``.
        mean: ``(n,)`` input mean. cov: ``(n, n)`` input covariance (may be singular).
        rank / energy: exactly one; see :func:`select_rank`.
        add_bias: give a bias-free layer a bias ``c`` to absorb the mean correction.

    Example:
        >>> w, x = torch.randn(8, 5, dtype=torch.float64), torch.randn(1000, 5, dtype=torch.float64)
        >>> f = linear(w, None, x.mean(0), torch.cov(x.T, correction=0), rank=2)
        >>> y, y_hat = x @ w.T, x @ f.down.T @ f.up.T + f.bias
        >>> abs((y - y_hat).square().sum(1).mean().item() - f.error) < 1e-8
        True
    """
    W = weight.detach().to(torch.float64)
    m, n = W.shape
    mean = mean.to(device=W.device, dtype=torch.float64)
    cov = cov.to(device=W.device, dtype=torch.float64)
    if m <= n:
        return linear_from_outputs(W, bias, W @ mean, W @ cov @ W.T, rank, energy, add_bias)
    centred = add_bias or bias is not None
    moment = cov if centred else cov + torch.outer(mean, mean)
    # W C W^T = A A^T with A = W C^{1/2}; its top eigenvectors are the top left singular
    # vectors of A, found from the n x n matrix A^T A = C^{1/2} (W^T W) C^{1/2}.
    full = descending_eigh(moment)
    half = full.vectors * full.values.sqrt()  # (n, n), half @ half.T = moment
    gram = W.T @ W  # (n, n)
    top = _leading(half.T @ gram @ half, rank, energy)
    directions = half @ top.vectors  # (n, r)
    B = W @ directions  # (m, r): A Q_r, orthogonal columns of norms sqrt(spectrum)
    norms = torch.linalg.vector_norm(B, dim=0)
    if norms.min() > 1e-6 * norms.max():
        # up = B / norms, and down = up^T W = (directions^T W^T W) / norms: n-space work
        up, down = B / norms, (directions.T @ gram) / norms[:, None]
    else:  # rounding-level directions: orthonormalise and project explicitly
        up = torch.linalg.qr(B).Q
        down = up.T @ W
    return _with_bias(up, down, top, bias, W @ mean, centred)


def linear_from_outputs(
    weight: Tensor,
    bias: Tensor | None,
    mean: Tensor,
    cov: Tensor,
    rank: int | None = None,
    energy: float | None = None,
    add_bias: bool = True,
) -> Factors:
    r""":func:`linear` from the moments of the products ``W x`` instead of the inputs ``x``.

    The optimum needs the inputs only through ``W C W^T`` and ``W mu``: the covariance and mean
    of ``W x`` (the pre-activations without the bias). A layer that narrows (``m < n``)
    accumulates those ``m x m`` moments from its own outputs during calibration, which costs
    ``N m^2`` instead of ``N n^2``; this solves from them, with the same result as
    :func:`linear` on the input moments.

    Args:
        weight: ``(m, n)``. bias: ``(m,)`` or ``None``.
        mean: ``(m,)`` mean of ``W x``. cov: ``(m, m)`` covariance of ``W x`` (may be singular).
        rank / energy / add_bias: as for :func:`linear`.

    Example:
        >>> w, x = torch.randn(3, 8, dtype=torch.float64), torch.randn(500, 8, dtype=torch.float64)
        >>> wx = x @ w.T
        >>> f = linear_from_outputs(w, None, wx.mean(0), torch.cov(wx.T, correction=0), rank=2)
        >>> g = linear(w, None, x.mean(0), torch.cov(x.T, correction=0), rank=2)
        >>> torch.allclose(f.up @ f.down, g.up @ g.down) and abs(f.error - g.error) < 1e-9
        True
    """
    W = weight.detach().to(torch.float64)
    mean = mean.to(device=W.device, dtype=torch.float64)
    moment = cov.to(device=W.device, dtype=torch.float64)
    centred = add_bias or bias is not None
    if not centred:
        moment = moment + torch.outer(mean, mean)
    top = _leading(moment, rank, energy)
    return _with_bias(top.vectors, top.vectors.T @ W, top, bias, mean, centred)


def _with_bias(
    up: Tensor,
    down: Tensor,
    top: Eigen,
    bias: Tensor | None,
    mean_wx: Tensor,
    centred: bool,
) -> Factors:
    """The :func:`linear` factors with their bias, error and variance, from the mean of ``W x``
    (``down = up^T W``, so ``(W - Z) mu = mean_wx - up up^T mean_wx``)."""
    new_bias = mean_wx - up @ (up.T @ mean_wx)  # (W - Z) mu
    if bias is not None:
        new_bias = new_bias + bias.detach().to(torch.float64)
    total = float(top.values[: up.shape[1]].sum()) + top.rest  # the whole trace
    if centred:
        variance = total
    else:
        new_bias = None
        variance = total - float(mean_wx.square().sum())
    return Factors(up, down, new_bias, top.rest, max(variance, 0.0), top.values)


def corrective(
    weight: Tensor,
    bias: Tensor | None,
    mean_tilde: Tensor,
    cov_tilde: Tensor,
    mean: Tensor,
    cov: Tensor,
    cross: Tensor,
    rank: int | None = None,
    energy: float | None = None,
    add_bias: bool = True,
    damping: float = 1e-2,
    outputs: bool = False,
) -> Factors:
    r"""Corrective recovery: reduced-rank regression from the compressed network's input ``x~``
    to the original layer's output ``W x + b`` (``docs/methods.md``).

    Solves :math:`\min_{\mathrm{rank}\,Z \le r,\ c} E\,\|(Z\tilde x + c) - (Wx + b)\|^2`.
    First the least-squares map from ``x~`` to the target, damped towards the original weight,
    ``B = argmin E||W (x - mu) - B (x~ - mu~)||^2 + delta ||B - W||^2 = W (Ctx^T + delta I)
    (Ct + delta I)^{-1}``, with ``Ct`` the covariance of ``x~``, ``Ctx`` the cross-covariance of
    ``x~`` with ``x`` and ``delta = damping * trace(Ct) / n``, by one Cholesky solve.
    ``x~ = x`` gives ``B = W``, exactly :func:`linear`. Then ``Z`` is :func:`linear` applied
    to ``B`` (top-r eigenvectors of ``B Ct B^T``), ``c = b + W mu - Z mu~``. ``x`` enters only
    through ``W x``: ``outputs=True`` takes its moments instead (a narrowing layer's, m wide).

    Args:
        weight, bias: the dense layer. mean_tilde, cov_tilde: moments of ``x~``. mean, cov,
        cross ``E[(x~ - mu~)(x - mu)^T]``: of ``x``, or with ``outputs`` of ``W x`` (no bias).
        rank / energy, add_bias: as in :func:`linear`. damping: relative ridge weight.

    Returns:
        :class:`Factors`; ``error``: the corrective error on the calibration data (regression
        residual plus eigenvalue tail); ``variance``: that of ``W x``.

    Example:
        >>> x = torch.randn(500, 6, dtype=torch.float64)
        >>> w = torch.randn(4, 6, dtype=torch.float64)
        >>> m, c = x.mean(0), torch.cov(x.T, correction=0)
        >>> same, plain = corrective(w, None, m, c, m, c, c, rank=2), linear(w, None, m, c, rank=2)
        >>> torch.allclose(same.up @ same.down, plain.up @ plain.down)
        True
        >>> y = corrective(w, None, m, c, w @ m, w @ c @ w.T, c @ w.T, rank=2, outputs=True)
        >>> torch.allclose(y.up @ y.down, plain.up @ plain.down)
        True
    """
    W = weight.detach().to(torch.float64)
    moments = (mean_tilde, cov_tilde, mean, cov, cross)
    mean_tilde, cov_tilde, mean, cov, cross = (t.to(W.device, torch.float64) for t in moments)
    if outputs:  # the moments of y = W x: E[x~ y^T], E y and E||y - E y||^2 as they are
        target, mean_out, variance = cross, mean, float(torch.diagonal(cov).sum())
    else:
        target, mean_out, variance = cross @ W.T, W @ mean, float(((W @ cov) * W).sum())
    centred = add_bias or bias is not None
    moment_tilde = cov_tilde
    if not centred:  # no intercept: regress on uncentred moments
        moment_tilde = cov_tilde + torch.outer(mean_tilde, mean_tilde)
        target = target + torch.outer(mean_tilde, mean_out)
    # B^T = (Ct + delta I)^{-1} (Ctx W^T + delta W^T): one Cholesky solve, positive definite.
    trace = float(torch.diagonal(moment_tilde).sum())
    delta = damping * trace / W.shape[1] if trace > 0 else 1.0
    B = damped_solve(moment_tilde, target + delta * W.T, delta).T  # (m, n); target (n, m)
    if centred:
        intercept = mean_out - B @ mean_tilde
        if bias is not None:
            intercept = intercept + bias.detach().to(torch.float64)
        fit = linear(B, intercept, mean_tilde, cov_tilde, rank, energy, add_bias=True)
        total = variance
    else:
        fit = linear(B, None, mean_tilde, cov_tilde, rank, energy, add_bias=False)
        total = variance + float(mean_out.square().sum())
    # The error of Z = up down (the intercept makes the means agree): E||W x - Z x~||^2 =
    # tr(W Cx W^T) - 2 tr(W Ctx^T Z^T) + tr(Z Ct Z^T), the last the kept eigenvalues.
    cross_term = float(((fit.up.T @ target.T) * fit.down).sum())
    fitted = float(fit.spectrum[: fit.rank].sum())
    fit.error = max(total - 2 * cross_term + fitted, 0.0)
    fit.variance = variance
    return fit
