"""Corrective recovery: every layer repairs the error of the layers before it (DESIGN section 2).

Each layer is solved with the compressed network's own input ``x~`` and the original network's
target ``W x + b``. Layers are solved wave by wave in the order they execute; for every wave the
calibration data runs twice through the converted model itself (no copy of the model is made):

* an *original* pass, where every calibrating module runs its dense layer, captures ``x``;
* a *compressed* pass, where the modules already solved run their staged factors, captures
  ``x~`` for the same samples.

The pairs feed :class:`~torch_lowrank.stats.CrossStats` (and, for the activation-aware methods, a
reservoir of concatenated ``[x~, x]`` rows), and the wave is solved with
:func:`~torch_lowrank.solvers.corrective`. Nothing is installed until every wave is solved, so a
failure leaves the model as it was. Layers that read the same input tensor (attention's q/k/v)
share a wave, so a wave costs two passes over the data whatever its width.

This is not GPTQ-style "sequential" calibration, which feeds ``x~`` but targets ``W x~``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .reservoir import Reservoir
from .stats import CrossStats

__all__ = ["schedule", "corrective_plans"]


def _capture(modules: Iterable[nn.Module], store: dict[nn.Module, list[Tensor]]) -> list:
    """Forward pre-hooks that append each module's input to ``store[module]``."""

    def hook(module: nn.Module, args: tuple) -> None:
        store[module].append(args[0].detach())

    return [module.register_forward_pre_hook(hook) for module in modules]


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

    handles = [module.register_forward_pre_hook(hook) for module in modules]
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
    model: nn.Module,
    wave: list[nn.Module],
    solved: list[nn.Module],
    data: Iterable[Any],
    forward_fn: Callable,
    with_samples: bool,
    folded: dict[nn.Module, list[tuple[nn.Module, str]]],
) -> tuple[dict[nn.Module, list[tuple[CrossStats, Reservoir | None]]], int]:
    """Run the data through the original and the compressed model, pairing the wave's inputs.

    ``folded`` maps a solved module to the (parent, attribute) places of the BatchNorm folded
    into its factors; the compressed pass bypasses those BatchNorms."""
    paired: dict[nn.Module, list[tuple[CrossStats, Reservoir | None]]] = {}
    passes = 0
    for batch in data:
        inputs: dict[str, dict[nn.Module, list[Tensor]]] = {}
        for mode in ("original", "compressed"):
            compressed = mode == "compressed"
            bypassed = [place for m in solved for place in folded.get(m, [])] if compressed else []
            store: dict[nn.Module, list[Tensor]] = {m: [] for m in wave}
            handles = _capture(wave, store)
            originals = [getattr(parent, attr) for parent, attr in bypassed]
            try:
                for module in solved:
                    module.run_staged = compressed
                for parent, attr in bypassed:
                    setattr(parent, attr, nn.Identity())
                forward_fn(model, batch)
            finally:
                for handle in handles:
                    handle.remove()
                for module in solved:
                    module.run_staged = False
                for (parent, attr), original in zip(bypassed, originals):
                    setattr(parent, attr, original)
            inputs[mode] = store
            passes += 1
        for module in wave:
            n, groups = module.matrix_shape[1], module.groups
            if module not in paired:
                paired[module] = [
                    (CrossStats(n), Reservoir(module.samples) if with_samples else None)
                    for _ in range(groups)
                ]
            for x, x_tilde in zip(inputs["original"][module], inputs["compressed"][module]):
                for rows, rows_tilde in zip(module._row_chunks(x), module._row_chunks(x_tilde)):
                    for j, (cross, reservoir) in enumerate(paired[module]):
                        part = slice(j * n, (j + 1) * n) if groups > 1 else slice(None)
                        cross.update(rows_tilde[:, part], rows[:, part])
                        if reservoir is not None:
                            reservoir.update(torch.cat([rows_tilde[:, part], rows[:, part]], 1))
    return paired, passes


def corrective_plans(
    model: nn.Module,
    modules: list[nn.Module],
    data: Iterable[Any],
    method: str,
    forward_fn: Callable,
    fold: dict[nn.Module, list[tuple[nn.Module, str]]],
    options: dict,
    progress: bool = True,
) -> tuple[dict[nn.Module, tuple], dict]:
    """Solve ``modules`` correctively, wave by wave; returns the plans for
    :func:`~torch_lowrank.convert.recover_` to install, and run information (waves, forward
    passes, seconds). ``fold`` maps a module to the places of the BatchNorm to fold into it
    (empty: no folding). Nothing is installed here; staged factors are cleared on the way out."""
    if iter(data) is data:
        raise TypeError(
            "recover_: corrective recovery iterates the calibration data several times\n"
            "but got a one-shot iterator; pass a list or a DataLoader"
        )
    start = time.perf_counter()
    first = next(iter(data), None)
    if first is None:
        raise ValueError("recover_: the calibration data is empty")
    plans: dict[nn.Module, tuple] = {}
    solved: list[nn.Module] = []
    passes = 1
    paused = [(m, m.accumulating) for m in modules]
    for module, _ in paused:
        module.accumulating = False
    try:
        waves = schedule(model, modules, first, forward_fn)
        for wave in tqdm(waves, desc="corrective waves", disable=None if progress else True):
            needs_rows = method in ("relu", "nuclear")
            paired, wave_passes = _accumulate_wave(
                model, wave, solved, data, forward_fn, needs_rows, fold
            )
            passes += wave_passes
            for module in wave:
                solve_start = time.perf_counter()
                if module not in paired or paired[module][0][0].count == 0:
                    plans[module] = ("dense", "saw no calibration data")
                    continue
                factors = module._solve(
                    method, fold=bool(fold[module]), paired=paired[module], **options
                )
                rank = factors[0].rank
                if not module.saves_parameters(rank):
                    plans[module] = (
                        "dense",
                        f"rank {rank} for energy={module.energy} saves nothing",
                    )
                    continue
                layers = module._factor_layers(factors)
                module.staged = layers
                solved.append(module)
                seconds = time.perf_counter() - solve_start
                plans[module] = ("factors", factors, layers, seconds, bool(fold[module]))
    finally:
        for module, state in paused:
            module.accumulating = state
            module.staged, module.run_staged = None, False
    info = {
        "mode": "corrective",
        "waves": len(waves),
        "forward_passes": passes,
        "seconds": time.perf_counter() - start,
    }
    return plans, info
