"""Byte budgets: global allocation that chooses between rank and precision.

Quantizing a layer's factors (:mod:`torch_lowrank.quantize`) stores each weight in 8 bits
instead of 32, and adds an error :func:`quantization_error` predicts from the layer's
statistics. Under a byte budget every layer has a menu of (bytes, error) choices: each rank in
its own dtype or quantized, and the dense weight in its own dtype or quantized (a layer whose
spectrum is flat is best kept dense in 8 bits). Errors are the normalised, weighted eigenvalue
tails of :mod:`torch_lowrank.allocation` plus the quantization error in the same units, so they
add up across layers. The greedy water-filling of :func:`~torch_lowrank.allocation.allocate`
runs over each menu's lower convex hull (the steps that remove the most error per byte, in
order), then spends what is left on the single upgrades that remove the most error and fit.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from .allocation import LayerBudget, QuantizedError
from .problem import LayerProblem

__all__ = ["Choice", "allocate_bytes", "bytes_total", "quantization_error"]


@dataclass(frozen=True)
class Choice:
    """What a byte budget chose for one layer: a rank (``None``: dense) and whether its
    weights are quantized in the layer's scheme."""

    rank: int | None
    quantized: bool = False


@dataclass(frozen=True)
class Option:
    """One entry of a layer's menu: its bytes, its weighted normalised error, the choice."""

    bytes: float
    error: float
    choice: Choice


def _options(layer: LayerBudget, round_to: int) -> list[Option]:
    """Every (bytes, weighted normalised error, choice) of the layer, cheapest first."""
    (m, n), g, size, scheme = layer.shape, layer.groups, layer.element_size, layer.scheme
    total = float(layer.spectrum.sum())
    scale = layer.weight / total if total > 0 else 0.0
    tails = (total - layer.spectrum.cumsum(0)).clamp_min(0).tolist()
    quantized = scheme is not None and layer.quantized is not None
    options = []
    for r in layer.ranks(round_to):
        options.append(Option(g * r * (m + n) * size, tails[r - 1] * scale, Choice(r)))
        if quantized:
            cost = scheme.nbytes(g * r, n) + scheme.nbytes(g * m, r)
            error = (tails[r - 1] + float(layer.quantized.factors[r - 1])) * scale
            options.append(Option(cost, error, Choice(r, True)))
    if not options or layer.max_rank is None:  # dense, unless a rank bound asks for factors
        options.append(Option(g * m * n * size, 0.0, Choice(None)))
        if quantized and layer.quantized.dense is not None:
            error = layer.quantized.dense * scale
            options.append(Option(scheme.nbytes(g * m, n), error, Choice(None, True)))
    return sorted(options, key=lambda o: (o.bytes, o.error))


def _hull(options: list[Option]) -> list[Option]:
    """The lower convex hull of the options: each step removes less error per byte than the
    one before (points on a chord are kept, so equal steps are bought one at a time)."""
    hull: list[Option] = []
    for point in options:
        if hull and point.error >= hull[-1].error:
            continue  # costs more and removes nothing
        while len(hull) >= 2:
            (c0, e0), (c1, e1) = (hull[-2].bytes, hull[-2].error), (hull[-1].bytes, hull[-1].error)
            if (e1 - e0) * (point.bytes - c0) <= (point.error - e0) * (c1 - c0):
                break  # hull[-1] is on or below the chord: it stays
            hull.pop()
        hull.append(point)
    return hull


def allocate_bytes(layers: list[LayerBudget], ratio: float, round_to: int = 1) -> dict[str, Choice]:
    """Ranks and precisions that keep at most ``ratio`` of the layers' bytes (each dense, in
    its own dtype) and minimise the summed normalised error, quantization's included.

    A layer with a ``scheme`` and a ``quantized`` error may store its factors, or its dense
    weight, in that scheme; the others choose a rank (or dense) only.

    Example:
        >>> fast = LayerBudget("a", (8, 8), torch.tensor([8.0, 0, 0, 0, 0, 0, 0, 0]))
        >>> slow = LayerBudget("b", (8, 8), torch.ones(8))
        >>> allocate_bytes([fast, slow], ratio=0.5)  # no scheme: ranks only
        {'a': Choice(rank=1, quantized=False), 'b': Choice(rank=3, quantized=False)}
    """
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"allocate_bytes: round_to must be an int >= 1\nbut got {round_to!r}")
    total = sum(layer.dense_cost("params") * layer.element_size for layer in layers)
    allowed = ratio * total * (1 + 1e-12)
    options = [_options(layer, round_to) for layer in layers]
    hulls = [_hull(o) for o in options]
    at = [hull[0] for hull in hulls]
    spent = sum(o.bytes for o in at)
    if spent > allowed:
        raise ValueError(
            f"allocate_bytes: ratio={ratio} is below what the cheapest choices already keep\n"
            f"({spent / total:.3f} of the bytes)"
        )
    step = [0] * len(layers)
    heap: list = []

    def push(index: int) -> None:
        hull, j = hulls[index], step[index]
        if j + 1 < len(hull):
            cost, gain = hull[j + 1].bytes - hull[j].bytes, hull[j].error - hull[j + 1].error
            heapq.heappush(heap, (-gain / cost, layers[index].name, index, cost))

    for index in range(len(layers)):
        push(index)
    while heap:  # water-filling along the hulls
        _, _, index, cost = heapq.heappop(heap)
        if spent + cost > allowed:
            continue  # this layer's next step does not fit; cheaper steps elsewhere may
        spent += cost
        step[index] += 1
        at[index] = hulls[index][step[index]]
        push(index)
    while True:  # the remainder: the single upgrade that removes the most error and fits
        best = max(
            (
                (at[i].error - o.error, -o.bytes, i, o)
                for i in range(len(layers))
                for o in options[i]
                if o.error < at[i].error and spent + o.bytes - at[i].bytes <= allowed
            ),
            default=None,
            key=lambda t: t[:2],
        )
        if best is None:
            break
        _, _, index, option = best
        spent += option.bytes - at[index].bytes
        at[index] = option
    return {layer.name: o.choice for layer, o in zip(layers, at)}


def bytes_total(choices: dict[str, Choice], layers: list[LayerBudget]) -> float:
    """The bytes of a byte-budget allocation (as :func:`allocate_bytes` counts them).

    Example:
        >>> layers = [LayerBudget("a", (8, 8), torch.ones(8))]  # float32 weights, no scheme
        >>> bytes_total({"a": Choice(2)}, layers)  # 2 (8 + 8) weights of 4 bytes
        128.0
    """
    by_name = {layer.name: layer for layer in layers}
    total = 0.0
    for name, choice in choices.items():
        layer = by_name[name]
        (m, n), g, size = layer.shape, layer.groups, layer.element_size
        r = choice.rank
        if choice.quantized:
            scheme = layer.scheme
            total += (
                scheme.nbytes(g * m, n)
                if r is None
                else scheme.nbytes(g * r, n) + scheme.nbytes(g * m, r)
            )
        else:
            total += g * m * n * size if r is None else g * r * (m + n) * size
    return total


def quantization_error(problem: LayerProblem, bits: int = 8) -> QuantizedError:
    """The output error that symmetric ``bits``-bit quantization with one scale per row adds
    to a layer, for its factors at every rank and for its dense weight.

    Model: a row quantized with step ``s = max|row| / (2^(bits-1) - 1)`` gains independent
    rounding noise of variance ``s^2 / 12`` in every entry. Noise ``E`` in a weight ``M`` adds
    ``E||E z||^2 = sum_i s_i^2 / 12 * E||z||^2`` to the output for inputs ``z``. The factors are
    those of ``linear``: ``up = P_r`` (orthonormal columns, inputs ``z = P_r^T W x`` of energy
    ``sum_{k<=r} lambda_k + (p_k^T W mu)^2``) and ``down = P_r^T W`` (inputs ``x`` of energy
    ``tr C + |mu|^2``; with output-space statistics that energy is estimated as isotropic).

    Example:
        >>> from torch_lowrank.problem import GroupData
        >>> w = torch.eye(4, dtype=torch.float64)
        >>> p = LayerProblem("fc", (GroupData(w, None, torch.zeros(4),
        ...                  torch.eye(4, dtype=torch.float64)),), rank=1, energy=None, seen=9)
        >>> quantization_error(p).dense == 4 * 4 / (12 * 127**2)  # 4 rows, E|x|^2 = 4
        True
    """
    qmax = 2 ** (bits - 1) - 1
    factors, dense = None, 0.0
    for group in problem.groups:
        w = group.weight.detach().double()
        (m, n), k = w.shape, min(w.shape)
        mean = torch.zeros(m if problem.outputs else n, dtype=w.dtype)
        mean = mean if group.mean is None else group.mean.double()
        cov = group.cov.double()
        cov = (cov + cov.T) / 2
        if problem.outputs:  # moments of W x
            lam, p = torch.linalg.eigh(cov)
            lam, p = lam.flip(0)[:k].clamp_min(0), p.flip(1)[:, :k]
            z_mean = p.T @ mean
            energy = float((cov.trace() + mean @ mean) * n / w.square().sum().clamp_min(1e-300))
        else:
            values, vectors = torch.linalg.eigh(cov)
            root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
            p, sv, _ = torch.linalg.svd(w @ root, full_matrices=False)
            lam, p = sv[:k].square(), p[:, :k]
            z_mean = p.T @ (w @ mean)
            energy = float(cov.trace() + mean @ mean)
        up = p.square().cummax(dim=1).values.sum(0)  # sum_i max_{k<=r} P_ik^2
        down = (p.T @ w).square().amax(dim=1).cumsum(0)
        noise = (up * (lam + z_mean.square()).cumsum(0) + down * energy) / (12 * qmax**2)
        factors = noise if factors is None else factors + noise
        dense += float(w.square().amax(dim=1).sum()) * energy / (12 * qmax**2)
    return QuantizedError(factors, dense)
