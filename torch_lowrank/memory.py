"""Where the memory of a recovery goes, and keeping staged results small (``docs/scaling.md``).

Corrective recovery holds, until the model is written: the dense weights of every converted
layer (the model is not copied), the staged plans of the layers already solved, the paired
statistics of one wave (:class:`~torch_lowrank.cross.CrossStats`, frozen into moments for the
solve), the block cache, and one solve's working set. These helpers measure the parts for
``report.info`` and shed what a staged plan no longer needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import Tensor

from .plan import Plan

__all__ = ["tensor_bytes", "solve_working_bytes", "plan_bytes", "shed_factors"]


def tensor_bytes(tensors: Iterable[Tensor | None]) -> int:
    """The bytes held by ``tensors`` (``None`` entries count nothing).

    Example:
        >>> tensor_bytes([torch.zeros(4), None, torch.zeros(2, dtype=torch.float64)])
        32
    """
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def solve_working_bytes(m: int, n: int, groups: int = 1) -> int:
    """An estimate of what a corrective ``linear`` solve of ``groups`` ``m x n`` weights
    allocates besides its moments, in bytes: float64 ``W``, the damped matrix and its
    Cholesky factor (``2 n^2``), the regression map and its products (``3 m n``), and the
    eigen-solve of the smaller space (``4 min(m, n)^2``).

    Example:
        >>> solve_working_bytes(768, 3072) / 2**20
        234.0
    """
    return 8 * groups * (2 * n * n + 4 * m * n + 4 * min(m, n) ** 2)


def plan_bytes(plan: Plan) -> int:
    """Memory held by a staged plan: its factor layers and what its factors still hold.

    Example:
        >>> plan_bytes(Plan.dense("kept"))
        0
    """
    held = (
        0 if plan.layers is None else sum(tensor_bytes(layer.parameters()) for layer in plan.layers)
    )
    for f in plan.factors or []:
        shared = {t.data_ptr() for layer in plan.layers or () for t in layer.parameters()}
        tensors = (f.up, f.down, f.bias, f.spectrum)  # a bias-free layer's bias is None
        held += tensor_bytes(t for t in tensors if t is not None and t.data_ptr() not in shared)
    return held


def shed_factors(plan: Plan) -> Plan:
    """``plan`` with its float64 factors replaced by views of the factor layers it built
    (or copies in their dtype where the layout differs): until the model is written the plan
    is held only for its layers and its report row (rank, bias, error, variance, spectrum).

    Example:
        >>> from torch_lowrank import LowRankLinear
        >>> from torch_lowrank.options import make_options
        >>> from torch_lowrank.plan import plan_layer
        >>> layer = LowRankLinear.from_linear(torch.nn.Linear(8, 6), rank=2)
        >>> _ = layer(torch.randn(32, 8))
        >>> plan = shed_factors(plan_layer(layer, "linear", make_options("linear")))
        >>> plan.factors[0].down.data_ptr() == plan.layers[0].weight.data_ptr()
        True
    """
    if plan.factors is None or plan.layers is None:
        return plan
    down, up = (layer.weight.detach() for layer in plan.layers)
    plan.factors = [
        replace(
            f,
            up=_shared(f.up, up, len(plan.factors)),
            down=_shared(f.down, down, len(plan.factors)),
        )
        for f in plan.factors
    ]
    return plan


def _shared(factor: Tensor, weight: Tensor, groups: int) -> Tensor:
    """``factor`` as a view of the layer ``weight`` built from it, or a copy in its dtype."""
    copy = factor.to(weight.dtype)
    if groups == 1 and weight.numel() == factor.numel():
        view = weight.reshape(factor.shape)
        if view.data_ptr() == weight.data_ptr() and torch.equal(view, copy.to(view.device)):
            return view
    return copy
