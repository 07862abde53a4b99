"""Published low-rank baselines, implemented from their papers, for side-by-side benchmarks.

Each baseline turns a trained model's ``nn.Linear`` / ``nn.Conv2d`` layers into the library's
recovered :class:`~torch_lowrank.LowRankLinear` / :class:`~torch_lowrank.LowRankConv2d` modules
(``x -> up(down(x))``) at ranks the caller gives, so that they run the same forward as our
methods and differ only in the factors. A conv is the matrix ``C_out x (C_in kh kw)`` acting on
its unfolded receptive-field patches (every output position is one sample row). None of the
baselines changes the bias: the papers compress bias-free LLM projections.

* :func:`svd_factors`: truncated SVD of ``W`` (Eckart-Young), data-agnostic.
* :func:`asvd_factors`: ASVD, Yuan et al., "ASVD: Activation-aware Singular Value Decomposition
  for Compressing Large Language Models", arXiv:2312.05821 (2023). Input channel ``j`` is scaled
  by ``S_jj = (mean_i |x_ij|)^alpha`` (``alpha = 0.5``), ``W S`` is truncated by SVD and
  ``S^{-1}`` folded back into the right factor. Following the authors' code, ``1e-6`` is added
  to ``S`` so that dead inputs do not divide by zero. (ASVD's sensitivity-based rank search is
  not used: every method gets the same ranks.)
* :func:`svd_llm_factors`: SVD-LLM's truncation-aware data whitening, Wang et al., "SVD-LLM:
  Truncation-aware Singular Value Decomposition for Large Language Model Compression",
  arXiv:2403.07378 (2024). ``S`` is the Cholesky factor of the uncentred Gram matrix
  ``X^T X = S S^T`` of the calibration inputs, ``W S`` is truncated by SVD, and the right factor
  is multiplied by ``S^{-1}``, so that each dropped singular value is exactly the output error
  it causes. Factors split the singular values as the paper does: ``up = U_r Sigma_r^{1/2}``,
  ``down = Sigma_r^{1/2} V_r^T S^{-1}``. SVD-LLM's parameter update (LoRA fine-tuning of the
  factors) is not part of this baseline.

Failure mode of SVD-LLM (:func:`whitening`): when ``X^T X`` is not positive definite (dead
inputs, fewer calibration rows than input features, rounding), its Cholesky fails. The
authors' code then adds ``(-lambda_min + eps) I`` to the Gram matrix, with ``lambda_min`` its
smallest eigenvalue and ``eps = 1e-6`` (absolute, on the raw sum ``X^T X``), and retries. We do
exactly that; should the retry still fail (the reference code leaves it unguarded), ``eps`` is
multiplied by 10 and the shift retried, at most :data:`MAX_JITTER_TRIES` times in all.

Statistics (:func:`collect_moments`) come from one no-grad pass over the same calibration
batches our methods see: per layer the row count, ``sum |x|`` and ``X^T X`` (each batch product
in float32, the running sums in float64, as the library accumulates its own statistics).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_lowrank import LowRankConv2d, LowRankLinear, default_forward

__all__ = [
    "ASVD_ALPHA",
    "ASVD_EPS",
    "BASELINES",
    "JITTER_EPS",
    "MAX_JITTER_TRIES",
    "Moments",
    "apply_baseline",
    "asvd_factors",
    "collect_moments",
    "factored_layer",
    "input_rows",
    "svd_factors",
    "svd_llm_factors",
    "whitening",
]

BASELINES = ("svd", "asvd", "svd_llm")
ASVD_ALPHA = 0.5  # the paper's default scaling exponent
ASVD_EPS = 1e-6  # added to the ASVD scales, as in the authors' code
JITTER_EPS = 1e-6  # SVD-LLM's diagonal shift beyond -lambda_min, as in the authors' code
MAX_JITTER_TRIES = 8  # Cholesky attempts after the first failure (eps x10 each time)

f64 = torch.float64


@dataclass
class Moments:
    """Input statistics of one layer: ``count`` rows, ``abs_sum = sum_i |x_i|`` ``(n,)`` and the
    uncentred Gram matrix ``gram = sum_i x_i x_i^T`` ``(n, n)``, float64."""

    count: int = 0
    abs_sum: Tensor | None = None
    gram: Tensor | None = None

    def update(self, rows: Tensor) -> None:
        work = rows.detach().to(f64 if rows.dtype == f64 else torch.float32)
        if self.gram is None:
            n = work.shape[1]
            self.abs_sum = torch.zeros(n, dtype=f64, device=work.device)
            self.gram = torch.zeros(n, n, dtype=f64, device=work.device)
        self.count += work.shape[0]
        self.abs_sum += work.abs().sum(0, dtype=f64)
        self.gram += (work.T @ work).to(f64)

    @property
    def abs_mean(self) -> Tensor:
        """``mean_i |x_ij|`` per input feature ``j``."""
        return self.abs_sum / self.count


def input_rows(layer: nn.Module, x: Tensor) -> Tensor:
    """The sample rows ``(N, n)`` a layer's weight matrix acts on: a Linear's tokens, or a
    Conv2d's receptive-field patches (``F.unfold``; zero padding, ``groups=1`` only)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, layer.in_features)
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise NotImplementedError(
                "baselines: only ungrouped Conv2d with numeric zero padding\n"
                f"but got groups={layer.groups}, padding={layer.padding!r}, "
                f"padding_mode={layer.padding_mode!r}"
            )
        cols = F.unfold(
            x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
            stride=layer.stride,
        )  # (B, n, L)  # fmt: skip
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise TypeError(f"baselines: expected nn.Linear or nn.Conv2d\nbut got {type(layer).__name__}")


def weight_matrix(layer: nn.Module) -> Tensor:
    """The layer's weight as an ``(m, n)`` float64 matrix (a conv's is ``C_out x C_in kh kw``)."""
    return layer.weight.detach().reshape(layer.weight.shape[0], -1).to(f64)


@torch.no_grad()
def collect_moments(
    model: nn.Module,
    data: Iterable[Any],
    names: Iterable[str],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, Moments]:
    """Run ``data`` through ``model`` (eval mode, no grad) and return the :class:`Moments` of
    the inputs of the named layers, in the network as it is (every layer sees the original
    network's activations, as in all three papers)."""
    forward_fn = forward_fn or default_forward
    found = {name: Moments() for name in names}
    handles = []
    for name, moments in found.items():
        layer = model.get_submodule(name)

        def hook(module, args, moments=moments):
            moments.update(input_rows(module, args[0]))

        handles.append(layer.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in data:
            forward_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return found


def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Truncated SVD: ``(up, down)`` with ``up @ down`` the best rank-``rank`` approximation of
    ``weight`` in Frobenius norm; singular values split evenly between the factors."""
    U, s, Vh = torch.linalg.svd(weight.to(f64), full_matrices=False)
    root = s[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def asvd_factors(
    weight: Tensor, abs_mean: Tensor, rank: int, alpha: float = ASVD_ALPHA
) -> tuple[Tensor, Tensor]:
    """ASVD (arXiv:2312.05821): SVD of ``W S`` with ``S = diag(mean|x|^alpha + 1e-6)``, then
    ``S^{-1}`` folded into the right factor: ``W ~ (U_r Sigma_r^{1/2}) (Sigma_r^{1/2} V_r^T
    S^{-1})``. ``alpha = 0`` is plain truncated SVD."""
    scale = abs_mean.to(f64).pow(alpha) + ASVD_EPS  # (n,)
    up, down = svd_factors(weight.to(f64) * scale, rank)
    return up, down / scale


def whitening(gram: Tensor, eps: float = JITTER_EPS) -> tuple[Tensor, dict]:
    """SVD-LLM's whitening matrix: the lower Cholesky factor ``S`` of ``gram = X^T X``.

    If ``gram`` is not positive definite, add ``(-lambda_min + eps) I`` and retry, as the
    authors' code does (``eps = 1e-6``); if that still fails, ``eps`` grows x10 per retry, at most
    :data:`MAX_JITTER_TRIES` times. Returns ``S`` and ``{"jitter_tries", "shift"}`` (the total
    diagonal shift added; 0 when the first Cholesky succeeded).

    Raises:
        torch.linalg.LinAlgError: still not positive definite after every retry.
    """
    gram = (gram.to(f64) + gram.to(f64).T) / 2
    S, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return S, {"jitter_tries": 0, "shift": 0.0}
    lowest = float(torch.linalg.eigvalsh(gram)[0])
    eye = torch.eye(gram.shape[0], dtype=f64, device=gram.device)
    for tries in range(1, MAX_JITTER_TRIES + 1):
        shift = -lowest + eps * 10 ** (tries - 1)
        S, info = torch.linalg.cholesky_ex(gram + shift * eye)
        if int(info) == 0:
            return S, {"jitter_tries": tries, "shift": shift}
    raise torch.linalg.LinAlgError(
        f"whitening: X^T X is not positive definite after {MAX_JITTER_TRIES} diagonal shifts\n"
        f"(smallest eigenvalue {lowest:.3g})"
    )


def svd_llm_factors(weight: Tensor, gram: Tensor, rank: int) -> tuple[Tensor, Tensor, dict]:
    """SVD-LLM (arXiv:2403.07378): ``W S = U Sigma V^T`` with ``S S^T = X^T X``; ``up = U_r
    Sigma_r^{1/2}``, ``down = Sigma_r^{1/2} V_r^T S^{-1}`` (a triangular solve, no inverse).
    Returns ``(up, down, info)`` with the :func:`whitening` info."""
    S, info = whitening(gram)
    up, half = svd_factors(weight.to(f64) @ S, rank)  # half = Sigma_r^{1/2} V_r^T, (r, n)
    down = torch.linalg.solve_triangular(S, half, upper=False, left=False)  # half S^{-1}
    return up, down, info


@torch.no_grad()
def factored_layer(layer: nn.Module, up: Tensor, down: Tensor) -> nn.Module:
    """A recovered low-rank module computing ``up @ down`` (float64 ``(m, r)``, ``(r, n)``) and the
    original bias, in the layer's dtype and device."""
    r = down.shape[0]
    has_bias = layer.bias is not None
    like = {"dtype": layer.weight.dtype, "device": layer.weight.device}
    if isinstance(layer, nn.Linear):
        new = LowRankLinear(layer.in_features, layer.out_features, r, bias=has_bias, **like)
        new.down.weight.copy_(down)
        new.up.weight.copy_(up)
    else:
        new = LowRankConv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, r, layer.stride,
            layer.padding, layer.dilation, 1, has_bias, layer.padding_mode, **like,
        )  # fmt: skip
        new.down.weight.copy_(down.reshape(r, layer.in_channels, *layer.kernel_size))
        new.up.weight.copy_(up.reshape(layer.out_channels, r, 1, 1))
    if has_bias:
        new.up.bias.copy_(layer.bias)
    return new.train(layer.training)


@dataclass
class BaselineResult:
    """Per layer: rank, seconds of the solve, and method facts (SVD-LLM's jitter)."""

    layers: dict[str, dict] = field(default_factory=dict)


def _solve(method: str, layer: nn.Module, moments: Moments | None, rank: int):
    W = weight_matrix(layer)
    if method == "svd":
        return (*svd_factors(W, rank), {})
    if method == "asvd":
        return (*asvd_factors(W, moments.abs_mean, rank), {})
    if method == "svd_llm":
        return svd_llm_factors(W, moments.gram, rank)
    raise ValueError(f"baselines: unknown method {method!r}\nexpected one of {BASELINES}")


def apply_baseline(
    model: nn.Module, method: str, ranks: Mapping[str, int], moments: Mapping[str, Moments]
) -> BaselineResult:
    """Replace, in place, every layer named in ``ranks`` by a factored layer of that rank found
    by ``method`` (``"svd"``, ``"asvd"`` or ``"svd_llm"``) from the layer's ``moments``
    (:func:`collect_moments` on the original model; ``svd`` needs none). Returns per-layer facts.
    """
    result = BaselineResult()
    for name, rank in ranks.items():
        layer = model.get_submodule(name)
        start = time.perf_counter()
        up, down, info = _solve(method, layer, moments.get(name), rank)
        new = factored_layer(layer, up, down)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        result.layers[name] = {"rank": rank, "seconds": time.perf_counter() - start, **info}
    return result
