"""Saving a compressed model to a directory and building it back, Hugging Face style.

:func:`save_pretrained` writes a directory::

    config.json                 the model's Hugging Face config (transformers models only)
    torch_lowrank.json          the library version, every low-rank layer's name, type and rank,
                                which weights are tied to which, the quantization scheme of
                                every quantized layer, and the report when given
    torch_lowrank.safetensors   the state dict, each tied tensor once; a weight quantized by
                                :func:`~torch_lowrank.quantize_factors_` as its plain tensors
                                plus metadata (:mod:`torch_lowrank.quantized_state`)

The weights file is not named ``model.safetensors`` on purpose: transformers' own
``from_pretrained`` would load a compressed directory as a dense model with missing weights, so it
refuses it instead.

:func:`from_pretrained` builds the architecture from ``config.json`` alone (or from a builder for
a plain PyTorch model) with every *parameter* on the ``meta`` device, so nothing dense is
allocated; buffers are built for real, so that the non-persistent ones a model computes in its
constructor (rotary ``inv_freq``, position ids) are computed by the model's own code. Then the
listed layers become low-rank modules of their ranks, the weights are loaded strictly by
assignment (:func:`~torch_lowrank.load_state_dict`; quantized weights come back as the torchao
tensors they were saved as) and parameters shared in the built architecture (GPT-2's ``lm_head``
and ``wte``) are shared again where they were shared in the saved model.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from .model import low_rank_modules
from .quantize import is_quantized, quantization_of
from .quantized_state import flatten_state_dict, unflatten_state_dict
from .report import Report
from .serialize import load_state_dict

__all__ = ["FORMAT", "INFO_FILE", "WEIGHTS_FILE", "from_pretrained", "save_pretrained"]

INFO_FILE = "torch_lowrank.json"
WEIGHTS_FILE = "torch_lowrank.safetensors"
CONFIG_FILE = "config.json"
#: The version of the directory layout (``"format"`` in :data:`INFO_FILE`).
FORMAT = 1

PathLike = Union[str, "os.PathLike[str]"]


def require(package: str, what: str) -> Any:
    """Import ``package``, or raise an ``ImportError`` that says which extra installs it.

    Example:
        >>> require("json", "tl.save_pretrained").__name__
        'json'
    """
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"{what} needs {package.split('.')[0]}, which is not installed;\n"
            "install it with: pip install 'torch_lowrank[hf]'"
        ) from err


def _directory(directory: Any, where: str) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(
            f"{where}: directory must be a path (str or os.PathLike)\n"
            f"but got {type(directory).__name__}"
        )
    return Path(directory)


@dataclass
class _Weights:
    """A state dict as saved: each tensor once, the names that share another's tensor, and the
    safetensors metadata (how quantized tensors were flattened into plain ones)."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)  # name -> the name saved for it
    metadata: dict[str, str] = field(default_factory=lambda: {"format": "pt"})


def _weights(state: dict[str, Tensor], quantized: bool) -> _Weights:
    """``state`` with tied tensors saved once, quantized tensors flattened into plain ones
    (when ``quantized``), every tensor on the CPU, contiguous and owning its storage
    (safetensors stores neither views nor shared memory)."""
    out = _Weights()
    seen: dict[tuple, str] = {}
    unique: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if is_quantized(tensor):  # a torchao tensor has no storage of its own: tied by identity
            view: tuple = (id(tensor),)
        else:
            storage = tensor.untyped_storage().data_ptr()
            view = (storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if view in seen:
            out.tied[name] = seen[view]
        else:
            seen[view] = name
            unique[name] = tensor.detach()
    if quantized:
        unique, metadata = flatten_state_dict(unique)
        out.metadata.update(metadata)
    storages: set[int] = set()
    for name, tensor in unique.items():
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        storages.add(storage)
        out.tensors[name] = tensor.to("cpu")
    return out


def _layers(model: nn.Module, where: str) -> dict[str, dict]:
    """Every low-rank module of ``model`` by name: its type and rank; refuses calibrating ones."""
    found = low_rank_modules(model)
    calibrating = [names[0] or "model" for module, names in found.items() if module.calibrating]
    if calibrating:
        raise ValueError(
            f"{where}: recover every low-rank module before saving; still calibrating:\n"
            f"{', '.join(calibrating)}"
        )
    return {
        name: {"type": type(module).__name__, "rank": module.rank}
        for module, names in found.items()
        for name in names
    }


def save_pretrained(model: nn.Module, directory: PathLike, *, report: Report | None = None) -> None:
    """Save a compressed model to ``directory`` (created if needed), to be built back by
    :func:`from_pretrained`.

    Writes the model's Hugging Face config (when it has one; ``architectures`` set to the
    model's class), ``torch_lowrank.json`` (the library version, every low-rank layer's name,
    type and rank, the tied weights, the scheme of every layer quantized by
    :func:`~torch_lowrank.quantize_factors_` and ``report``) and the weights as safetensors
    (quantized weights as their plain tensors plus metadata; saving them needs torchao). Nothing
    is written when the model cannot be saved.

    Args:
        model: a model whose low-rank modules are recovered (dense models work too).
        directory: where to write; existing files of the same names are replaced.
        report: the :class:`~torch_lowrank.Report` of the compression, saved with the model.

    Raises:
        ValueError: a low-rank module is still calibrating (named).
        TypeError: ``directory`` is not a path or ``report`` not a ``Report``.
        ImportError: safetensors (or, for a Hugging Face model, transformers) is missing.

    Example:
        >>> import tempfile, torch, torch_lowrank as tl
        >>> def build():
        ...     return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> model, report = tl.compress(build(), [torch.randn(64, 32)], rank=4, exclude="2")
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     tl.save_pretrained(model, directory, report=report)
        ...     loaded = tl.from_pretrained(directory, build=build)
        >>> x = torch.randn(3, 32)
        >>> loaded[0].rank, torch.equal(loaded(x), model(x))
        (4, True)
    """
    path = _directory(directory, "save_pretrained")
    if report is not None and not isinstance(report, Report):
        raise TypeError(
            f"save_pretrained: report must be a torch_lowrank Report or None\n"
            f"but got {type(report).__name__}"
        )
    safetensors = require("safetensors.torch", "save_pretrained")
    from . import __version__

    layers = _layers(model, "save_pretrained")
    quantization = quantization_of(model)
    state = model.state_dict()
    weights = _weights(state, quantized=any(is_quantized(t) for t in state.values()))
    config = getattr(model, "config", None)
    if not callable(getattr(config, "save_pretrained", None)):
        config = None
    else:
        require("transformers", "save_pretrained of a Hugging Face model")
        config = copy.deepcopy(config)
        config.architectures = [type(model).__name__]
    info = {
        "format": FORMAT,
        "torch_lowrank": __version__,
        "layers": layers,
        "tied": weights.tied,
        "quantization": quantization,
        "report": None if report is None else report.to_dict(),
    }
    text = json.dumps(info, indent=2)
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        config.save_pretrained(path)
    safetensors.save_file(weights.tensors, path / WEIGHTS_FILE, metadata=weights.metadata)
    (path / INFO_FILE).write_text(text + "\n")


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within the block, every parameter a module registers is moved to the ``meta`` device
    (buffers are not), so building a model allocates none of its weights. It uses PyTorch's
    global parameter registration hook: do not build other models in other threads meanwhile.

    Example:
        >>> with parameters_on_meta():
        ...     layer = nn.Linear(4, 4)
        >>> layer.weight.device.type
        'meta'
    """

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> Any:
        if param is None or param.is_meta:
            return None  # e.g. a tie to a parameter already on meta: keep the same object
        return nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    handle = register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def _build_hugging_face(path: Path) -> nn.Module:
    transformers = require("transformers", "from_pretrained of a Hugging Face model")
    config = transformers.AutoConfig.from_pretrained(path)
    names = getattr(config, "architectures", None) or []
    kind = getattr(transformers, names[0], None) if names else transformers.AutoModel
    if kind is None:
        raise ValueError(
            f"from_pretrained: {path / CONFIG_FILE} names architecture {names[0]!r}, which "
            "transformers does not have;\npass build=, a function that returns the dense model"
        )
    with parameters_on_meta():
        return kind.from_config(config) if kind is transformers.AutoModel else kind(config)


@dataclass(frozen=True)
class _Holder:
    """One place a parameter is held: ``getattr(module, attribute)``, saved as ``name``."""

    module: nn.Module
    attribute: str
    name: str


def _tie_groups(model: nn.Module) -> list[list[_Holder]]:
    """Every parameter held by several modules (or names): its holders."""
    holders: dict[int, list[_Holder]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attribute, param in module.named_parameters(recurse=False):
            name = f"{prefix}.{attribute}" if prefix else attribute
            holders.setdefault(id(param), []).append(_Holder(module, attribute, name))
    return [group for group in holders.values() if len(group) > 1]


def _load_weights(path: Path, info: dict) -> dict[str, Tensor]:
    """The saved state dict: quantized tensors rebuilt (needs torchao only when there are
    some), each tied name holding the very tensor of the name it is tied to."""
    file = path / WEIGHTS_FILE
    with require("safetensors", "from_pretrained").safe_open(file, "pt") as handle:
        metadata = handle.metadata() or {}
    state = unflatten_state_dict(
        require("safetensors.torch", "from_pretrained").load_file(file), metadata
    )
    for name, saved in info.get("tied", {}).items():
        state[name] = state[saved]
    return state


def from_pretrained(directory: PathLike, build: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Build a model saved by :func:`save_pretrained` back, in eval mode.

    The architecture comes from ``config.json`` (the class named in its ``architectures``, built
    from the config alone) or from ``build``, with its parameters on the ``meta`` device; the
    layers listed in ``torch_lowrank.json`` become recovered low-rank modules of their ranks;
    then the weights are loaded strictly, without allocating any dense weight (quantized ones
    as the torchao tensors they were saved as; torchao is needed then), and parameters tied in
    the saved model are shared again. Non-persistent buffers are computed by the model's own
    constructor. The outputs are those of the saved model.

    Args:
        directory: a directory written by :func:`save_pretrained`.
        build: ``build()`` returns the dense model (needed for a model saved without a Hugging
            Face config; it overrides ``config.json``). It is called with every parameter
            created on the ``meta`` device (:func:`parameters_on_meta`).

    Returns:
        the model, on the CPU, in eval mode.

    Raises:
        FileNotFoundError: ``directory`` holds no ``torch_lowrank.json``.
        ValueError: no builder for a model without config, an unknown format, or the built
            model does not match the saved one (named: a layer, rank or weight).
        ImportError: safetensors (or, for a Hugging Face model, transformers; for quantized
            weights, torchao) is missing.
        RuntimeError: from :meth:`torch.nn.Module.load_state_dict` (missing or unexpected keys).

    Example:
        >>> import tempfile, torch, torch_lowrank as tl
        >>> def build():
        ...     return nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        >>> model = tl.convert(build(), rank=2)
        >>> _ = tl.recover_(model, method="svd")
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     tl.save_pretrained(model, directory)
        ...     type(tl.from_pretrained(directory, build=build)[0]).__name__
        'LowRankLinear'
    """
    path = _directory(directory, "from_pretrained")
    if build is not None and not callable(build):
        raise TypeError(f"from_pretrained: build must be callable\nbut got {build!r}")
    if not (path / INFO_FILE).is_file():
        raise FileNotFoundError(
            f"from_pretrained: {path} holds no {INFO_FILE}; it was not written by "
            "tl.save_pretrained (a dense Hugging Face model loads with transformers' own "
            "from_pretrained)"
        )
    info = json.loads((path / INFO_FILE).read_text())
    if info.get("format") != FORMAT:
        raise ValueError(
            f"from_pretrained: {path / INFO_FILE} has format {info.get('format')!r}; this "
            f"version of torch_lowrank reads format {FORMAT}"
        )
    require("safetensors.torch", "from_pretrained")
    if build is not None:
        with parameters_on_meta():
            model = build()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"from_pretrained: build() must return an nn.Module\nbut got {type(model).__name__}"
            )
    elif (path / CONFIG_FILE).is_file():
        model = _build_hugging_face(path)
    else:
        raise ValueError(
            f"from_pretrained: {path} holds no {CONFIG_FILE} (the model had no Hugging Face "
            "config);\npass build=, a function that returns the dense model"
        )
    state = _load_weights(path, info)
    groups = _tie_groups(model)
    model = load_state_dict(model, state, strict=True, assign=True)
    for first, *others in groups:
        for holder in others:  # tied again where the saved model had them tied
            if state.get(holder.name) is state.get(first.name):
                setattr(holder.module, holder.attribute, getattr(first.module, first.attribute))
    _check(model, info["layers"], path)
    return model.eval()


def _check(model: nn.Module, listed: dict[str, dict], path: Path) -> None:
    """The built model holds no meta tensor and exactly the listed low-rank layers."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise ValueError(
                f"from_pretrained: {name} is neither in the saved weights nor built by the "
                "model's constructor (it is still on the meta device)"
            )
    found = {n: module.rank for module, names in low_rank_modules(model).items() for n in names}
    for name in sorted(set(found) | set(listed)):
        rank = listed.get(name, {}).get("rank")
        if found.get(name) != rank:
            raise ValueError(
                f"from_pretrained: layer {name!r}: {path / INFO_FILE} lists rank {rank}\n"
                f"but the loaded model has rank {found.get(name)}"
            )
