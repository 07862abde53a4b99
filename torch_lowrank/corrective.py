"""Corrective recovery: every layer repairs the error of the layers before it (``docs/methods.md``).

Each layer is solved with the compressed network's own input ``x~`` and the original network's
target ``W x + b``. Layers are solved wave by wave in the order they execute; for every wave the
calibration data runs twice through the converted model itself (no copy of the model is made):

* an *original* pass, where every calibrating module runs its dense layer, captures ``x``;
* a *compressed* pass, where the modules already solved are stood in for by their staged
  factors (swapped in at every name for the pass, then put back), captures ``x~`` for the
  same samples.

The pairs feed :class:`~torch_lowrank.cross.CrossStats` (and, for the activation-aware methods, a
reservoir of concatenated ``[x~, x]`` rows), and the wave is solved with
:func:`~torch_lowrank.solvers.corrective`. Nothing is installed until every wave is solved, so a
failure leaves the model as it was. Layers that read the same input tensor (attention's q/k/v)
share a wave, so a wave costs two passes over the data whatever its width.

This is not GPTQ-style "sequential" calibration, which feeds ``x~`` but targets ``W x~``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from .blocks import BlockCache, Chain, find_chains
from .cross import CrossStats
from .model import module_names, stood_in, world_size
from .observer import group_parts
from .options import Options
from .problem import Plan, plan_layer
from .refine import BlockRefinement, RefineOptions, refine_block
from .reservoir import Reservoir

__all__ = ["schedule", "corrective_plans"]


def _capture(modules: Iterable[nn.Module], store: dict[nn.Module, list[Tensor]]) -> list:
    """Forward pre-hooks that append each module's input to ``store[module]``."""

    def hook(module: nn.Module, args: tuple) -> None:
        store[module].append(args[0].detach())

    # The library's own hooks: nn.Module's registration, not the one that records user hooks.
    return [nn.Module.register_forward_pre_hook(module, hook) for module in modules]


@torch.no_grad()
def schedule(
    model: nn.Module, modules: list[nn.Module], batch: Any, forward_fn: Callable
) -> list[list[nn.Module]]:
    """Group ``modules`` into waves by the order in which they first execute on ``batch``;
    consecutive modules that read the same input tensor share a wave. Modules that never run
    form a last wave.

    Example:
        >>> import torch_lowrank as tl
        >>> model = tl.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), rank=2)
        >>> [[m.layer_name for m in wave] for wave in schedule(model, list(model)[::2],
        ...     torch.randn(4, 8), tl.default_forward)]
        [['0'], ['2']]
    """
    order: list[tuple[nn.Module, Tensor]] = []

    def hook(module: nn.Module, args: tuple) -> None:
        if all(module is not seen for seen, _ in order):
            order.append((module, args[0]))

    handles = [nn.Module.register_forward_pre_hook(module, hook) for module in modules]
    try:
        forward_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    waves: list[list[nn.Module]] = []
    previous: Tensor | None = None
    for module, x in order:
        if waves and x is previous:
            waves[-1].append(module)
        else:
            waves.append([module])
        previous = x
    never = [m for m in modules if all(m is not seen for seen, _ in order)]
    return waves + ([never] if never else [])


@torch.no_grad()
def _accumulate_wave(
    wave: list[nn.Module], runs: Iterable[Callable[[bool], Any]], with_samples: bool
) -> dict[nn.Module, list[tuple[CrossStats, Reservoir | None]]]:
    """Pair the wave's inputs in the original and the compressed network, batch by batch.

    Each of ``runs`` runs one batch (through the whole model or through the wave's block) as
    the original network (``run(False)``) or as the compressed one (``run(True)``)."""
    paired: dict[nn.Module, list[tuple[CrossStats, Reservoir | None]]] = {}
    for run in runs:
        inputs: dict[bool, dict[nn.Module, list[Tensor]]] = {}
        for compressed in (False, True):
            store: dict[nn.Module, list[Tensor]] = {m: [] for m in wave}
            handles = _capture(wave, store)
            try:
                run(compressed)
            finally:
                for handle in handles:
                    handle.remove()
            inputs[compressed] = store
        for module in wave:
            n, groups, samples = module.matrix_shape[1], module.groups, module.observer.samples
            keep = with_samples and samples > 0  # samples=0: the solve names the layer
            if module not in paired:
                paired[module] = [
                    (
                        CrossStats(n, module.offload),
                        Reservoir(samples, module.offload) if keep else None,
                    )
                    for _ in range(groups)
                ]
            for x, x_tilde in zip(inputs[False][module], inputs[True][module]):
                for rows, rows_tilde in zip(module.input_rows(x), module.input_rows(x_tilde)):
                    parts = zip(group_parts(rows, n, groups), group_parts(rows_tilde, n, groups))
                    for (cross, reservoir), (part, part_tilde) in zip(paired[module], parts):
                        cross.update(part_tilde, part)
                        if reservoir is not None:
                            reservoir.update(torch.cat([part_tilde, part], 1))
    return paired


def device_of(module: nn.Module) -> torch.device:
    """The device of a calibrating module's dense weight."""
    return module.matrices()[0][0].device


def solve_cost(module: nn.Module, method: str, fold: bool) -> float:
    """A layer's solve cost estimate, for sharing solves between ranks: ``groups m n min(m, n)``
    for a closed form; an activation-aware solve adds ``groups m n`` per reservoir row and
    iteration (200 iterations assumed), which dominates."""
    m, n = module.matrix_shape
    cost = module.groups * m * n * min(m, n)
    if method in ("relu", "nuclear") and module.effective_activation(fold) is not None:
        cost += 200 * max(module.observer.samples, 1) * module.groups * m * n
    return float(cost)


def _reduced(
    module: nn.Module, pairs: list[tuple[CrossStats, Reservoir | None]] | None, with_samples: bool
) -> list[tuple[CrossStats, Reservoir | None]]:
    """``pairs`` summed over every rank (collective; ``None``: this rank saw no data)."""
    n, device = module.matrix_shape[1], device_of(module)
    out = []
    for j in range(module.groups):
        cross, reservoir = pairs[j] if pairs is not None else (None, None)
        merged = CrossStats.all_reduce(cross, n, device)
        if with_samples and module.observer.samples:
            reservoir = Reservoir.all_reduce(reservoir, module.observer.samples, 2 * n, device)
        out.append((merged, reservoir))
    return out


def held_bytes(module: nn.Module) -> int:
    """Memory held by a calibrating module's first-pass statistics and reservoirs, in bytes."""
    return module.observer.observation().nbytes


def _whole_model(
    model: nn.Module, batch: Any, forward_fn: Callable, mode: Callable, counts: dict[str, int]
) -> Callable[[bool], None]:
    """A run (see :func:`_accumulate_wave`) of one batch through the whole model."""

    def run(compressed: bool) -> None:
        with mode(compressed):
            forward_fn(model, batch)
        counts["forward"] += 1

    return run


def _block_of(wave: list[nn.Module], where: dict) -> tuple[Chain, int] | None:
    """The chain child holding every layer of ``wave``, or ``None``."""
    places = [where.get(m) for m in wave]
    first = places[0]
    if all(p is not None and p[0] is first[0] and p[1] == first[1] for p in places):
        return first
    return None


def _refine(
    cache: BlockCache,
    block: tuple[Chain, int],
    layers: list[nn.Module],
    mode: Callable[[bool], contextlib.AbstractContextManager],
    options: RefineOptions,
) -> BlockRefinement:
    """Refine the staged factor ``layers`` of the chain child ``block`` on the cached inputs
    (:mod:`torch_lowrank.refine`)."""
    chain, index = block
    name = f"{chain.name}.{index}" if chain.name else str(index)

    def run(call: tuple) -> Tensor:
        return chain.stream(chain.run(index, chain.fresh(call)))

    with torch.no_grad(), mode(False):
        targets = [run(call) for call in cache.inputs(False)]
    params = [p for layer in layers for p in layer.parameters()]
    with mode(True):
        return refine_block(name, run, list(zip(cache.inputs(True), targets)), params, options)


def corrective_plans(
    model: nn.Module,
    modules: list[nn.Module],
    data: Iterable[Any],
    method: str,
    forward_fn: Callable,
    fold: dict[nn.Module, list[str]],
    options: Options,
    ranks: dict[nn.Module, int | None] | None = None,
    progress: bool = True,
    cache_blocks: bool = True,
    refine: RefineOptions | None = None,
) -> tuple[dict[nn.Module, Plan], dict]:
    """Solve ``modules`` correctively, wave by wave; returns the plans for
    :func:`~torch_lowrank.recover_` to install, and run information (waves, forward passes,
    block passes, seconds). ``fold`` maps a module to the names of the BatchNorm to fold into
    it (empty: no folding); ``ranks`` overrides modules' ranks (global allocation). With
    ``cache_blocks``, a wave inside a chain of blocks (:mod:`torch_lowrank.blocks`) runs only
    its block on cached inputs; other waves run the whole model. With ``refine``, each block's
    factors are refined once its last wave is solved (:mod:`torch_lowrank.refine`); layers
    outside a chain of blocks, or that are a chain child on their own, are not. Nothing is
    installed here, and the model is the original again on the way out."""
    if iter(data) is data:
        raise TypeError(
            "recover_: data: corrective recovery iterates the calibration data several times\n"
            "but got a one-shot iterator; pass a list or a DataLoader"
        )
    start = time.perf_counter()
    first = next(iter(data), None)
    if first is None:
        raise ValueError("recover_: data is empty; pass at least one calibration batch")
    ranks = ranks or {}
    plans: dict[nn.Module, Plan] = {}
    staged: dict[nn.Module, nn.Module] = {}
    names = module_names(model)

    def mode(compressed: bool) -> contextlib.AbstractContextManager:
        return stood_in(model, staged if compressed else {}, names, fold)

    counts = {"forward": 1}  # the schedule's pass
    held = sum(held_bytes(m) for m in modules)  # first-pass statistics, if any were kept
    peak = held
    with contextlib.ExitStack() as quiet:
        for module in modules:  # the passes below must not add to the first-pass statistics
            quiet.enter_context(module.observer.disabled())
        waves = schedule(model, modules, first, forward_fn)
        where, chain_passes = ({}, 0)
        if cache_blocks:
            where, chain_passes = find_chains(model, modules, first, forward_fn)
        counts["forward"] += chain_passes
        store = next((m.offload for m in modules if m.offload is not None), None)
        cache = BlockCache(model, data, forward_fn, mode, store)
        blocks = [_block_of(wave, where) for wave in waves]
        # A child that is one layer is what that layer's closed form already fits: not a block.
        solving = set(modules)
        refinable = [b is not None and b[0].container[b[1]] not in solving for b in blocks]
        refined: list[BlockRefinement] = []
        for i, wave in enumerate(
            tqdm(waves, desc="corrective waves", disable=None if progress else True)
        ):
            block = blocks[i]
            if block is not None:
                cache.seek(*block)
                runs = cache.runs()
            else:
                runs = (_whole_model(model, b, forward_fn, mode, counts) for b in data)
            needs_rows = method in ("relu", "nuclear")
            paired = _accumulate_wave(wave, runs, needs_rows)
            wave_bytes = sum(
                cross.nbytes + (0 if reservoir is None else reservoir.nbytes)
                for pairs in paired.values()
                for cross, reservoir in pairs
            )
            peak = max(peak, held + wave_bytes + cache.nbytes)
            if world_size() > 1:  # every rank saw a shard: sum the pairs of all ranks
                paired = {m: _reduced(m, paired.get(m), needs_rows) for m in wave}

            def solve(module: nn.Module, paired=paired) -> Plan:
                if module not in paired:
                    return Plan.dense("saw no calibration data", saw_no_data=True)
                return plan_layer(
                    module, method, options, fold=bool(fold[module]), rank=ranks.get(module),
                    paired=paired[module],
                )  # fmt: skip

            if world_size() > 1:
                costs = [solve_cost(m, method, bool(fold[m])) for m in wave]
                wave_plans = distributed.solve_shared(wave, solve, costs, device_of)
            else:
                wave_plans = {module: solve(module) for module in wave}
            for module, plan in wave_plans.items():
                plans[module] = plan
                if plan.layers is not None:
                    staged[module] = nn.Sequential(*plan.layers)
            last = block is not None and (i + 1 == len(waves) or blocks[i + 1] != block)
            if refine is not None and last and refinable[i]:
                layers = [staged[m] for m in staged if where.get(m) == block]
                refined.append(_refine(cache, block, layers, mode, refine))
    info = {
        "mode": "corrective",
        "waves": len(waves),
        "forward_passes": counts["forward"] + cache.forward_passes,
        "block_passes": cache.block_passes,
        "peak_stat_bytes": peak,
        "seconds": time.perf_counter() - start,
    }
    if refine is not None:
        info["refine"] = [r.as_dict() for r in refined]
        outside = [m for wave, ok in zip(waves, refinable) if not ok for m in wave]
        info["not_refined"] = [m.layer_name for m in outside]
    return plans, info
