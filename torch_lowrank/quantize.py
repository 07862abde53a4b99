"""Quantized factors: torchao's weight quantization applied to the recovered factor layers.

Low rank and quantization multiply: a layer kept at rank ``r`` holds ``r (m + n)`` weights, and
each of them can be stored in 8 bits instead of 32. After recovery the factors of a
:class:`~torch_lowrank.LowRankLinear` are two ordinary ``nn.Linear`` layers (``down``, ``up``), so
torchao's ``quantize_`` (https://github.com/pytorch/ao) applies to them as to any other Linear;
:func:`quantize_factors_` does it for the factor layers only (and, when asked, for the dense
Linears that remain).

The state lives in the weights: torchao swaps a quantized layer's ``weight`` for a tensor
subclass (``Int8Tensor``, ``Float8Tensor``, ...) that knows its own scheme, so the scheme of every
layer can be read back from a model (:func:`quantization_of`), ``torch.save`` / ``torch.load(...,
weights_only=True)`` keep it (torchao registers its tensors as safe globals), and
:mod:`torch_lowrank.quantized_state` turns such a state dict into plain tensors plus JSON
metadata for ``safetensors`` and back. Loading a quantized state dict into a freshly
built model needs ``assign=True`` (the float parameters there cannot hold the quantized tensors).

torchao quantizes ``nn.Linear``: the factor layers of a
:class:`~torch_lowrank.LowRankConv2d` / :class:`~torch_lowrank.LowRankConv1d` (two convs) stay
in floating point. torchao is optional (``pip install 'torch_lowrank[quant]'``) and is imported
only when one of these functions runs.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import math
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn

from .base import LowRankModule
from .model import low_rank_modules, module_names

__all__ = [
    "SCHEMES",
    "Scheme",
    "available_schemes",
    "check_runs",
    "is_quantized",
    "quantization_of",
    "quantize_factors_",
    "quantize_layers_",
    "require_torchao",
]

INSTALL_HINT = "pip install 'torch_lowrank[quant]'  (or: pip install torchao)"

#: Which dense Linears :func:`quantize_factors_` quantizes besides the factors: none (``False``),
#: all (``True``), those whose qualified name matches fnmatch pattern(s), or ``callable(name,
#: module)``.
DenseFilter = Union[bool, str, list, tuple, Callable[[str, nn.Module], bool]]


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme: the torchao config it stands for and what its weights cost.

    Attributes:
        name: the name :func:`quantize_factors_` takes.
        config: the torchao config class (in ``torchao.quantization``).
        bits: bits per stored weight.
        group: input columns sharing one scale (``None``: one scale per output row).
        overhead: bytes stored per group besides the weights (scale, zero point).
        activations: what happens to the layer's inputs.
    """

    name: str
    config: str
    bits: int
    group: int | None
    overhead: int
    activations: str

    def make_config(self) -> Any:
        """The torchao config object (imports torchao)."""
        return getattr(require_torchao("quantization"), self.config)()

    def nbytes(self, rows: int, cols: int) -> float:
        """Bytes of an ``rows x cols`` weight in this scheme, scales included.

        Example:
            >>> SCHEMES["int8"].nbytes(64, 32)  # int8 weights, an fp32 scale and int8 zero a row
            2368.0
        """
        groups = 1 if self.group is None else math.ceil(cols / self.group)
        return rows * cols * self.bits / 8 + rows * groups * self.overhead


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("int8", "Int8WeightOnlyConfig", 8, None, 5, "float"),
        Scheme(
            "int8-dynamic", "Int8DynamicActivationInt8WeightConfig", 8, None, 5,
            "int8, per token",
        ),
        Scheme("float8", "Float8WeightOnlyConfig", 8, None, 4, "float"),
        Scheme(
            "float8-dynamic", "Float8DynamicActivationFloat8WeightConfig", 8, None, 4,
            "float8, per token",
        ),
        Scheme("int4", "Int4WeightOnlyConfig", 4, 128, 4, "float"),
    )
}  # fmt: skip


def require_torchao(submodule: str = "") -> Any:
    """``torchao`` (or its ``submodule``), or an ``ImportError`` with the install command.

    Example:
        >>> try:
        ...     found = hasattr(require_torchao("quantization"), "quantize_")
        ... except ImportError as err:  # torchao is optional: the message says how to get it
        ...     found = INSTALL_HINT in str(err)
        >>> found
        True
    """
    name = f"torchao.{submodule}" if submodule else "torchao"
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"quantized factors need torchao, which is not installed:\n{INSTALL_HINT}"
        ) from err


def _check_scheme(scheme: Any, where: str) -> Scheme:
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"{where}: scheme must be one of {', '.join(SCHEMES)}\nbut got {scheme!r}")
    return SCHEMES[scheme]


@functools.cache
def _runs(scheme: str, device: str, dtype: torch.dtype) -> bool:
    """Whether torchao quantizes a Linear in ``scheme`` on ``device`` and runs it: torchao
    decides per scheme, device, dtype and installed kernels, and says so by raising."""
    layer = nn.Linear(256, 256, bias=False, device=device, dtype=dtype)
    quantization = require_torchao("quantization")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            quantization.quantize_(nn.Sequential(layer), SCHEMES[scheme].make_config())
            out = layer(torch.randn(4, 256, device=device, dtype=dtype))
    except Exception:  # any refusal (assertion, missing kernel, import) means: not here
        return False
    return is_quantized(layer.weight) and bool(torch.isfinite(out).all())


def available_schemes(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[str, ...]:
    """The schemes the installed torchao quantizes and runs on ``device`` for ``dtype``
    weights (found by trying each once on a small layer; the answer is cached).

    Raises:
        ImportError: torchao is not installed.

    Example:
        >>> {"int8", "int8-dynamic"} <= set(available_schemes("cpu"))
        True
    """
    require_torchao()
    device = torch.device(device)
    return tuple(s for s in SCHEMES if _runs(s, str(device), dtype))


def is_quantized(tensor: Any) -> bool:
    """Whether ``tensor`` is a torchao tensor (none can exist before torchao is imported).

    Example:
        >>> is_quantized(torch.ones(2))
        False
    """
    utils = sys.modules.get("torchao.utils")
    return utils is not None and isinstance(tensor, utils.TorchAOBaseTensor)


def _scheme_of(tensor: Tensor) -> str:
    """The scheme of a torchao weight (its class name when it is none of :data:`SCHEMES`)."""
    kind = type(tensor).__name__
    dynamic = getattr(tensor, "act_quant_kwargs", None) is not None
    if kind == "Int8Tensor":
        return "int8-dynamic" if dynamic else "int8"
    if kind == "Float8Tensor":
        return "float8-dynamic" if dynamic else "float8"
    if kind.startswith("Int4"):
        return "int4"
    return kind


def _matches(spec: DenseFilter, name: str, module: nn.Module) -> bool:
    if isinstance(spec, bool):
        return spec
    if callable(spec):
        return bool(spec(name, module))
    patterns = [spec] if isinstance(spec, str) else list(spec)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _targets(model: nn.Module, dense: DenseFilter) -> dict[nn.Module, str]:
    """The Linears to quantize (module -> first name); raises before anything changes."""
    targets: dict[nn.Module, str] = {}
    inside: set[nn.Module] = set()
    for module, names in low_rank_modules(model).items():
        prefix = f"{names[0]}." if names[0] else ""
        if module.calibrating:
            raise ValueError(
                f"quantize_factors_: layer {names[0]!r} is still calibrating\n"
                "recover it first (tl.recover_ or tl.compress)"
            )
        for part in ("down", "up"):
            factor = getattr(module, part)
            inside.add(factor)
            if isinstance(factor, nn.Linear):
                targets[factor] = prefix + part
    if dense is not False:
        for module, names in module_names(model).items():
            if (
                type(module) is nn.Linear
                and module not in inside
                and _matches(dense, names[0], module)
            ):
                targets[module] = names[0]
    return targets


def quantize_factors_(
    model: nn.Module, scheme: str = "int8", *, dense: DenseFilter = False
) -> nn.Module:
    """Quantize the factor layers of every recovered low-rank module of ``model`` with torchao,
    in place.

    The ``down`` and ``up`` layers of each :class:`~torch_lowrank.LowRankLinear` get quantized
    weights (torchao tensor subclasses); biases stay in floating point. Conv factor layers stay
    float (torchao quantizes ``nn.Linear``). Everything is checked before the first layer changes,
    and a failure part-way puts the original weights back.

    Args:
        model: a compressed model (after :func:`~torch_lowrank.recover_` /
            :func:`~torch_lowrank.compress`), or a dense one with ``dense=True``.
        scheme: ``"int8"`` (int8 weights, one scale per output row, float activations),
            ``"int8-dynamic"`` (int8 weights and per-token int8 activations: int8 matmuls),
            ``"float8"``, and where torchao runs them, ``"float8-dynamic"`` and ``"int4"``
            (CUDA); :func:`available_schemes` lists those of a device.
        dense: also quantize the plain ``nn.Linear`` layers that are not factors: ``True`` for
            all of them, fnmatch pattern(s) on their qualified names, or ``callable(name,
            module)``. ``dense=True`` on an uncompressed model is "int8 alone".

    Returns:
        ``model``.

    Raises:
        ImportError: torchao is not installed (the message gives the install command).
        ValueError: an unknown scheme, one that does not run on a layer's device and dtype, a
            layer still calibrating or already quantized, a layer the scheme cannot take, or
            nothing to quantize.

    Example:
        >>> import torch, torch_lowrank as tl
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        >>> model, _ = tl.compress(model, [torch.randn(256, 64)], rank=8, exclude="2")
        >>> model = quantize_factors_(model, "int8")
        >>> quantization_of(model)
        {'0.down': 'int8', '0.up': 'int8'}
    """
    _check_scheme(scheme, "quantize_factors_")
    if not isinstance(dense, (bool, str, list, tuple)) and not callable(dense):
        raise ValueError(
            "quantize_factors_: dense must be a bool, pattern(s) or callable(name, module)\n"
            f"but got {dense!r}"
        )
    require_torchao()
    targets = _targets(model, dense)
    if not targets:
        convs = 2 * len(low_rank_modules(model))  # all recovered convs
        what = f" ({convs} conv factor layers stay float)" if convs else ""
        raise ValueError(
            f"quantize_factors_: no Linear layer to quantize{what}\n"
            "compress the model first, or pass dense=True for its dense Linears"
        )
    return quantize_layers_(model, targets, scheme, "quantize_factors_")


def check_runs(
    scheme: str, device: torch.device, dtype: torch.dtype, name: str, where: str
) -> None:
    """Raise a ``ValueError`` naming the scheme, device and layer when torchao cannot run
    ``scheme`` there, with the schemes that do run.

    Example:
        >>> try:  # no scheme runs on the meta device (nor anywhere without torchao)
        ...     check_runs("int8", torch.device("meta"), torch.float32, "0.down", "example")
        ... except ValueError as err:
        ...     print(str(err).splitlines()[-1])
        ... except ImportError:
        ...     print("schemes that run there: none")
        schemes that run there: none
    """
    device = torch.device(device)
    if device.type == "meta" or scheme not in available_schemes(device, dtype):
        runs = ", ".join(available_schemes(device, dtype)) if device.type != "meta" else ""
        raise ValueError(
            f"{where}: scheme {scheme!r} does not run on {device} for {dtype} weights "
            f"(layer {name!r}) with torchao {require_torchao().__version__}\n"
            f"schemes that run there: {runs or 'none'}"
        )


def quantize_layers_(
    model: nn.Module, layers: Mapping[nn.Module, str], scheme: str, where: str
) -> nn.Module:
    """Quantize the Linear ``layers`` of ``model`` (module -> name, for messages) in
    ``scheme``, all or nothing: every layer is checked first, and a failure part-way puts the
    original weights back.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        >>> _ = quantize_layers_(model, {model[1]: "1"}, "int8", "example")
        >>> quantization_of(model)
        {'1': 'int8'}
    """
    spec = _check_scheme(scheme, where)
    quantization = require_torchao("quantization")
    for layer, name in layers.items():
        weight = layer.weight
        if is_quantized(weight):
            raise ValueError(f"{where}: layer {name!r} is already quantized ({_scheme_of(weight)})")
        check_runs(scheme, weight.device, weight.dtype, name, where)
        if spec.group is not None and layer.in_features % spec.group:
            raise ValueError(
                f"{where}: scheme {scheme!r} needs in_features divisible by {spec.group}\n"
                f"but layer {name!r} has {layer.in_features}"
            )
    originals = {layer: layer.weight for layer in layers}
    pending = set(layers)

    def chosen(module: nn.Module, fqn: str) -> bool:
        if module in pending:
            pending.discard(module)  # a layer shared under two names is quantized once
            return True
        return False

    try:
        quantization.quantize_(model, spec.make_config(), filter_fn=chosen)
    except BaseException:
        for layer, weight in originals.items():
            layer.weight = weight
        raise
    return model


def quantization_of(model: nn.Module) -> dict[str, str]:
    """The scheme of every layer of ``model`` whose weight torchao quantized, by qualified name
    (read from the weights themselves, so it survives saving and loading).

    Example:
        >>> quantization_of(nn.Linear(4, 4))
        {}
    """
    found: dict[str, str] = {}
    for module, names in module_names(model).items():
        if isinstance(module, LowRankModule):
            continue  # its weight is the product of the factors, computed on read
        weight = dict(module.named_parameters(recurse=False)).get("weight")
        if weight is not None and is_quantized(weight):
            found[names[0]] = _scheme_of(weight)
    return found
