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
from .graphs import GraphCache
from .memory import plan_bytes, shed_factors, solve_working_bytes, tensor_bytes
from .model import FactorStandIn, module_names, stood_in, world_size
from .options import Options
from .pairing import accumulate_wave, device_of, reduced
from .plan import Plan, plan_layer
from .problem import fits_activation
from .refine import BlockRefinement, RefineOptions, refine_cached_block

__all__ = ["schedule", "corrective_plans"]


@torch.no_grad()
def schedule(
    model: nn.Module,
    modules: list[nn.Module],
    batch: Any,
    forward_fn: Callable,
    once: set[nn.Module] | None = None,
) -> list[list[nn.Module]]:
    """Group ``modules`` into waves by the order in which they first execute on ``batch``;
    consecutive modules that read the same input tensor share a wave. Modules that never run
    form a last wave. ``once``, if given, receives the modules that ran exactly once.

    Example:
        >>> import torch_lowrank as tl
        >>> model = tl.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), rank=2)
        >>> [[m.layer_name for m in wave] for wave in schedule(model, list(model)[::2],
        ...     torch.randn(4, 8), tl.default_forward)]
        [['0'], ['2']]
    """
    order: list[tuple[nn.Module, Tensor]] = []
    calls = {id(module): 0 for module in modules}

    def hook(module: nn.Module, args: tuple) -> None:
        calls[id(module)] += 1
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
    if once is not None:  # a module called once per pass lets its wave's passes stop early
        once.update(m for m in modules if calls[id(m)] == 1)
    return waves + ([never] if never else [])


def solve_cost(module: nn.Module, method: str, fold: bool) -> float:
    """A layer's solve cost estimate, for sharing solves between ranks: ``groups m n min(m, n)``
    for a closed form; an activation-aware solve adds ``groups m n`` per reservoir row and
    iteration (200 iterations assumed), which dominates.

    Example:
        >>> from torch_lowrank import LowRankLinear
        >>> layer = LowRankLinear.from_linear(nn.Linear(8, 4), rank=2, samples=16)
        >>> solve_cost(layer, "linear", fold=False)  # 4 x 8 x 4; no activation follows
        128.0
    """
    m, n = module.matrix_shape
    cost = module.groups * m * n * min(m, n)
    if fits_activation(method, module.effective_activation(fold)):
        cost += 200 * max(module.observer.samples, 1) * module.groups * m * n
    return float(cost)


def held_bytes(module: nn.Module) -> int:
    """Memory held by a calibrating module's first-pass statistics and reservoirs, in bytes.

    Example:
        >>> from torch_lowrank import LowRankLinear
        >>> layer = LowRankLinear.from_linear(nn.Linear(8, 4), rank=2)
        >>> before = held_bytes(layer)
        >>> _ = layer(torch.randn(16, 8))
        >>> before, held_bytes(layer) > 0
        (0, True)
    """
    return module.observer.observation().nbytes


def _whole_model(
    model: nn.Module, batch: Any, forward_fn: Callable, mode: Callable, counts: dict[str, int]
) -> Callable[[bool], None]:
    """A run (see :func:`~torch_lowrank.pairing.accumulate_wave`) of one batch through the
    whole model."""

    def run(compressed: bool) -> None:
        counts["forward"] += 1  # first: a pass may end early once the wave has its inputs
        with mode(compressed):
            forward_fn(model, batch)

    return run


def _block_of(wave: list[nn.Module], where: dict) -> tuple[Chain, int] | None:
    """The chain child holding every layer of ``wave``, or ``None``."""
    places = [where.get(m) for m in wave]
    first = places[0]
    if all(p is not None and p[0] is first[0] and p[1] == first[1] for p in places):
        return first
    return None


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
    weights: dict[nn.Module, dict] | None = None,
    positions: int | None = None,
) -> tuple[dict[nn.Module, Plan], dict]:
    """Solve ``modules`` correctively, wave by wave; returns the plans for
    :func:`~torch_lowrank.recover_` to install, and run information (waves, forward passes,
    block passes, seconds). ``fold`` maps a module to the names of the BatchNorm to fold into
    it (empty: no folding); ``ranks`` overrides modules' ranks (global allocation). With
    ``cache_blocks``, a wave inside a chain of blocks (:mod:`torch_lowrank.blocks`) runs only
    its block on cached inputs; other waves run the whole model. With ``refine``, each block's
    factors are refined once its last wave is solved (:mod:`torch_lowrank.refine`); layers
    outside a chain of blocks, or that are a chain child on their own, are not. ``weights``:
    per module, the output weighting (:func:`~torch_lowrank.weighting.weigh`). ``positions``:
    patch positions per image a conv's paired statistics keep (``None``: all). Nothing is
    installed here, and the model is the original again on the way out.

    Example:
        >>> import torch_lowrank as tl
        >>> from torch_lowrank.options import make_options
        >>> model = tl.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), rank=2)
        >>> data = [torch.randn(32, 8) for _ in range(2)]
        >>> plans, info = corrective_plans(model, list(model[::2]), data, "linear",
        ...     tl.default_forward, {m: [] for m in model[::2]}, make_options("linear"),
        ...     progress=False)
        >>> [plan.factors[0].rank for plan in plans.values()], info["mode"]
        ([2, 2], 'corrective')
    """
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

    def cost(module: nn.Module) -> float:
        return solve_cost(module, method, bool(fold[module]))

    def mode(compressed: bool) -> contextlib.AbstractContextManager:
        return stood_in(model, staged if compressed else {}, names, fold)

    counts = {"forward": 1}  # the schedule's pass
    held = sum(held_bytes(m) for m in modules)  # first-pass statistics, if any were kept
    peak = held
    memory = {"block_cache_bytes": 0, "solve_bytes": 0}
    clock = {"passes": 0.0, "statistics": 0.0, "solves": 0.0}
    with contextlib.ExitStack() as quiet:
        for module in modules:  # the passes below must not add to the first-pass statistics
            quiet.enter_context(module.observer.disabled())
        once: set[nn.Module] = set()
        waves = schedule(model, modules, first, forward_fn, once)
        where, chain_passes = ({}, 0)
        if cache_blocks:
            where, chain_passes = find_chains(model, modules, first, forward_fn)
        counts["forward"] += chain_passes
        store = next((m.offload for m in modules if m.offload is not None), None)
        cache = BlockCache(model, data, forward_fn, mode, store)
        graph = None  # a GraphModule without chains: waves run from cached node values
        if cache_blocks and not where and store is None:
            graph = GraphCache.of(model, data, forward_fn, mode)
        clock["passes"] += time.perf_counter() - start
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
                started = time.perf_counter()
                cache.seek(*block)
                clock["passes"] += time.perf_counter() - started
                runs = cache.runs()
            elif graph is not None and graph.cut(wave) is not None:
                started = time.perf_counter()
                graph.seek(graph.cut(wave))
                clock["passes"] += time.perf_counter() - started
                runs = graph.runs()
            else:
                runs = (_whole_model(model, b, forward_fn, mode, counts) for b in data)
            needs_rows = {  # only a layer an activation follows gets an activation-aware fit
                m for m in wave if fits_activation(method, m.effective_activation(bool(fold[m])))
            }
            stop = all(m in once for m in wave)
            paired = accumulate_wave(wave, runs, needs_rows, clock, stop, positions)
            groups = [group for pairs in paired.values() for group in pairs]
            held_now = {id(t): t for g in groups for t in (g.moments, g.rows) if t is not None}
            wave_bytes = sum(t.nbytes for t in held_now.values())
            cached = cache.nbytes + (0 if graph is None else graph.nbytes)
            peak = max(peak, held + wave_bytes + cached)
            memory["block_cache_bytes"] = max(memory["block_cache_bytes"], cached)
            if world_size() > 1:  # every rank saw a shard: sum the pairs of all ranks
                paired = {m: reduced(m, paired.get(m), m in needs_rows) for m in wave}
            for pairs in paired.values():  # the moments, computed once in the sums' memory
                for group in pairs:
                    group.moments.freeze_()
            started = time.perf_counter()

            def solve(module: nn.Module, paired=paired) -> Plan:
                if module not in paired:
                    return Plan.dense("saw no calibration data", saw_no_data=True)
                return plan_layer(
                    module, method, options, fold=bool(fold[module]), rank=ranks.get(module),
                    paired=paired[module], weighting=(weights or {}).get(module),
                )  # fmt: skip

            wave_plans = distributed.solve_each(wave, solve, cost, device_of)
            clock["solves"] += time.perf_counter() - started
            for module in wave:
                if module in paired:
                    frozen = sum(group.moments.nbytes for group in paired[module])
                    estimate = frozen + solve_working_bytes(*module.matrix_shape, module.groups)
                    memory["solve_bytes"] = max(memory["solve_bytes"], estimate)
            del solve, paired  # the wave's statistics go before the next wave's arrive
            for module, plan in wave_plans.items():
                plans[module] = shed_factors(plan)
                if plan.layers is not None:
                    staged[module] = FactorStandIn(*plan.layers)
            last = block is not None and (i + 1 == len(waves) or blocks[i + 1] != block)
            if refine is not None and last and refinable[i]:
                layers = [staged[m] for m in staged if where.get(m) == block]
                refined.append(refine_cached_block(cache, block, layers, mode, refine))
    info = {
        "mode": "corrective",
        "waves": len(waves),
        "positions": positions,
        "forward_passes": counts["forward"]
        + cache.forward_passes
        + (0 if graph is None else graph.forward_passes),
        "block_passes": cache.block_passes + (0 if graph is None else graph.graph_passes),
        "peak_stat_bytes": peak,
        "seconds": time.perf_counter() - start,
        **{f"seconds_{phase}": seconds for phase, seconds in clock.items()},
        "dense_bytes": sum(tensor_bytes(m.dense.parameters()) for m in modules),
        "staged_bytes": sum(plan_bytes(plan) for plan in plans.values()),
        **memory,
    }
    if refine is not None:
        info["refine"] = [r.as_dict() for r in refined]
        outside = [m for wave, ok in zip(waves, refinable) if not ok for m in wave]
        info["not_refined"] = [m.layer_name for m in outside]
    return plans, info
