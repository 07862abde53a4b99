"""Calibration split across processes with ``torch.distributed`` (any backend: gloo, nccl).

When a default process group is initialised and has more than one rank, :func:`recover_
<torch_lowrank.recover_>` treats every rank's calibration batches as a shard of one data set:

* **Statistics are summed.** Every statistic is a sum (count, sum of rows, sum of outer
  products, about a shift), so the ranks agree on a common shift (the global mean) and
  ``all_reduce`` the re-centred sums: N processes that each saw a shard give the single-process
  statistics of all the data, to float rounding. Corrective recovery sums the paired statistics
  of ``(x~, x)`` the same way, wave by wave.
* **Reservoirs are merged** by weighted reservoir sampling: every row carries a uniform random
  key and the merged reservoir keeps the ``capacity`` largest keys of all ranks (an exact uniform
  sample of the union). Seed the ranks differently (``torch.manual_seed(seed + rank)``) so that
  their keys are independent.
* **Solving is split by layer.** Layers are dealt to ranks by estimated cost; each rank solves
  its own and broadcasts the factors, so wall time drops with more ranks. A failure on any rank
  is raised on every rank (no rank is left waiting) and the model is left as it was.

Tensors travel on the statistics' own device (CUDA with nccl, CPU with gloo). A model wrapped in
``DistributedDataParallel`` works as is; it runs forward passes that synchronise buffers, so give
every rank the same number of calibration batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .reservoir import Reservoir
from .solvers import Factors
from .stats import CovarianceStats, CrossStats

__all__ = [
    "active",
    "reduce_covariance",
    "reduce_cross",
    "reduce_reservoir",
    "owners",
    "solve_shared",
]


def active() -> bool:
    """Whether a process group with more than one rank is running.

    Example:
        >>> active()
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sum_(tensor: Tensor) -> Tensor:
    dist.all_reduce(tensor)
    return tensor


def _parts(stats: CovarianceStats, features: int, device: torch.device) -> tuple:
    """``(count, shift, sum, sum_sq)`` of ``stats``, zeros for an empty accumulator."""
    if stats is None or stats.count == 0:
        zero = torch.zeros(features, dtype=torch.float64, device=device)
        return (
            0,
            zero,
            zero.clone(),
            torch.zeros(features, features, dtype=torch.float64, device=device),
        )
    return stats.count, stats.shift, stats.sum, stats.sum_sq


def _global_mean(count: int, shift: Tensor, total: Tensor) -> tuple[int, Tensor]:
    """The number of rows of all ranks and their mean (``shift`` + ``total``/count locally)."""
    packed = torch.cat([shift * count + total, shift.new_tensor([float(count)])])
    _sum_(packed)
    n = int(round(packed[-1].item()))
    return n, packed[:-1] / max(n, 1)


def _recentred(a: tuple, b: tuple, product: Tensor, mean_a: Tensor, mean_b: Tensor) -> Tensor:
    """``sum (x_a - mean_a)(x_b - mean_b)^T`` from sums about the shifts in ``a`` and ``b``:
    ``x - m = (x - s) + (s - m)``."""
    count, shift_a, sum_a = a[0], a[1], a[2]
    shift_b, sum_b = b[1], b[2]
    if count == 0:
        return product
    da, db = shift_a - mean_a, shift_b - mean_b
    return product + torch.outer(sum_a, db) + torch.outer(da, sum_b) + count * torch.outer(da, db)


def _rebuild(features: int, count: int, mean: Tensor, total: Tensor, sum_sq: Tensor):
    stats = CovarianceStats(features)
    if count:
        stats.count, stats.shift, stats.sum, stats.sum_sq = count, mean, total, sum_sq
    return stats


@torch.no_grad()
def reduce_covariance(
    stats: CovarianceStats | None, features: int, device: torch.device
) -> CovarianceStats:
    """A new accumulator holding the rows of every rank (``stats`` is left unchanged).

    Collective: every rank must call it, in the same order. ``device`` is where an empty
    accumulator's zeros are made (the layer's device)."""
    parts = _parts(stats, features, device)
    count, mean = _global_mean(parts[0], parts[1], parts[2])
    centred = parts[2] + parts[0] * (parts[1] - mean)  # sum (x - mean)
    sum_sq = _recentred(parts, parts, parts[3].clone(), mean, mean)
    packed = _sum_(torch.cat([centred, sum_sq.flatten()]))
    return _rebuild(features, count, mean, packed[:features], packed[features:].view_as(sum_sq))


@torch.no_grad()
def reduce_cross(stats: CrossStats | None, features: int, device: torch.device) -> CrossStats:
    """A new :class:`~torch_lowrank.stats.CrossStats` holding the pairs of every rank.

    Collective, like :func:`reduce_covariance`."""
    tilde = _parts(None if stats is None else stats.tilde, features, device)
    original = _parts(None if stats is None else stats.original, features, device)
    cross = (
        torch.zeros(features, features, dtype=torch.float64, device=device)
        if stats is None or stats.count == 0
        else stats.sum_cross
    )
    count, mean_t = _global_mean(tilde[0], tilde[1], tilde[2])
    _, mean_o = _global_mean(original[0], original[1], original[2])
    pieces = [
        tilde[2] + tilde[0] * (tilde[1] - mean_t),
        original[2] + original[0] * (original[1] - mean_o),
        _recentred(tilde, tilde, tilde[3].clone(), mean_t, mean_t),
        _recentred(original, original, original[3].clone(), mean_o, mean_o),
        _recentred(tilde, original, cross.clone(), mean_t, mean_o),
    ]
    packed = _sum_(torch.cat([p.flatten() for p in pieces]))
    n, nn_ = features, features * features
    sums = packed[: 2 * n].split(n)
    squares = [t.view(n, n) for t in packed[2 * n :].split(nn_)]
    out = CrossStats(features)
    out.tilde = _rebuild(features, count, mean_t, sums[0], squares[0])
    out.original = _rebuild(features, count, mean_o, sums[1], squares[1])
    out.sum_cross = squares[2] if count else None
    return out


@torch.no_grad()
def reduce_reservoir(
    reservoir: Reservoir | None, capacity: int, width: int, device: torch.device
) -> Reservoir:
    """A new reservoir: the ``capacity`` rows with the largest keys over every rank.

    Collective, like :func:`reduce_covariance`."""
    world = dist.get_world_size()
    rows = torch.zeros(capacity, width, dtype=torch.float64, device=device)
    keys = torch.full((capacity,), -1.0, dtype=torch.float64, device=device)  # keys are >= 0
    count = torch.zeros(1, dtype=torch.float64, device=device)
    dtype = torch.float32
    if reservoir is not None and reservoir.count:
        kept = reservoir.rows.shape[0]
        rows[:kept], keys[:kept] = reservoir.rows.to(torch.float64), reservoir.keys
        count[0], dtype = reservoir.count, reservoir.rows.dtype
    flags = _sum_(torch.tensor([float(dtype == torch.float64)], device=device))
    dtype = torch.float64 if flags.item() else torch.float32
    gathered = [[torch.empty_like(t) for _ in range(world)] for t in (rows, keys, count)]
    for parts, tensor in zip(gathered, (rows, keys, count)):
        dist.all_gather(parts, tensor)
    merged = Reservoir.from_sample(capacity, rows[:0], keys[:0], 0)
    for part_rows, part_keys, part_count in zip(*gathered):
        valid = part_keys >= 0
        part = Reservoir.from_sample(
            capacity, part_rows[valid].to(dtype), part_keys[valid], int(round(part_count.item()))
        )
        merged.merge_(part)
    return merged


def owners(costs: Sequence[float]) -> list[int]:
    """Deal jobs of the given costs to the ranks, largest first, each to the least loaded rank
    (ties: the lowest rank); the same answer on every rank.

    Example:
        >>> owners([5.0, 1.0, 4.0, 2.0]) if not active() else None  # one rank: all on rank 0
        [0, 0, 0, 0]
    """
    world = dist.get_world_size() if active() else 1
    load = [0.0] * world
    owner = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += costs[index]
    return owner


def _metadata(plan: tuple) -> tuple:
    """A plan without its tensors: what travels as a Python object."""
    if plan[0] == "dense":
        return plan
    _, factors, _, seconds, folded = plan
    groups = [
        (f.rank, f.bias is not None, f.error, f.variance, f.info, f.spectrum.shape[0])
        for f in factors
    ]
    return ("factors", groups, seconds, folded, factors[0].up.shape[0], factors[0].down.shape[1])


def solve_shared(
    modules: Sequence[Any],
    solve: Callable[[Any], tuple],
    costs: Sequence[float],
    device_of: Callable[[Any], torch.device],
) -> dict[Any, tuple]:
    """Solve ``modules`` split across the ranks and share the plans with every rank.

    ``solve(module)`` returns a plan (``("dense", reason)`` or ``("factors", factors, layers,
    seconds, folded)``); a plan received from another rank gets its layers from
    ``module._factor_layers``. If any rank fails, every rank raises.

    Collective: every rank passes the same modules in the same order."""
    owner = owners(costs)
    rank = dist.get_rank()
    plans: dict[Any, tuple] = {}
    failure: str | None = None
    error: BaseException | None = None
    try:
        for module, who in zip(modules, owner):
            if who == rank:
                plans[module] = solve(module)
    except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
        failure, error = f"{type(err).__name__}: {err}", err
    for plan in plans.values():
        for f in plan[1] if plan[0] == "factors" else []:
            f.info["solved_on_rank"] = rank
    failures: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    if error is not None:
        raise error
    for who, message in enumerate(failures):
        if message is not None:
            raise RuntimeError(f"recover_: rank {who} failed; the model is unchanged\n{message}")
    metadata: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(
        metadata, {i: _metadata(plans[m]) for i, m in enumerate(modules) if owner[i] == rank}
    )
    for index, (module, who) in enumerate(zip(modules, owner)):
        meta = metadata[who][index]
        if meta[0] == "dense":
            plans[module] = meta
            continue
        _, groups, seconds, folded, m, n = meta
        device = device_of(module)
        factors = []
        for j, (r, has_bias, err, variance, info, length) in enumerate(groups):
            if who == rank:
                f = plans[module][1][j]
                tensors = [f.up, f.down, f.spectrum] + ([f.bias] if has_bias else [])
                tensors = [t.to(torch.float64).contiguous() for t in tensors]
            else:
                shapes = [(m, r), (r, n), (length,)] + ([(m,)] if has_bias else [])
                tensors = [torch.empty(s, dtype=torch.float64, device=device) for s in shapes]
            for tensor in tensors:
                dist.broadcast(tensor, src=who)
            up, down, spectrum = tensors[:3]
            bias = tensors[3] if has_bias else None
            factors.append(Factors(up, down, bias, err, variance, spectrum, info))
        if who != rank:
            plans[module] = ("factors", factors, module._factor_layers(factors), seconds, folded)
    return plans
