"""Finding and swapping layers, and calibrating.

The flow mirrors ``torch.ao.quantization``'s prepare -> calibrate -> convert::

    tl.convert(model, ratio=0.5)      # swap layers for calibrating low-rank modules
    tl.calibrate(model, batches)      # or run your own forward passes
    report = tl.recover_(model)       # solve every layer, all or nothing (recover.py)

Layers are found on a snapshot of ``named_modules()`` taken before anything is swapped, and
replaced in their parent with ``setattr`` (as torchao's ``quantize_`` does). What ``convert``
decides for later (layers left dense, global-allocation settings, the activation detector) is
kept per model in weak registries here, never on the model itself.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .base import _LowRankBase, target_rank
from .conv import LowRankConv1d, LowRankConv2d
from .detect import FirstForwardDetector
from .families import DEFAULT_EXCLUDE, adapt, forward_kwargs, tied_weights
from .linear import LowRankLinear
from .report import LayerReport

__all__ = ["convert", "calibrate", "default_forward", "progress_bar"]

logger = logging.getLogger(__name__)

Filter = Union[str, Sequence[str], Callable[[str, nn.Module], bool], None]

# Which low-rank module replaces which dense layer type.
_REPLACEMENTS = ((nn.Linear, LowRankLinear), (nn.Conv2d, LowRankConv2d), (nn.Conv1d, LowRankConv1d))

# Layers convert() left dense, per model, so that recover_() can list them with the reason.
_SKIPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Global allocation settings per model, applied at recovery.
_ALLOCATIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# The activation detector waiting for a model's first forward.
_DETECTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _patterns(spec: Filter) -> list[str]:
    if spec is None or callable(spec):
        return []
    return [spec] if isinstance(spec, str) else list(spec)


def _matches(spec: Filter, name: str, module: nn.Module) -> bool:
    if callable(spec):
        return bool(spec(name, module))
    return any(fnmatch.fnmatchcase(name, p) for p in _patterns(spec))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _dense_row(name: str, module: nn.Module, note: str) -> LayerReport:
    params = sum(p.numel() for p in module.parameters())
    return LayerReport(
        name, tuple(adapt(module).weight.shape), None, params, params, 0.0, "dense", 0.0, note
    )


def _low_rank_modules(model: nn.Module) -> dict[nn.Module, list[str]]:
    """Every low-rank module of ``model`` with all the names it is reachable under."""
    found: dict[nn.Module, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, _LowRankBase):
            found.setdefault(module, []).append(name)
    return found


def convert(
    model: nn.Module,
    *,
    rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    include: Filter = None,
    exclude: Filter = None,
    add_bias: bool = True,
    samples: int = 4096,
    activation: Any = "auto",
    fold_batchnorm: bool = True,
    allocation: str = "uniform",
    budget: str = "params",
    round_to: int = 1,
    min_rank: int = 1,
    max_rank: int | None = None,
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
        add_bias: see :meth:`LowRankLinear.from_linear`.
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
        budget: what ``ratio`` counts with global allocation: ``"params"`` (weights) or
            ``"flops"`` (multiply-accumulates; a conv counts its output positions).
        round_to: global allocation gives ranks that are multiples of this (e.g. 8).
        min_rank / max_rank: bounds on each rank under global allocation.
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
    # Validate the specification once, on a shape every value fits.
    target_rank((1 << 20, 1 << 20), rank, ratio, energy, "convert")
    if allocation not in ("uniform", "global"):
        raise ValueError(
            f"convert: allocation must be 'uniform' or 'global'\nbut got {allocation!r}"
        )
    if allocation == "global" and ratio is None:
        raise ValueError("convert: allocation='global' needs ratio= (the global budget)")
    if budget not in ("params", "flops"):
        raise ValueError(f"convert: budget must be 'params' or 'flops'\nbut got {budget!r}")
    global_ratio, ratio, rank = (ratio, None, 1) if allocation == "global" else (None, ratio, rank)

    inside: list[str] = []  # prefixes of existing low-rank modules: never convert their children
    swapped: dict[nn.Module, nn.Module] = {}
    skipped: list[LayerReport] = []
    used_patterns: set[str] = set()
    root = model
    tied = tied_weights(model)
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, _LowRankBase):
            inside.append(f"{name}." if name else "")
            continue
        if module in swapped:  # the same layer under a second name
            _replace(model, name, swapped[module])
            continue
        standard = adapt(module)  # e.g. GPT-2's Conv1D as the nn.Linear it is
        low_rank = next((lr for dense, lr in _REPLACEMENTS if isinstance(standard, dense)), None)
        if low_rank is None:
            continue
        if include is not None:
            hits = [p for p in _patterns(include) if fnmatch.fnmatchcase(name, p)]
            used_patterns.update(hits)
            if not _matches(include, name, module):
                continue
        if _matches(DEFAULT_EXCLUDE if exclude is None else exclude, name, module):
            skipped.append(_dense_row(name, module, "excluded"))
            continue
        if module in tied:
            skipped.append(_dense_row(name, module, f"weight tied to {tied[module]}"))
            continue
        if getattr(module, "groups", 1) > 1 and module.in_channels == module.groups:
            skipped.append(_dense_row(name, module, "depthwise conv stays dense"))
            continue
        m, n = low_rank.matrix_shape_of(standard)
        fixed = next(
            (r for p, r in (overrides or {}).items() if fnmatch.fnmatchcase(name, p)), None
        )
        try:
            if fixed is not None:
                r = target_rank((m, n), fixed, None, None, name)
            else:
                spec_rank = rank if rank is None else min(rank, m, n)
                r = target_rank((m, n), spec_rank, ratio, energy, name)
        except ValueError as err:
            skipped.append(_dense_row(name, module, str(err).splitlines()[0].split(": ", 1)[-1]))
            continue
        smallest = 1 if r is None else r
        if smallest * (m + n) >= m * n:
            skipped.append(_dense_row(name, module, f"rank {smallest} saves no parameters"))
            continue
        spec = activation.get(name, "auto") if isinstance(activation, Mapping) else activation
        new = low_rank.from_dense(
            standard,
            rank=r,
            energy=energy,
            add_bias=add_bias,
            name=name,
            samples=samples,
            activation=spec,
        )
        if global_ratio is not None and fixed is None:
            new.target_rank = None  # chosen at recovery by global allocation
        if offload is not None:
            new.offload = torch.device(offload)
            new.home = standard.weight.device
            standard.to(new.offload)
        swapped[module] = new
        if name:
            _replace(model, name, new)
        else:
            root = new
    for pattern in _patterns(include):
        if pattern not in used_patterns:
            warnings.warn(f"convert: include pattern {pattern!r} matched no module", stacklevel=2)
    for row in skipped:
        logger.info("convert: %s stays dense (%s)", row.name, row.note)
    _SKIPPED[root] = skipped
    if global_ratio is not None:
        _ALLOCATIONS[root] = {
            "ratio": global_ratio,
            "budget": budget,
            "round_to": round_to,
            "min_rank": min_rank,
            "max_rank": max_rank,
        }
    pending = {m: names[0] for m, names in _low_rank_modules(root).items() if _pending(m)}
    if pending and not isinstance(root, _LowRankBase):
        if root in _DETECTORS:
            _DETECTORS[root].remove()
        _DETECTORS[root] = FirstForwardDetector(root, pending, fold=fold_batchnorm)
    return root


def _pending(module: _LowRankBase) -> bool:
    return module.calibrating and module.activation_source == "auto"


def progress_bar(items: Iterable, what: str, enabled: bool) -> Iterable:
    """``items`` with a tqdm progress bar: shown on an interactive terminal when ``enabled``."""
    total = len(items) if hasattr(items, "__len__") else None
    return tqdm(items, desc=what, total=total, disable=None if enabled else True, leave=False)


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    return None


def _move(value: Any, device: torch.device | None) -> Any:
    return value.to(device) if isinstance(value, Tensor) and device is not None else value


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run one calibration batch: a tensor is the input; a mapping is passed as keyword
    arguments; a tuple or list is ``(inputs, targets, ...)`` and only ``inputs`` is used.
    Tensors are moved to the model's device. Hugging Face models get ``use_cache=False``."""
    return _run_batch(model, batch, _model_device(model), forward_kwargs(model))


def _run_batch(model: nn.Module, batch: Any, device: torch.device | None, extra: dict) -> Any:
    """:func:`default_forward` with the model's device and extra keyword arguments looked up
    already (once per :func:`calibrate`, not once per batch)."""
    if isinstance(batch, Mapping):
        return model(**{**extra, **{k: _move(v, device) for k, v in batch.items()}})
    if isinstance(batch, (tuple, list)):
        return model(_move(batch[0], device), **extra)
    return model(_move(batch, device), **extra)


def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
) -> int:
    """Run calibration batches through ``model`` in eval mode without gradients.

    The calibrating modules' hooks accumulate their statistics; the model's train/eval mode is
    restored afterwards. Returns the number of batches. ``progress`` shows a tqdm bar on an
    interactive terminal (``False``: never).

    Example:
        >>> model = convert(nn.Sequential(nn.Linear(32, 32)), rank=4)
        >>> calibrate(model, [torch.randn(16, 32) for _ in range(3)])
        3
    """
    if forward_fn is None:  # default_forward, with its per-model lookups done once
        forward_fn = functools.partial(
            _run_batch, device=_model_device(model), extra=forward_kwargs(model)
        )
    was_training = model.training
    model.eval()
    count = 0
    try:
        with torch.no_grad():
            for batch in progress_bar(data, "calibrating", progress):
                forward_fn(model, batch)
                count += 1
    finally:
        model.train(was_training)
    return count
