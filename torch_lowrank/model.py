"""The model as the pipeline sees it: its low-rank modules by name, swapping one module for
another at every name it has, eval mode for a pass, and running calibration batches.

A module can be reachable under several names (a layer shared by two parents, a model whose
``forward`` reuses a block); swapping it must replace it everywhere, and the parent is found by
qualified name and the child replaced with ``setattr`` (as torchao's ``quantize_`` does).

Every pass the library makes over calibration data runs the model in eval mode without
gradients and gives each module's own train/eval mode back afterwards (:func:`eval_mode`), so a
model left in train mode compresses exactly as the same model in eval mode, and its BatchNorm
statistics and dropout state are never touched.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .activations import FoldedBatchNorm
from .base import LowRankModule
from .families import forward_kwargs

__all__ = [
    "FactorStandIn",
    "calibrate",
    "default_forward",
    "eval_mode",
    "low_rank_modules",
    "module_names",
    "progress_bar",
    "replace",
    "replace_everywhere",
    "run_batch",
    "settings_of",
    "stood_in",
    "world_size",
]


def module_names(model: nn.Module) -> dict[nn.Module, list[str]]:
    """Every module of ``model`` with all the qualified names it is reachable under.

    Example:
        >>> shared = nn.Linear(2, 2)
        >>> model = nn.Sequential(shared, nn.ReLU(), shared)
        >>> module_names(model)[shared]
        ['0', '2']
    """
    names: dict[nn.Module, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(module, []).append(name)
    return names


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set ``new`` as the submodule ``name`` (a non-empty qualified name) of ``model``.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> replace(model, "0", nn.Identity())
        >>> type(model[0]).__name__
        'Identity'
    """
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def replace_everywhere(model: nn.Module, names: list[str], new: nn.Module) -> nn.Module:
    """Set ``new`` at every name in ``names``; returns the new root (``new`` itself when one
    of the names is ``""``, the model), else ``model``.

    Example:
        >>> shared = nn.Linear(2, 2)
        >>> model = nn.Sequential(shared, shared)
        >>> root = replace_everywhere(model, ["0", "1"], nn.Identity())
        >>> [type(m).__name__ for m in root]
        ['Identity', 'Identity']
    """
    root = model
    for name in names:
        if name:
            replace(model, name, new)
        else:
            root = new
    return root


def low_rank_modules(model: nn.Module) -> dict[nn.Module, list[str]]:
    """Every low-rank module of ``model`` with all the names it is reachable under.

    Example:
        >>> from torch_lowrank import LowRankLinear
        >>> model = nn.Sequential(LowRankLinear(8, 8, rank=2), nn.ReLU())
        >>> list(low_rank_modules(model).values())
        [['0']]
    """
    return {m: names for m, names in module_names(model).items() if isinstance(m, LowRankModule)}


def settings_of(model: nn.Module) -> list:
    """The distinct :class:`~torch_lowrank.settings.Settings` of the calibrating low-rank
    modules of ``model`` (one per :func:`~torch_lowrank.convert` call that touched it).

    Example:
        >>> import torch_lowrank as tl
        >>> model = tl.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), rank=2)
        >>> len(settings_of(model)), len(settings_of(nn.Linear(2, 2)))
        (1, 0)
    """
    found: list = []
    for module in model.modules():
        settings = getattr(module, "settings", None)
        calibrating = getattr(module, "calibrating", False)
        if calibrating and settings is not None and all(settings is not s for s in found):
            found.append(settings)
    return found


class FactorStandIn(nn.Sequential):
    """A solved layer's factor layers ``(down, up)``, run in place of its calibrating module
    (:func:`stood_in`) while later layers are solved. Model code that reads the layer's
    ``weight`` (T5 checks its dtype) gets the product of linear factors.

    Example:
        >>> stand_in = FactorStandIn(nn.Linear(8, 2, bias=False), nn.Linear(2, 4))
        >>> tuple(stand_in.weight.shape)
        (4, 8)
    """

    @property
    def weight(self) -> Tensor:
        down, up = self[0], self[-1]
        if not (isinstance(down, nn.Linear) and isinstance(up, nn.Linear)):
            raise AttributeError("weight: only the stand-in of a linear layer has one")
        return up.weight @ down.weight


@contextlib.contextmanager
def stood_in(
    model: nn.Module,
    stand_ins: Mapping[nn.Module, nn.Module],
    names: Mapping[nn.Module, list[str]],
    fold: Mapping[nn.Module, list[str]],
) -> Iterator[None]:
    """Context manager: inside, every module of ``stand_ins`` is replaced at each of its
    ``names`` by its stand-in (a calibrating layer by its solved factors), and the BatchNorm
    folded into it, at the names ``fold`` gives, by a ``FoldedBatchNorm``; everything is put
    back afterwards (also when the body fails).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> with stood_in(model, {model[0]: nn.Identity()}, module_names(model), {}):
        ...     type(model[0]).__name__
        'Identity'
        >>> type(model[0]).__name__
        'Linear'
    """
    swaps: list[tuple[str, nn.Module]] = []
    for module, stand_in in stand_ins.items():
        swaps += [(name, stand_in) for name in names[module] if name]
        if fold.get(module):
            folded = FoldedBatchNorm.like(module.folded_batchnorm[0])
            swaps += [(name, folded) for name in fold[module]]
    places: list[tuple[nn.Module, str, nn.Module]] = []
    for name, stand_in in swaps:
        parent_name, _, attr = name.rpartition(".")
        places.append((model.get_submodule(parent_name), attr, stand_in))
    originals = [getattr(parent, attr) for parent, attr, _ in places]
    try:
        for parent, attr, stand_in in places:
            setattr(parent, attr, stand_in)
        yield
    finally:
        for (parent, attr, _), original in zip(places, originals):
            setattr(parent, attr, original)


def world_size() -> int:
    """How many processes calibrate and recover together: the size of the running
    ``torch.distributed`` process group, 1 without one (see ``docs/scaling-out.md``).

    Example:
        >>> world_size()
        1
    """
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Context manager: every module of ``models`` in eval mode inside, each module's own
    train/eval mode back afterwards (also when the body fails).

    Example:
        >>> model = nn.Sequential(nn.Dropout(), nn.Linear(2, 2)).train()
        >>> with eval_mode(model):
        ...     model[0].training
        False
        >>> model[0].training
        True
    """
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


def progress_bar(items: Iterable, what: str, enabled: bool) -> Iterable:
    """``items`` with a tqdm progress bar: shown on an interactive terminal when ``enabled``.

    Example:
        >>> list(progress_bar([1, 2], "counting", enabled=False))
        [1, 2]
    """
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
    Tensors are moved to the model's device. Hugging Face models get ``use_cache=False``.

    Example:
        >>> default_forward(nn.Linear(3, 1), (torch.ones(2, 3), "label")).shape
        torch.Size([2, 1])
    """
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

    The calibrating modules' observers accumulate their statistics, batch by batch: a batch
    whose forward fails adds nothing. Every module's train/eval mode is restored afterwards.
    Returns the number of batches. ``progress`` shows a tqdm bar on an interactive terminal
    (``False``: never).

    Example:
        >>> import torch_lowrank as tl
        >>> model = tl.convert(nn.Sequential(nn.Linear(32, 32)), rank=4)
        >>> calibrate(model, [torch.randn(16, 32) for _ in range(3)])
        3
    """
    if forward_fn is None:  # default_forward, with its per-model lookups done once
        forward_fn = functools.partial(
            _run_batch, device=_model_device(model), extra=forward_kwargs(model)
        )
    count = 0
    with eval_mode(model), torch.no_grad():
        for batch in progress_bar(data, "calibrating", progress):
            run_batch(model, batch, forward_fn)
            count += 1
    return count


def run_batch(model: nn.Module, batch: Any, forward_fn: Callable) -> Any:
    """``forward_fn(model, batch)``; if it does not finish (an error, Ctrl-C), what it showed
    the observers is dropped and an activation observation in progress is ended.

    Example:
        >>> import torch_lowrank as tl
        >>> model = tl.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), rank=2)
        >>> try:
        ...     run_batch(model, torch.randn(4, 3), default_forward)  # the wrong width
        ... except ValueError:
        ...     pass
        >>> model[0].samples_seen  # the failed batch added nothing
        0
    """
    try:
        return forward_fn(model, batch)
    except BaseException:
        for settings in settings_of(model):
            settings.hooks.abort()
        raise
