"""Finding the layers to compress and swapping them for calibrating low-rank modules.

The flow mirrors ``torch.ao.quantization``'s prepare -> calibrate -> convert::

    tl.convert(model, ratio=0.5)      # swap layers for calibrating low-rank modules
    tl.calibrate(model, batches)      # or run your own forward passes
    report = tl.recover_(model)       # solve every layer, all or nothing (recover.py)

:func:`convert` works in two steps. First it decides, on a snapshot of ``named_modules()``,
which layers become low-rank and at what rank, and which stay dense and why; anything that can
fail (a bad specification, an ``include`` callable that raises) fails here, before the model is
touched. Then it swaps: each chosen layer is replaced in its parent with ``setattr`` at every
name it has (as torchao's ``quantize_`` does). What the conversion decided for the whole model
lives in one frozen :class:`~torch_lowrank.settings.Settings` that every new module carries.
:func:`revert` undoes a conversion whose modules are still calibrating.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch import nn

from .base import LowRankModule
from .conv import LowRankConv1d, LowRankConv2d
from .detect import FirstForwardDetector
from .families import DEFAULT_EXCLUDE, adapt, default_add_bias, tied_weights
from .linear import LowRankLinear
from .model import low_rank_modules, module_names, replace_everywhere
from .observer import BatchGate, ModelHooks
from .quantize import require_torchao
from .ranks import target_rank
from .report import LayerReport
from .settings import BUDGETS, GlobalAllocation, Settings

__all__ = ["REPLACEMENTS", "convert", "dense_row", "revert"]

logger = logging.getLogger(__name__)

Filter = Union[str, Sequence[str], Callable[[str, nn.Module], bool], None]

#: Which low-rank module replaces which dense layer type.
REPLACEMENTS = ((nn.Linear, LowRankLinear), (nn.Conv2d, LowRankConv2d), (nn.Conv1d, LowRankConv1d))


def _patterns(spec: Filter) -> list[str]:
    if spec is None or callable(spec):
        return []
    return [spec] if isinstance(spec, str) else list(spec)


def _matches(spec: Filter, name: str, module: nn.Module) -> bool:
    if callable(spec):
        return bool(spec(name, module))
    return any(fnmatch.fnmatchcase(name, p) for p in _patterns(spec))


def dense_row(name: str, module: nn.Module, note: str) -> LayerReport:
    """The report row of a layer left dense, with the reason.

    Example:
        >>> dense_row("fc", nn.Linear(4, 2), "excluded").params_after
        10
    """
    params = sum(p.numel() for p in module.parameters())
    return LayerReport(
        name, tuple(adapt(module).weight.shape), None, params, params, 0.0, "dense", 0.0, note
    )


@dataclass(frozen=True)
class _Choice:
    """One layer convert() will swap: the layer, its standard form, its low-rank class and
    how it is built."""

    module: nn.Module
    name: str
    standard: nn.Module
    kind: type
    rank: int | None
    activation: Any
    allocated: bool


def convert(
    model: nn.Module,
    *,
    rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    include: Filter = None,
    exclude: Filter = None,
    add_bias: bool | None = None,
    samples: int = 4096,
    activation: Any = "auto",
    fold_batchnorm: bool = True,
    allocation: str = "uniform",
    budget: str = "params",
    round_to: int = 1,
    min_rank: int = 1,
    max_rank: int | None = None,
    allocate_by: str = "spectra",
    scheme: str | None = None,
    overrides: dict[str, int] | None = None,
    offload: str | torch.device | None = None,
) -> nn.Module:
    """Swap every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` whose factorisation saves
    parameters for a calibrating low-rank module (:class:`~torch_lowrank.LowRankLinear`,
    :class:`~torch_lowrank.LowRankConv1d`, :class:`~torch_lowrank.LowRankConv2d`), in place.
    Layers of other libraries that are one of these in disguise (Hugging Face GPT-2's
    ``Conv1D``) are converted too (:mod:`torch_lowrank.families`).

    Args:
        model: any ``nn.Module``; nested modules, ``Sequential``, ``ModuleList`` and ``ModuleDict``
            are searched. A layer shared under several names is swapped everywhere.
        rank: the rank of every converted layer (per group for grouped convs), clamped to the
            layer's size; layers where it saves nothing stay dense.
        ratio: the fraction of each layer's weight parameters kept, in (0, 1]:
            ``rank = floor(ratio * m * n / (m + n))`` for an ``m x n`` weight (a conv's weight is
            ``C_out x (C_in kh kw)``, per group).
        energy: the fraction of each layer's output variance kept, in (0, 1]; the rank is chosen
            per layer at recovery.
        include: fnmatch pattern(s) on qualified module names, or ``callable(name, module)``; only
            matching layers are converted.
        exclude: the same; matching layers stay dense. ``None`` (default) excludes output
            heads named ``lm_head``; ``[]`` excludes nothing. Layers whose weight is tied to
            another module's (a head sharing the embedding) always stay dense.
        add_bias: give bias-free layers a bias, so that the recovery corrects for the mean of
            their inputs (the optimum); ``False`` keeps them bias-free and solves without
            intercept (on the uncentred second moment). ``None`` (default): ``False`` for
            Hugging Face ``transformers`` models, whose architectures decide which layers have a
            bias, ``True`` for the others (:func:`~torch_lowrank.families.default_add_bias`).
        samples: rows each layer keeps in a uniform random reservoir for the activation-aware
            methods (per group); 0 keeps none.
        activation: the elementwise activation after each layer. ``"auto"`` (default) observes
            it during the first calibration forward (see :mod:`torch_lowrank.activations`);
            ``None``: every layer is linear; a name (``"relu"``, ``"gelu"``, ...) or module
            (``nn.GELU()``): the same for all; a dict from layer name to any of these (layers not
            in it are observed).
        fold_batchnorm: when an eval-mode BatchNorm sits between a layer and its activation,
            fold it into the layer at recovery (exact; the BatchNorm becomes ``nn.Identity``),
            so the activation-aware objective sees the layer's own output.
        allocation: ``"uniform"`` (every layer keeps ``ratio`` of its own weights) or
            ``"global"``: with ``ratio``, the ranks of all converted layers are chosen together
            at recovery, from their output spectra, so that the layers keep ``ratio`` of their
            total cost and lose the least summed normalised error (see
            :mod:`torch_lowrank.allocation`); layers it gives no saving rank stay dense.
        budget: what ``ratio`` counts with global allocation: ``"params"`` (weights),
            ``"flops"`` (multiply-accumulates; a conv counts its output positions) or
            ``"bytes"`` (weights at their precision: recovery also chooses which Linear layers
            to store in 8 bits and quantizes them; needs torchao, see
            ``docs/quantization.md``).
        scheme: with ``budget="bytes"``, the quantization it may choose: ``"int8"``
            (default) or ``"int8-dynamic"``.
        round_to: global allocation gives ranks that are multiples of this (e.g. 8).
        min_rank / max_rank: bounds on each rank under global allocation.
        allocate_by: what global allocation weighs each layer's error by: ``"spectra"``
            (default: normalised output spectra, every layer alike), ``"kl"`` (the measured
            increase of the KL divergence of the model's output distributions per unit of the
            layer's error; for models whose output holds logits over its last dimension) or
            ``"mse"`` (the same with the output's relative squared error). The measured ones
            need calibration data at recovery (``compress``, or ``recover_(data=...)``); see
            ``docs/allocation.md``.
        overrides: fnmatch pattern -> rank for the layers that must have that rank (the first
            matching pattern wins); with global allocation the others share the rest.
        offload: a device such as ``"cpu"``: keep each converted layer's dense weight, its
            statistics, reservoir and corrective block cache there (host memory for a GPU
            model) until recovery. Calibration runs the layer with a temporary device copy of
            its weight; statistics are computed on the device and summed on the host; solves
            run on the host; the factors go to the device the inputs came from.

    Returns:
        ``model`` (a low-rank module when ``model`` itself is a single layer). Layers already
        converted are left as they are, so converting twice does not nest.

    Raises:
        ValueError: not exactly one of rank / ratio / energy, or one out of range.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> model = convert(model, ratio=0.5, exclude="2")
        >>> type(model[0]).__name__, type(model[2]).__name__
        ('LowRankLinear', 'Linear')
    """
    allocation_spec = None
    if add_bias is None:
        add_bias = default_add_bias(model)
    elif not isinstance(add_bias, bool):
        raise ValueError(f"convert: add_bias must be True, False or None\nbut got {add_bias!r}")
    if allocation not in ("uniform", "global"):
        raise ValueError(
            f"convert: allocation must be 'uniform' or 'global'\nbut got {allocation!r}"
        )
    if budget not in BUDGETS:
        raise ValueError(f"convert: budget must be one of {', '.join(BUDGETS)}\nbut got {budget!r}")
    if (budget == "bytes" or scheme is not None) and allocation != "global":
        raise ValueError(
            f"convert: budget={budget!r}, scheme={scheme!r} need allocation='global'\n"
            f"but got allocation={allocation!r}"
        )
    if allocation == "global":
        if ratio is None:
            raise ValueError("convert: allocation='global' needs ratio= (the global budget)")
        allocation_spec = GlobalAllocation(
            ratio, budget, round_to, min_rank, max_rank, allocate_by, scheme
        )
        if budget == "bytes":
            require_torchao()
        ratio, rank = None, 1
    else:  # validate the specification once, on a shape every value fits
        if allocate_by != "spectra":
            raise ValueError(f"convert: allocate_by={allocate_by!r} needs allocation='global'")
        target_rank((1 << 20, 1 << 20), rank, ratio, energy, "convert")
    for pattern, fixed in (overrides or {}).items():
        target_rank((1 << 20, 1 << 20), fixed, None, None, f"convert: overrides[{pattern!r}]")
    choices, skipped = _choose(
        model, rank, ratio, energy, include, exclude, overrides or {}, activation,
        allocation_spec, add_bias,
    )  # fmt: skip
    # Nothing has changed so far; from here on, only new modules and assignments.
    hooks = ModelHooks()
    settings = Settings(fold_batchnorm, allocation_spec, tuple(skipped), hooks)
    pending: dict[nn.Module, str] = {}
    root = model
    if not isinstance(model, LowRankModule) and choices:
        hooks.gate = BatchGate(model)
    names = module_names(model)
    for choice in choices:
        new = choice.kind.from_dense(
            choice.standard,
            rank=None if choice.allocated else choice.rank,
            energy=energy,
            add_bias=add_bias,
            name=choice.name,
            samples=samples,
            activation=choice.activation,
            offload=offload,
            settings=settings,
            gate=hooks.gate,
            original=choice.module,
            allocated=choice.allocated,
        )
        replaced = replace_everywhere(model, names[choice.module], new)
        root = root if replaced is model else replaced
        if new.activation_source == "auto":
            pending[new] = choice.name
    if pending and not isinstance(root, LowRankModule):
        hooks.detector = FirstForwardDetector(root, pending, fold=fold_batchnorm)
    for row in skipped:
        logger.info("convert: %s stays dense (%s)", row.name, row.note)
    return root


def _choose(
    model: nn.Module,
    rank: int | None,
    ratio: float | None,
    energy: float | None,
    include: Filter,
    exclude: Filter,
    overrides: dict[str, int],
    activation: Any,
    allocation: GlobalAllocation | None,
    add_bias: bool,
) -> tuple[list[_Choice], list[LayerReport]]:
    """Decide which layers to convert and at what rank, without changing anything."""
    inside: list[str] = []  # prefixes of existing low-rank modules: never convert their children
    chosen: dict[nn.Module, _Choice] = {}
    skipped: list[LayerReport] = []
    used_patterns: set[str] = set()
    tied = tied_weights(model)
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, LowRankModule):
            inside.append(f"{name}." if name else "")
            continue
        if module in chosen:  # the same layer under a second name: swapped with the first
            continue
        standard = adapt(module)  # e.g. GPT-2's Conv1D as the nn.Linear it is
        kind = next((lr for dense, lr in REPLACEMENTS if isinstance(standard, dense)), None)
        if kind is None:
            continue
        if include is not None:
            used_patterns.update(p for p in _patterns(include) if fnmatch.fnmatchcase(name, p))
            if not _matches(include, name, module):
                continue
        if _matches(DEFAULT_EXCLUDE if exclude is None else exclude, name, module):
            skipped.append(dense_row(name, module, "excluded"))
            continue
        if module in tied:
            skipped.append(dense_row(name, module, f"weight tied to {tied[module]}"))
            continue
        if getattr(module, "groups", 1) > 1 and module.in_channels == module.groups:
            skipped.append(dense_row(name, module, "depthwise conv stays dense"))
            continue
        m, n = kind.matrix_shape_of(standard)
        pattern = next((p for p in overrides if fnmatch.fnmatchcase(name, p)), None)
        fixed = None if pattern is None else overrides[pattern]
        if fixed is not None:  # an override the layer cannot hold is an error, not a skip
            label = f"convert: overrides[{pattern!r}] for {name}"
            r = target_rank((m, n), fixed, None, None, label, kind.describe(standard))
        else:
            try:
                spec_rank = rank if rank is None else min(rank, m, n)
                r = target_rank((m, n), spec_rank, ratio, energy, name, kind.describe(standard))
            except ValueError as err:  # e.g. a ratio that leaves this layer no rank
                note = str(err).splitlines()[0].split(": ", 1)[-1]
                skipped.append(dense_row(name, module, note))
                continue
        smallest = 1 if r is None else r
        added = m if add_bias and standard.bias is None else 0  # a bias the factors would add
        if smallest * (m + n) + added >= m * n:
            skipped.append(dense_row(name, module, f"rank {smallest} saves no parameters"))
            continue
        allocated = allocation is not None and fixed is None  # rank chosen at recovery
        spec = activation.get(name, "auto") if isinstance(activation, Mapping) else activation
        chosen[module] = _Choice(module, name, standard, kind, r, spec, allocated)
    for pattern in _patterns(include):
        if pattern not in used_patterns:
            warnings.warn(f"convert: include pattern {pattern!r} matched no module", stacklevel=3)
    return list(chosen.values()), skipped


@torch.no_grad()
def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` for every low-rank module of ``model`` that is still calibrating:
    put the original dense layer back at every name (on its own device again when offloaded)
    and remove the conversion's hooks. Returns the model (the dense layer when ``model`` itself
    was one converted layer).

    Example:
        >>> model = convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), rank=2)
        >>> type(revert(model)[0]).__name__
        'Linear'
    """
    root = model
    for module, names in low_rank_modules(model).items():
        if not module.calibrating:
            continue
        dense = module.original
        if module.offload is not None:
            dense.to(module.home)
        module.carry_hooks_to(dense)
        module.observer.close()
        if module.settings is not None:
            module.settings.hooks.remove()
        replaced = replace_everywhere(model, names, dense)
        root = root if replaced is model else replaced
    return root
