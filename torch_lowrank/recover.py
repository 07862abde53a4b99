"""Model-level recovery: solve every calibrating layer of a model, all or nothing.

``recover_`` solves each layer from its own first-pass statistics (parallel) or, given the
calibration data, correctively (:mod:`torch_lowrank.corrective`); global rank allocation
(:mod:`torch_lowrank.allocation`) and the settling of observed activations happen first.
Every layer is solved before any is written, so a failure leaves the model as it was.
``compress`` is convert + calibrate + recover in one call.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import nn

from . import distributed
from .allocation import LayerBudget, allocate
from .base import METHODS, _LowRankBase
from .convert import (
    _ALLOCATIONS,
    _DETECTORS,
    _SKIPPED,
    _dense_row,
    _low_rank_modules,
    _pending,
    _replace,
    calibrate,
    convert,
    default_forward,
    progress_bar,
)
from .corrective import corrective_plans, device_of, held_bytes, solve_cost
from .detect import static_activations
from .report import LayerReport, Report
from .reservoir import Reservoir
from .solve import plan_layer, spectrum_of
from .stats import CovarianceStats

__all__ = ["recover_", "compress"]

logger = logging.getLogger(__name__)


def _settle_activations(model: nn.Module, found: dict[nn.Module, list[str]]) -> None:
    """Give every layer whose activation was not observed the static answer (Sequential / fx),
    and log where observation and the static answer disagree."""
    detector = _DETECTORS.pop(model, None)
    if detector is not None:
        detector.remove()
    names = {names[0]: module for module, names in found.items()}
    static = static_activations(model, list(names), leaf=lambda m: isinstance(m, _LowRankBase))
    for name, module in names.items():
        if name not in static:
            if _pending(module):
                module.activation_source = "none"
            continue
        guess = static[name]
        if _pending(module):
            module.activation, module.activation_source = guess, "static"
        elif module.activation_source == "observed" and not module.folded_batchnorm:
            seen = module.activation.name if module.activation else None
            if seen != (guess.name if guess else None):
                logger.warning(
                    "%s: observed activation %s, static analysis says %s; using %s",
                    name,
                    seen,
                    guess.name if guess else None,
                    seen,
                )


def _batchnorm_places(
    model: nn.Module, module: _LowRankBase, all_names: dict[nn.Module, list[str]]
) -> list[tuple[nn.Module, str]]:
    """Where the BatchNorm to fold into ``module`` sits in ``model``: ``(parent, attribute)``."""
    if not module.folded_batchnorm or module.folded_batchnorm[0] not in all_names:
        return []
    places = []
    for name in all_names[module.folded_batchnorm[0]]:
        parent_name, _, attr = name.rpartition(".")
        places.append((model.get_submodule(parent_name), attr))
    return places


def _global_ranks(
    model: nn.Module,
    found: dict[nn.Module, list[str]],
    fold: dict[nn.Module, list[tuple[nn.Module, str]]],
) -> dict[nn.Module, int | None]:
    """Ranks for the modules awaiting global allocation (``None``: keep dense)."""
    spec = _ALLOCATIONS.get(model)
    pending = [m for m in found if m.target_rank is None and m.energy is None]
    if spec is None or not pending:
        return {}
    layers, modules = [], {}
    for module in found:
        if module.samples_seen == 0 or (module not in pending and module.target_rank is None):
            continue  # no data: goes back to dense; energy-chosen ranks are not allocated
        m, n = module.matrix_shape
        name = found[module][0]
        if module in pending:
            spectrum = sum(spectrum_of(module, j, bool(fold[module])) for j in range(module.groups))
            low, high = spec["min_rank"], spec["max_rank"]
            modules[name] = module
        else:  # a fixed rank (overrides) spends its share of the budget first
            spectrum = torch.zeros(min(m, n), dtype=torch.float64)
            spectrum[0] = 1.0
            low = high = module.target_rank
        positions = max(1, module.samples_seen // max(module.inputs_seen, 1))
        layers.append(LayerBudget(name, (m, n), spectrum, module.groups, positions, low, high))
    chosen = allocate(layers, spec["ratio"], spec["budget"], spec["round_to"])
    return {modules[name]: rank for name, rank in chosen.items() if name in modules}


def _parallel_plans(
    found: dict[nn.Module, list[str]],
    method: str,
    fold: dict[nn.Module, list[tuple[nn.Module, str]]],
    options: dict,
    progress: bool = True,
) -> dict[nn.Module, tuple]:
    """Solve every module from its own first-pass statistics (one input per layer); with
    several ranks, the solves are shared out (:mod:`torch_lowrank.distributed`)."""
    modules = list(found)
    if distributed.active():
        costs = [solve_cost(m, method, bool(fold[m])) for m in modules]
        solve = functools.partial(_plan_parallel, method=method, fold=fold, options=options)
        return distributed.solve_shared(modules, solve, costs, device_of)
    return {
        m: plan_layer(m, method, bool(fold[m]), options)
        for m in progress_bar(modules, "recovering", progress)
    }


def _plan_parallel(module: nn.Module, *, method: str, fold: dict, options: dict) -> tuple:
    return plan_layer(module, method, bool(fold[module]), options)


@contextmanager
def _summed_over_ranks(found: dict[nn.Module, list[str]]) -> Iterator[None]:
    """With several ranks, give every module the first-pass statistics and reservoirs of all
    ranks for the duration; the module's own come back if recovery fails (collective)."""
    if not distributed.active():
        yield
        return
    own = {m: (m.stats, m.reservoirs, m.inputs_seen) for m in found}
    try:
        for module in found:
            n, device = module.matrix_shape[1], device_of(module)
            width = module.stats_features
            inputs = torch.tensor([float(module.inputs_seen)], device=device)
            torch.distributed.all_reduce(inputs)
            module.inputs_seen = int(inputs.item())
            stats = module.stats or [None] * module.groups
            module.stats = [CovarianceStats.all_reduce(s, width, device) for s in stats]
            if module.samples:
                reservoirs = module.reservoirs or [None] * module.groups
                module.reservoirs = [
                    Reservoir.all_reduce(r, module.samples, n, device) for r in reservoirs
                ]
        yield
    except BaseException:
        for module, (stats, reservoirs, inputs) in own.items():
            module.stats, module.reservoirs, module.inputs_seen = stats, reservoirs, inputs
        raise


def recover_(
    model: nn.Module,
    *,
    method: str = "relu",
    data: Iterable[Any] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
    cache_blocks: bool = True,
    **options: Any,
) -> Report:
    """Recover every calibrating low-rank module of ``model``, all or nothing.

    Every layer is solved first; only when all solves succeed are the factors written. A
    module that saw no calibration data goes back to its original dense layer (with a warning),
    as does a layer whose energy-chosen rank would save nothing. Layers ``convert`` left dense are
    listed too. An eval BatchNorm found between a layer and its activation is folded into the
    layer and replaced by ``nn.Identity``.

    Args:
        model: a model prepared by :func:`convert` and run on calibration data.
        method: ``"relu"`` (default: activation-aware for layers followed by an activation,
            ``linear`` for the others), ``"linear"`` (exact optimum of the pre-activations),
            ``"svd"`` (weights only) or ``"nuclear"``. See the README for when to use which.
        data: calibration batches for *corrective* recovery: every layer is solved, in the
            order layers execute, from the compressed network's own input with the original
            network's output as target, so it repairs the error of the layers before it. The
            data is iterated twice per wave of layers (a list or a DataLoader, not a one-shot
            iterator). Without ``data``: parallel recovery from each layer's first-pass
            statistics.
        forward_fn: how to run one batch (see :func:`default_forward`), with ``data``.
        progress: a tqdm progress bar over layers (parallel) or waves (corrective), shown on an
            interactive terminal; ``False`` never shows it.
        cache_blocks: in corrective recovery, cache the inputs of each block of a chain of
            blocks (an ``nn.Sequential`` or ``nn.ModuleList`` whose children feed each other,
            such as transformer layers) so that a wave runs only its block, not the whole
            model; chains are checked on the first batch. ``False``: every wave runs the whole
            model (same result, more compute).
        **options: passed to the iterative solvers: ``optimizer`` (a ``torch.optim`` or
            ``torch_optimizer`` class), ``lr``, ``max_iter``, ``tol``; ``lam`` for nuclear.

    Returns:
        a :class:`~torch_lowrank.report.Report` with one row per layer.

    Raises:
        ValueError: unknown method, or a layer's statistics hold NaN/Inf; the model is unchanged.

    Example:
        >>> import torch
        >>> model = convert(nn.Sequential(nn.Linear(32, 32), nn.ReLU()), rank=4)
        >>> _ = calibrate(model, [torch.randn(64, 32)])
        >>> report = recover_(model)
        >>> report["0"].rank
        4
    """
    if method not in METHODS:
        raise ValueError(
            f"recover_: method must be one of {', '.join(METHODS)}\nbut got {method!r}"
        )
    found = {m: names for m, names in _low_rank_modules(model).items() if m.calibrating}
    if not found:
        warnings.warn(
            "recover_: the model has no calibrating low-rank module; call convert() first",
            stacklevel=2,
        )
    _settle_activations(model, found)
    all_names: dict[nn.Module, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        all_names.setdefault(module, []).append(name)
    fold = {module: _batchnorm_places(model, module, all_names) for module in found}

    # Phase 1: solve everything; nothing in the model changes here.
    ranks: dict[nn.Module, int | None] = {}
    try:
        with _summed_over_ranks(found):
            ranks = _global_ranks(model, found, fold)
            kept_dense = {
                m: ("dense", "global allocation keeps it dense")
                for m, r in ranks.items()
                if r is None
            }
            solve = {m: names for m, names in found.items() if m not in kept_dense}
            for module, r in ranks.items():
                module.target_rank = r
            if data is not None and method != "svd":
                plans, info = corrective_plans(
                    model, list(solve), data, method, forward_fn or default_forward, fold,
                    options, progress, cache_blocks,
                )  # fmt: skip
            else:
                start = time.perf_counter()
                plans = _parallel_plans(solve, method, fold, options, progress)
                info = {"mode": "parallel", "seconds": time.perf_counter() - start}
                info["peak_stat_bytes"] = sum(held_bytes(m) for m in found)
    except BaseException:
        for module in ranks:
            module.target_rank = None  # back to "chosen at recovery"
        raise
    if distributed.active():
        info["world_size"] = torch.distributed.get_world_size()
        solved_on = [p[1][0].info.get("solved_on_rank") for p in plans.values() if p[0] != "dense"]
        info["solves_per_rank"] = [solved_on.count(r) for r in range(info["world_size"])]
    plans.update(kept_dense)
    if ranks:
        info["allocation"] = dict(_ALLOCATIONS[model])

    # Phase 2: write back (attribute assignments only).
    rows: dict[nn.Module, LayerReport] = {}
    for module, plan in plans.items():
        if plan[0] == "dense":
            dense = module.to_dense()
            if module.offload is not None and module.home is not None:
                dense.to(module.home)  # back from host memory
            rows[module] = _dense_row(found[module][0], dense, plan[1])
            if plan[1].startswith("saw no"):
                warnings.warn(f"recover_: {module.layer_name} {plan[1]}; kept dense", stacklevel=2)
            for name in found[module]:
                if name:
                    _replace(model, name, dense)
            continue
        _, factors, layers, seconds, folded = plan
        rows[module] = module._report_row(factors, method, seconds, folded)
        for parent, attr in fold[module] if folded else []:
            setattr(parent, attr, nn.Identity())
        module._install(layers)

    by_name = {row.name: row for row in _SKIPPED.get(model, [])}
    by_name.update({found[module][0]: row for module, row in rows.items()})
    report = Report(info=info)
    for name, module in model.named_modules():
        row = by_name.get(name)
        if row is not None and (row.method != "dense" or not isinstance(module, _LowRankBase)):
            report.layers.append(row)
    return report


def compress(
    model: nn.Module,
    data: Iterable[Any],
    *,
    method: str = "relu",
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    corrective: bool = True,
    options: dict | None = None,
    progress: bool = True,
    **convert_kwargs: Any,
) -> tuple[nn.Module, Report]:
    """Convert, calibrate on ``data`` and recover, in one call (corrective by default).

    Args:
        model: the trained model (changed in place).
        data: calibration batches (see :func:`default_forward`): a list or a DataLoader.
        method: the recovery method (see :func:`recover_`).
        forward_fn: ``forward_fn(model, batch)`` runs one batch; defaults to
            :func:`default_forward`.
        corrective: recover correctively (``recover_(model, data=data)``); ``False``: parallel
            recovery from the first pass, which iterates the data only once.
        options: solver options passed to :func:`recover_` (``optimizer``, ``lr``, ...).
        progress: tqdm progress bars on an interactive terminal (``False``: never).
        **convert_kwargs: ``rank`` / ``ratio`` / ``energy``, ``include``, ``exclude``,
            ``add_bias``, ``samples``, ``activation``, ``fold_batchnorm``, passed to
            :func:`convert`.

    Returns:
        ``(model, report)``.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        >>> batches = [torch.randn(128, 32) for _ in range(4)]
        >>> model, report = compress(model, batches, ratio=0.25)
        >>> [row.rank for row in report.layers]
        [5, 5]
    """
    model = convert(model, **convert_kwargs)
    if corrective and method != "svd" and model not in _ALLOCATIONS:
        # Corrective recovery collects its own statistics wave by wave; the first pass only
        # observes the activations, on one batch, and keeps no statistics (bounded memory).
        modules = [m for m in _low_rank_modules(model) if m.calibrating]
        for module in modules:
            module.accumulating = False
        try:
            calibrate(model, [next(iter(data))], forward_fn, progress=False)
        finally:
            for module in modules:
                module.accumulating = True
    else:
        calibrate(model, data, forward_fn, progress)
    corrective_data = data if corrective else None
    report = recover_(
        model,
        method=method,
        data=corrective_data,
        forward_fn=forward_fn,
        progress=progress,
        **(options or {}),
    )
    return model, report
