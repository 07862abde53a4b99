"""Calibration split across processes with ``torch.distributed`` (any backend: gloo, nccl).

When a default process group is initialised and has more than one rank, :func:`recover_
<torch_lowrank.recover_>` treats every rank's calibration batches as a shard of one data set:

* **Statistics are summed** by their own collectives: every statistic is a sum (count, sum of
  rows, sum of outer products, about a shift), so the ranks agree on a common shift (the global
  mean) and ``all_reduce`` the re-centred sums
  (:meth:`CovarianceStats.all_reduce <torch_lowrank.stats.CovarianceStats.all_reduce>`): N
  processes that each saw a shard give the single-process statistics of all the data, to float
  rounding. Corrective recovery sums the paired statistics of ``(x~, x)`` the same way, wave by
  wave (:meth:`CrossStats.all_reduce <torch_lowrank.cross.CrossStats.all_reduce>`).
* **Reservoirs are merged** by weighted reservoir sampling: every row carries a uniform random
  key and the merged reservoir keeps the ``capacity`` largest keys of all ranks (an exact uniform
  sample of the union; :meth:`Reservoir.all_reduce
  <torch_lowrank.reservoir.Reservoir.all_reduce>`). Seed the ranks differently
  (``torch.manual_seed(seed + rank)``) so that their keys are independent.
* **Solving is split by layer.** Layers are dealt to ranks by estimated cost; each rank solves
  its own and broadcasts the factors, so wall time drops with more ranks. A failure on any rank
  is raised on every rank (no rank is left waiting) and the model is left as it was.

Tensors travel on the statistics' own device (CUDA with nccl, CPU with gloo). A model wrapped in
``DistributedDataParallel`` works as is; it runs forward passes that synchronise buffers, so give
every rank the same number of calibration batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .model import progress_bar, world_size
from .observer import Observation
from .plan import Plan
from .reservoir import Reservoir
from .solvers import Factors
from .stats import CovarianceStats

__all__ = ["active", "owners", "solve_each", "solve_shared", "summed_observations"]


def active() -> bool:
    """Whether a process group with more than one rank is running.

    Example:
        >>> active()
        False
    """
    return world_size() > 1


def summed_observations(
    modules: Sequence[nn.Module], device_of: Callable[[nn.Module], torch.device]
) -> dict[nn.Module, Observation]:
    """Each module's first-pass statistics summed over all ranks (their reservoirs merged);
    the modules' own statistics are not changed.

    Collective: every rank passes the same modules in the same order.

    Example:
        >>> import tempfile, torch_lowrank as tl
        >>> from torch_lowrank.pairing import device_of
        >>> dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(),
        ...                         rank=0, world_size=1)
        >>> layer = tl.LowRankLinear.from_linear(nn.Linear(6, 8), rank=1, samples=4)
        >>> _ = layer(torch.randn(10, 6))
        >>> summed_observations([layer], device_of)[layer].samples_seen
        10
        >>> dist.destroy_process_group()
    """
    summed = {}
    for module in modules:
        seen, device = module.observer.observation(), device_of(module)
        m, n = module.matrix_shape
        width = m if seen.space == "output" else n
        inputs = torch.tensor([float(seen.inputs_seen)], device=device)
        dist.all_reduce(inputs)
        stats = seen.stats or [None] * module.groups
        reservoirs = None
        if module.observer.samples:
            own = seen.reservoirs or [None] * module.groups
            reservoirs = [Reservoir.all_reduce(r, module.observer.samples, n, device) for r in own]
        summed[module] = Observation(
            seen.space,
            [CovarianceStats.all_reduce(s, width, device) for s in stats],
            reservoirs,
            int(inputs.item()),
        )
    return summed


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


@dataclass(frozen=True)
class _GroupMeta:
    """One group's factors without their tensors: what travels as a Python object."""

    rank: int
    has_bias: bool
    error: float
    variance: float
    info: dict
    spectrum_length: int


def _metadata(plan: Plan) -> dict:
    """A plan without its tensors: what travels as a Python object."""
    if plan.factors is None:
        return {"dense": plan}
    groups = [
        _GroupMeta(f.rank, f.bias is not None, f.error, f.variance, f.info, f.spectrum.shape[0])
        for f in plan.factors
    ]
    shape = (plan.factors[0].up.shape[0], plan.factors[0].down.shape[1])
    return {"groups": groups, "seconds": plan.seconds, "folded": plan.folded, "shape": shape}


def solve_each(
    modules: Sequence[Any],
    solve: Callable[[Any], Plan],
    cost: Callable[[Any], float],
    device_of: Callable[[Any], torch.device],
    progress: bool = False,
) -> dict[Any, Plan]:
    """``solve(module)`` for every module: in this process, or with several processes shared
    out by ``cost`` (:func:`solve_shared`; collective).

    Example:
        >>> solve_each(["a", "b"], lambda m: Plan.dense(m), len, None)["b"].dense_reason
        'b'
    """
    if world_size() > 1:
        return solve_shared(modules, solve, [cost(m) for m in modules], device_of)
    return {m: solve(m) for m in progress_bar(modules, "recovering", progress)}


def solve_shared(
    modules: Sequence[Any],
    solve: Callable[[Any], Plan],
    costs: Sequence[float],
    device_of: Callable[[Any], torch.device],
) -> dict[Any, Plan]:
    """Solve ``modules`` split across the ranks and share the plans with every rank.

    ``solve(module)`` returns a :class:`~torch_lowrank.plan.Plan`; a plan received from
    another rank gets its layers from ``module.factor_layers``. If any rank fails, every rank
    raises.

    Collective: every rank passes the same modules in the same order.

    Example:
        >>> import tempfile
        >>> dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(),
        ...                         rank=0, world_size=1)
        >>> plans = solve_shared(["a", "b"], lambda m: Plan.dense(m), [1.0, 2.0], None)
        >>> [plan.dense_reason for plan in plans.values()]
        ['a', 'b']
        >>> dist.destroy_process_group()
    """
    owner = owners(costs)
    rank = dist.get_rank()
    plans: dict[Any, Plan] = {}
    failure: str | None = None
    error: BaseException | None = None
    try:
        for module, who in zip(modules, owner):
            if who == rank:
                plans[module] = solve(module)
    except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
        failure, error = f"{type(err).__name__}: {err}", err
    for plan in plans.values():
        for f in plan.factors or []:
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
        if "dense" in meta:
            plans[module] = meta["dense"]
            continue
        m, n = meta["shape"]
        device = device_of(module)
        factors = []
        for j, group in enumerate(meta["groups"]):
            if who == rank:
                f = plans[module].factors[j]
                tensors = [f.up, f.down, f.spectrum] + ([f.bias] if group.has_bias else [])
                tensors = [t.to(torch.float64).contiguous() for t in tensors]
            else:
                r = group.rank
                shapes = [(m, r), (r, n), (group.spectrum_length,)]
                shapes += [(m,)] if group.has_bias else []
                tensors = [torch.empty(s, dtype=torch.float64, device=device) for s in shapes]
            for tensor in tensors:
                dist.broadcast(tensor, src=who)
            up, down, spectrum = tensors[:3]
            bias = tensors[3] if group.has_bias else None
            factors.append(
                Factors(up, down, bias, group.error, group.variance, spectrum, group.info)
            )
        if who != rank:
            layers = module.factor_layers(factors)
            plans[module] = Plan(factors, layers, meta["seconds"], meta["folded"])
    return plans
