"""Model-level recovery, all or nothing (:func:`recover_`).

:func:`recover_` settles what follows each layer (the activation observed on the first forward,
or the static answer), finds the BatchNorms to fold, chooses global ranks when asked, and solves
every layer into a :class:`~torch_lowrank.plan.Plan`, in parallel from each layer's own
statistics or correctively (:mod:`torch_lowrank.corrective`). Only when every plan is ready are
they written: factors installed, folded BatchNorms replaced, layers without data put back dense.
Every pass over data runs in eval mode and gives the caller's modes back.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable
from typing import Any, Callable

import torch
from torch import nn

from . import distributed
from .activations import FoldedBatchNorm
from .allocation import LayerBudget, QuantizedError, allocate, spectrum
from .base import LowRankModule
from .bytes_budget import Choice, allocate_bytes, quantization_error
from .convert import dense_row
from .corrective import corrective_plans, solve_cost
from .detect import settle_activations
from .linear import LowRankLinear
from .model import (
    default_forward,
    eval_mode,
    low_rank_modules,
    module_names,
    replace_everywhere,
    settings_of,
    world_size,
)
from .observer import Observation
from .options import POSITIONS, Options, check_positions, make_options, make_spec
from .pairing import device_of
from .plan import Plan, layer_row, plan_layer
from .problem import LayerProblem
from .quantize import SCHEMES, check_runs, quantize_layers_
from .refine import RefineOptions
from .report import LayerReport, Report
from .sensitivity import output_fisher, sensitivities
from .settings import Settings
from .weighting import FisherWeighting

__all__ = ["recover_"]

logger = logging.getLogger(__name__)

#: For each layer, every name of the BatchNorm to fold into it (empty: nothing to fold).
FoldNames = dict[nn.Module, list[str]]


def _global_ranks(
    model: nn.Module,
    found: dict[nn.Module, list[str]],
    fold: FoldNames,
    observed: dict[nn.Module, Observation],
    conversions: list[Settings],
    data: Iterable[Any] | None,
    forward_fn: Callable[[nn.Module, Any], Any],
) -> dict[nn.Module, Choice]:
    """Ranks for the modules awaiting global allocation (``None``: keep dense), one
    allocation per conversion (``conversions``) that asked for it; with ``allocate_by`` other
    than ``"spectra"``, each layer's error weighed by its measured sensitivity on ``data``;
    with a byte budget, whether each Linear is quantized too."""
    chosen: dict[nn.Module, Choice] = {}
    for settings in (s for s in conversions if s.allocation is not None):
        spec = settings.allocation
        ours = [m for m in found if m.settings is settings and observed[m].samples_seen > 0]
        # no data: goes back to dense; energy-chosen ranks are not allocated
        fixed = [m for m in ours if m.target_rank is not None]
        pending = [m for m in ours if m.target_rank is None and m.energy is None]
        if not pending:
            continue
        weights = {}
        if spec.allocate_by != "spectra":
            weights = sensitivities(model, pending, fold, observed, spec, data, forward_fn)
        layers = []
        for module in pending + fixed:
            seen, (m, n) = observed[module], module.matrix_shape
            if module in pending:
                problem = module.problem(fold=bool(fold[module]), observation=seen, samples=False)
                values, low, high = spectrum(problem), spec.min_rank, spec.max_rank
                extra = (
                    _bytes_fields(module, problem, spec.scheme) if spec.budget == "bytes" else {}
                )
            else:  # a fixed rank (overrides) spends its share of the budget first
                values = torch.zeros(min(m, n), dtype=torch.float64)
                values[0] = 1.0
                low = high = module.target_rank
                extra = {"element_size": module.original.weight.element_size()}
            positions = max(1, seen.samples_seen // max(seen.inputs_seen, 1))
            layers.append(
                LayerBudget(
                    found[module][0], (m, n), values, module.groups, positions, low, high,
                    weight=weights.get(module, 1.0), **extra,
                )
            )  # fmt: skip
        if spec.budget == "bytes":
            picks = allocate_bytes(layers, spec.ratio, spec.round_to)
        else:
            ranks = allocate(layers, spec.ratio, spec.budget, spec.round_to)
            picks = {name: Choice(rank) for name, rank in ranks.items()}
        chosen.update({m: picks[found[m][0]] for m in pending})
    return chosen


def _bytes_fields(module: nn.Module, problem: LayerProblem, scheme: str) -> dict[str, Any]:
    """What a byte budget knows of a layer: its weights' size and, for a Linear (torchao
    quantizes ``nn.Linear``; conv factors stay float), the scheme and its predicted error."""
    weight = module.original.weight
    fields: dict[str, Any] = {"element_size": weight.element_size()}
    if isinstance(module, LowRankLinear):
        error = quantization_error(problem, SCHEMES[scheme].bits)
        if type(module.original) is not nn.Linear:  # e.g. GPT-2's Conv1D: only factors
            error = QuantizedError(error.factors, None)
        fields.update(scheme=SCHEMES[scheme], quantized=error)
    return fields


def _quantize_chosen(
    model: nn.Module, found: dict[nn.Module, list[str]], schemes: dict[nn.Module, str], rows: dict
) -> dict[str, str]:
    """Quantize the layers a byte budget chose (their factors, or the dense layer put back),
    one scheme at a time; notes it in their report rows."""
    by_scheme: dict[str, dict[nn.Module, str]] = {}
    done: dict[str, str] = {}
    for module, scheme in schemes.items():
        name = found[module][0]
        if module.calibrating:  # kept dense
            layers = {module.original: name} if type(module.original) is nn.Linear else {}
        else:
            prefix = f"{name}." if name else ""
            layers = {module.down: f"{prefix}down", module.up: f"{prefix}up"}
        by_scheme.setdefault(scheme, {}).update(layers)
        done.update({n: scheme for n in layers.values()})
        if layers:
            rows[module].note = "; ".join(filter(None, [rows[module].note, f"{scheme} weights"]))
    for scheme, layers in by_scheme.items():
        quantize_layers_(model, layers, scheme, "recover_")
    return done


def _parallel_plans(
    modules: list[nn.Module],
    method: str,
    fold: FoldNames,
    options: Options,
    ranks: dict[nn.Module, int | None],
    observed: dict[nn.Module, Observation],
    progress: bool,
) -> dict[nn.Module, Plan]:
    """Solve every module from its own first-pass statistics (one input per layer); with
    several processes, the solves are shared out (:mod:`torch_lowrank.distributed`)."""

    def plan(module: nn.Module) -> Plan:
        return plan_layer(
            module, method, options, fold=bool(fold[module]), rank=ranks.get(module),
            observation=observed[module],
        )  # fmt: skip

    def cost(module: nn.Module) -> float:
        return solve_cost(module, method, bool(fold[module]))

    return distributed.solve_each(modules, plan, cost, device_of, progress)


def _write(
    model: nn.Module, found: dict[nn.Module, list[str]], plans: dict, fold: FoldNames, method: str
) -> dict[nn.Module, LayerReport]:
    """Install every plan (attribute assignments only); returns the report rows."""
    rows: dict[nn.Module, LayerReport] = {}
    for module, plan in plans.items():
        if plan.factors is None:
            dense = module.original
            if module.offload is not None:
                dense.to(module.home)  # back from host memory
            module.carry_hooks_to(dense)
            module.observer.close()
            rows[module] = dense_row(found[module][0], dense, plan.dense_reason)
            if plan.saw_no_data:
                warnings.warn(
                    f"recover_: {module.layer_name} {plan.dense_reason}; kept dense", stacklevel=3
                )
            replace_everywhere(model, [name for name in found[module] if name], dense)
            continue
        rows[module] = layer_row(module, plan.factors, method, plan.seconds, plan.folded)
        if plan.folded:
            bn = module.folded_batchnorm[0]
            replace_everywhere(model, fold[module], FoldedBatchNorm.like(bn))
        module.install_(plan.factors, plan.layers)
    return rows


def recover_(
    model: nn.Module,
    *,
    method: str = "relu",
    data: Iterable[Any] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
    cache_blocks: bool = True,
    refine: bool | dict | RefineOptions | None = None,
    weighting: str | dict | FisherWeighting | None = None,
    options: dict | Options | None = None,
    positions: int | None = POSITIONS,
    **kwargs: Any,
) -> Report:
    """Recover every calibrating low-rank module of ``model``, all or nothing.

    Every layer is solved first; only when all solves succeed are the factors written. A
    module that saw no calibration data goes back to its original dense layer (with a warning),
    as does a layer whose chosen rank would save nothing. Layers ``convert`` left dense are
    listed too. An eval BatchNorm found between a layer and its activation is folded into the
    layer and replaced by a :class:`~torch_lowrank.activations.FoldedBatchNorm`.

    Args:
        model: a model prepared by :func:`convert` and run on calibration data.
        method: ``"relu"`` (default: activation-aware for layers followed by an activation,
            ``linear`` for the others), ``"linear"`` (exact optimum of the pre-activations),
            ``"svd"`` (weights only) or ``"nuclear"``. See ``docs/methods.md``.
        data: calibration batches for *corrective* recovery: every layer is solved, in the
            order layers execute, from the compressed network's own input with the original
            network's output as target. The data is iterated twice per wave of layers (a list
            or a DataLoader, not a one-shot iterator). Without ``data``: parallel recovery
            from each layer's first-pass statistics.
        forward_fn: how to run one batch (see :func:`default_forward`), with ``data``.
        progress: a tqdm progress bar on an interactive terminal; ``False`` never shows it.
        cache_blocks: in corrective recovery, run a wave inside a chain of blocks (transformer
            layers, ``nn.Sequential`` stages) on cached block inputs instead of the whole
            model (same result, less compute).
        refine: with ``data``, after a block's layers are solved correctively, fit the block's
            factors jointly to the original block's output (``True``, or the fields of
            :class:`~torch_lowrank.refine.RefineOptions`); ``report.info["refine"]`` gives
            each block's steps and held-out error before and after. Needs ``cache_blocks``.
        weighting: with ``data``, ``"fisher"`` weighs each layer's output errors by the
            second moment of the loss gradient at its output (``docs/methods.md``; a dict or
            a :class:`~torch_lowrank.sensitivity.FisherWeighting` sets the damping, the
            batches and the loss). Applies to the closed-form solves.
        positions: with ``data``, the patch positions per image whose pairs enter a conv's
            corrective statistics: a uniform sample, drawn afresh for every batch (``None``:
            every position; ``docs/corrective.md`` gives the cost of the default in quality).
        options / **kwargs: the method's options (:mod:`torch_lowrank.options`), checked
            before anything runs: ``damping``; ``max_iter``, ``tol``, ``optimizer``, ``lr``
            (``relu``); ``lam`` (``nuclear``).

    Returns:
        a :class:`~torch_lowrank.report.Report` with one row per layer.

    Raises:
        ValueError: unknown method or a bad option value, or a layer's statistics hold
            NaN/Inf; the model is unchanged.
        TypeError: an unknown option (the message lists the valid ones).

    Example:
        >>> import torch
        >>> from torch_lowrank import calibrate, convert
        >>> model = convert(nn.Sequential(nn.Linear(32, 32), nn.ReLU()), rank=4)
        >>> _ = calibrate(model, [torch.randn(64, 32)])
        >>> report = recover_(model)
        >>> report["0"].rank
        4
    """
    opts = make_options(method, _merged(options, kwargs), where="recover_")
    positions = check_positions(positions, "recover_")
    refining = make_spec(RefineOptions, refine, what="refine", where="recover_")
    if refining is not None:
        check_refine(data is not None and method != "svd", cache_blocks, "recover_")
    weighing = make_spec(
        FisherWeighting, weighting, what="weighting", where="recover_", names=("fisher",)
    )
    if weighing is not None and (data is None or iter(data) is data or method == "svd"):
        raise ValueError(
            "recover_: weighting='fisher' measures loss gradients on the calibration batches\n"
            "during corrective recovery; pass data=... (a list or a DataLoader) and a method\n"
            "other than svd"
        )
    found = {m: names for m, names in low_rank_modules(model).items() if m.calibrating}
    conversions = settings_of(model)
    measured = [s.allocation.allocate_by for s in conversions if s.allocation is not None]
    by = next((b for b in measured if b != "spectra"), None)
    if data is None and by is not None:
        raise ValueError(
            f"recover_: allocate_by={by!r} measures each layer's effect on the output\n"
            "on calibration batches; pass them as data=..."
        )
    if not found:
        warnings.warn(
            "recover_: the model has no calibrating low-rank module; call convert() first",
            stacklevel=2,
        )
    for settings in conversions:
        settings.hooks.abort()  # what an unfinished forward showed
        detector = settings.hooks.detector
        if detector is not None and not detector.done:
            detector.remove()  # no forward finished: it must not observe recovery's passes
    if any(m.activation_source == "auto" for m in found):  # no forward reached these
        settle_activations(model, {names[0]: m for m, names in found.items()})
    all_names = module_names(model)
    fold = {m: [n for bn in m.folded_batchnorm for n in all_names.get(bn, [])] for m in found}

    # Phase 1: solve everything; nothing in the model changes here.
    with eval_mode(model):
        if world_size() > 1:  # every rank saw a shard: sum the statistics of all ranks
            observed = distributed.summed_observations(found, device_of)
        else:
            observed = {m: m.observer.observation() for m in found}
        choices = _global_ranks(
            model, found, fold, observed, conversions, data, forward_fn or default_forward
        )
        ranks = {module: choice.rank for module, choice in choices.items()}
        schemes = {m: m.settings.allocation.scheme for m, c in choices.items() if c.quantized}
        for module, scheme in schemes.items():  # refused before anything is written
            weight = module.original.weight
            device = module.factor_device or weight.device
            check_runs(scheme, device, weight.dtype, found[module][0], "recover_")
        kept = {
            m: Plan.dense("global allocation keeps it dense") for m, r in ranks.items() if r is None
        }
        solve_now = [m for m in found if m not in kept]
        start = time.perf_counter()
        weights = {}
        if weighing is not None:
            fisher = output_fisher(model, solve_now, data, forward_fn or default_forward, weighing)
            weights = {m: {"fisher": g, "damping": weighing.damping} for m, g in fisher.items()}
        if data is not None and method != "svd":
            plans, info = corrective_plans(
                model, solve_now, data, method, forward_fn or default_forward, fold, opts,
                ranks, progress, cache_blocks, refining, weights, positions,
            )  # fmt: skip
            if weighing is not None:
                info["weighting"] = {"damping": weighing.damping, "layers": len(weights)}
            if refining is not None and not info["refine"] and solve_now:
                warnings.warn(
                    "recover_: refine: no layer is inside a chain of blocks (transformer layers,\n"
                    "nn.Sequential stages); nothing was refined",
                    stacklevel=2,
                )
        else:
            plans = _parallel_plans(solve_now, method, fold, opts, ranks, observed, progress)
            info = {"mode": "parallel", "seconds": time.perf_counter() - start}
            info["peak_stat_bytes"] = sum(observed[m].nbytes for m in found)
    if world_size() > 1:
        info["world_size"] = world_size()
        solved_on = [p.factors[0].info.get("solved_on_rank") for p in plans.values() if p.factors]
        info["solves_per_rank"] = [solved_on.count(r) for r in range(info["world_size"])]
    plans.update(kept)
    specs = [s.allocation.as_dict() for s in conversions if s.allocation is not None]
    if ranks and specs:
        info["allocation"] = specs[0]

    # Phase 2: write back (attribute assignments only).
    rows = _write(model, found, plans, fold, method)
    if schemes:
        info["quantized"] = _quantize_chosen(model, found, schemes, rows)
    for settings in conversions:
        settings.hooks.remove()
    by_name = {row.name: row for s in conversions for row in s.skipped}
    by_name.update({found[module][0]: row for module, row in rows.items()})
    report = Report(info=info)
    for name, module in model.named_modules():
        row = by_name.get(name)
        if row is not None and (row.method != "dense" or not isinstance(module, LowRankModule)):
            report.layers.append(row)
    return report


def check_refine(corrective: bool, cache_blocks: bool, where: str) -> None:
    """Refinement runs on corrective recovery's block cache, in one process.

    Example:
        >>> check_refine(corrective=True, cache_blocks=True, where="recover_")  # fine
        >>> check_refine(corrective=True, cache_blocks=False, where="recover_")
        Traceback (most recent call last):
        ValueError: recover_: refine runs on the block cache; use cache_blocks=True
    """
    if not corrective:
        raise ValueError(
            f"{where}: refine needs corrective recovery (data=..., and a method other than svd)"
        )
    if not cache_blocks:
        raise ValueError(f"{where}: refine runs on the block cache; use cache_blocks=True")
    if world_size() > 1:
        raise ValueError(f"{where}: refine runs in one process; not with {world_size()} ranks")


def _merged(options: dict | Options | None, kwargs: dict) -> dict | Options | None:
    """``options`` and keyword options together (an options object takes no keywords)."""
    if not kwargs:
        return options
    if options is not None and not isinstance(options, dict):
        raise TypeError("recover_: give options as an options object or as keywords, not both")
    return {**(options or {}), **kwargs}
