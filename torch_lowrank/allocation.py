"""Ranks for all layers at once under one budget, from their data-driven spectra.

The error of keeping rank ``r`` of a layer is the tail of its output-covariance spectrum
(``docs/methods.md``), so the summed normalised error ``sum_j tail_j(r_j) / total_j`` is
separable across layers, and every extra unit of rank removes ``lambda_j[r] / total_j`` of it
for a fixed price: ``g (m + n)`` parameters (``g`` groups), or that times the output positions
for a multiply-accumulate budget. The eigenvalues fall, so each layer's gains per unit of price fall
too, and a greedy water-filling that always buys the best remaining gain per price is the optimum
of the problem with fractional ranks; with whole ranks it may leave at most one purchase per
layer unmade (a knapsack remainder), which the tests bound against brute force.

A layer whose rank would reach its break-even point (``r (m + n) >= m n``) is kept dense: the
dense layer then costs no more and loses nothing. The budget counts dense layers in full.

Byte budgets, which choose between rank and precision, are in :mod:`torch_lowrank.bytes_budget`.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from torch import Tensor

from .eigen import descending_eigh
from .problem import LayerProblem
from .quantize import Scheme

__all__ = [
    "LayerBudget",
    "QuantizedError",
    "allocate",
    "budget_total",
    "output_spectrum",
    "spectrum",
]


def output_spectrum(weight: Tensor, cov: Tensor) -> Tensor:
    """The descending eigenvalues of the output covariance ``W C W^T`` (``min(m, n)`` of them),
    computed in the smaller of the two spaces: what :func:`~torch_lowrank.solvers.linear` keeps
    and drops.

    Example:
        >>> w = torch.randn(6, 3, dtype=torch.float64)
        >>> torch.allclose(output_spectrum(w, torch.eye(3, dtype=torch.float64)),
        ...                torch.linalg.svdvals(w).square())
        True
    """
    W = weight.detach().to(torch.float64)
    cov = cov.to(device=W.device, dtype=torch.float64)
    m, n = W.shape
    if m <= n:
        return torch.linalg.eigvalsh(W @ cov @ W.T).flip(0).clamp_min(0.0)
    full = descending_eigh(cov)
    half = full.vectors * full.values.sqrt()
    return torch.linalg.eigvalsh(half.T @ (W.T @ W) @ half).flip(0).clamp_min(0.0)


@dataclass
class QuantizedError:
    """The output error quantization adds to a layer, in the units of its spectrum.

    Attributes:
        factors: at index ``r - 1``, the error added by quantizing the factors of rank ``r``.
        dense: the error added by quantizing the dense weight (``None``: it cannot be).
    """

    factors: Tensor
    dense: float | None


@dataclass
class LayerBudget:
    """One layer as the allocation sees it.

    Attributes:
        name: the layer's name.
        shape: one group's weight as a matrix ``(m, n)``.
        spectrum: the descending eigenvalues of the output covariance, summed over groups,
            length ``min(m, n)``.
        groups: independent blocks sharing one rank (a grouped conv's groups).
        positions: output positions per sample (1 for Linear): the multiply-accumulate weight.
        min_rank / max_rank: bounds on the rank (``max_rank`` None: up to break-even).
        weight: what one unit of the layer's normalised error costs, against the other layers
            (1: every layer alike; a loss sensitivity makes the errors one currency).
        element_size: bytes of one weight in the layer's own dtype (byte budgets).
        scheme / quantized: the quantization a byte budget may choose for the layer and the
            error it adds (``None``: the layer stays in its own dtype).
    """

    name: str
    shape: tuple[int, int]
    spectrum: Tensor
    groups: int = 1
    positions: int = 1
    min_rank: int = 1
    max_rank: int | None = None
    weight: float = 1.0
    element_size: int = 4
    scheme: Scheme | None = None
    quantized: QuantizedError | None = None

    def unit_cost(self, budget: str) -> int:
        """The price of one unit of rank."""
        m, n = self.shape
        return self.groups * (m + n) * (self.positions if budget == "flops" else 1)

    def dense_cost(self, budget: str) -> int:
        m, n = self.shape
        return self.groups * m * n * (self.positions if budget == "flops" else 1)

    @property
    def largest_saving_rank(self) -> int:
        """The largest rank whose factors hold fewer weights than the dense layer (0: none)."""
        m, n = self.shape
        return min((m * n - 1) // (m + n), m, n)

    def ranks(self, round_to: int = 1) -> range:
        """The ranks an allocation may give the layer: multiples of ``round_to`` from
        ``min_rank`` (at least ``round_to``) to the largest that saves weights and is at most
        ``max_rank``; empty when no rank saves anything.

        Example:
            >>> LayerBudget("a", (8, 8), torch.ones(8)).ranks(round_to=2)
            range(2, 3, 2)
        """
        top = self.largest_saving_rank
        if self.max_rank is not None:
            top = min(top, self.max_rank)
        top -= top % round_to
        start = min(max(self.min_rank, round_to), top) if top else 0
        start += (-start) % round_to
        return range(start, top + 1, round_to) if 0 < start <= top else range(0)


def allocate(
    layers: list[LayerBudget], ratio: float, budget: str = "params", round_to: int = 1
) -> dict[str, int | None]:
    """Ranks that keep at most ``ratio`` of the layers' total cost and minimise the summed
    normalised error (each layer's times its ``weight``); ``None`` means "keep dense".

    Args:
        layers: the layers to allocate.
        ratio: the fraction of the total dense cost (weights, or multiply-accumulates) kept.
        budget: ``"params"`` or ``"flops"``.
        round_to: ranks are multiples of this (hardware-friendly); the budget still holds.

    Example:
        >>> fast = LayerBudget("a", (8, 8), torch.tensor([8.0, 0, 0, 0, 0, 0, 0, 0]))
        >>> slow = LayerBudget("b", (8, 8), torch.ones(8))
        >>> allocate([fast, slow], ratio=0.5)  # a needs one rank, b gets the rest
        {'a': 1, 'b': 3}
    """
    if budget not in ("params", "flops"):
        raise ValueError(f"allocate: budget must be 'params' or 'flops'\nbut got {budget!r}")
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"allocate: round_to must be an int >= 1\nbut got {round_to!r}")
    total = sum(layer.dense_cost(budget) for layer in layers)
    allowed = ratio * total
    ranks: dict[str, int | None] = {}
    state = []  # (layer, current rank, normalised gains)
    spent = 0
    for layer in layers:
        choices = layer.ranks(round_to)
        if not choices:  # no rank saves anything: dense
            ranks[layer.name] = None
            spent += layer.dense_cost(budget)
            continue
        total_energy = float(layer.spectrum.sum())
        gains = (
            (layer.spectrum * (layer.weight / total_energy))
            if total_energy > 0
            else torch.zeros_like(layer.spectrum)
        )
        ranks[layer.name] = choices.start
        spent += choices.start * layer.unit_cost(budget)
        state.append((layer, choices[-1], gains.tolist()))

    if spent > allowed:
        raise ValueError(
            f"allocate: ratio={ratio} is below what the smallest ranks already keep\n"
            f"({spent / total:.3f} of the {budget} with rank {max(1, round_to)} everywhere)"
        )
    # Greedy water-filling: buy round_to units of rank where they remove the most error per cost.
    heap = []
    for index, (layer, top, gains) in enumerate(state):
        _push(heap, index, layer, ranks[layer.name], top, gains, round_to, budget)
    while heap:
        _, _, index, step_cost = heapq.heappop(heap)
        layer, top, gains = state[index]
        if spent + step_cost > allowed:
            continue  # this layer's next step does not fit; cheaper steps elsewhere may
        spent += step_cost
        ranks[layer.name] += round_to
        _push(heap, index, layer, ranks[layer.name], top, gains, round_to, budget)
    return ranks


def _push(heap, index, layer, rank, top, gains, round_to, budget) -> None:
    if rank + round_to > top:
        return
    gain = sum(gains[rank : rank + round_to])
    cost = round_to * layer.unit_cost(budget)
    heapq.heappush(heap, (-gain / cost, layer.name, index, cost))  # ties: by name, not order


def budget_total(ranks: dict[str, int | None], layers: list[LayerBudget], budget: str) -> int:
    """The cost of an allocation (dense layers in full).

    Example:
        >>> layers = [LayerBudget("a", (8, 8), torch.ones(8)),
        ...           LayerBudget("b", (8, 4), torch.ones(4))]
        >>> budget_total({"a": 2, "b": None}, layers, "params")  # 2 (8 + 8) + 8 x 4
        64
    """
    by_name = {layer.name: layer for layer in layers}
    return sum(
        by_name[name].dense_cost(budget) if r is None else r * by_name[name].unit_cost(budget)
        for name, r in ranks.items()
    )


def spectrum(problem: LayerProblem) -> Tensor:
    """The descending eigenvalues of the output covariance ``W C W^T`` summed over the groups
    (``min(m, n)`` of them): what ``linear`` keeps and drops at each rank, for allocation.

    Example:
        >>> from torch_lowrank.problem import GroupData
        >>> w = torch.randn(3, 5, dtype=torch.float64)
        >>> p = LayerProblem("fc", (GroupData(w, None, torch.zeros(5),
        ...                  torch.eye(5, dtype=torch.float64)),), rank=1, energy=None, seen=9)
        >>> torch.allclose(spectrum(p), torch.linalg.svdvals(w).square())
        True
    """
    total = None
    for group in problem.groups:
        if problem.outputs:
            cov = group.cov
            values = torch.linalg.eigvalsh((cov + cov.T) / 2).flip(0).clamp_min(0.0)
        else:
            values = output_spectrum(group.weight, group.cov)
        total = values if total is None else total + values
    return total
