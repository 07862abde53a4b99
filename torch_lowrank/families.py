"""The small registry that lets model families work without special cases elsewhere.

* **Foreign layer types** (:data:`ADAPTERS`): a layer that computes what a standard layer
  computes but stores it differently is converted through an equivalent standard layer that
  shares its storage, and :func:`~torch_lowrank.merge_` gives the foreign type back
  (:func:`restore`). Hugging Face GPT-2's ``Conv1D`` is an ``nn.Linear`` whose weight is stored
  transposed, ``(in, out)``; it becomes an ``nn.Linear`` over the transposed weight (a view, no
  copy) before conversion, and a merged layer becomes a ``Conv1D`` again. It is recognised by
  class name and module, so ``transformers`` is never imported here.
* **Bias-free layers** (:data:`NO_ADDED_BIAS`, :func:`default_add_bias`): by default the recovery
  gives a layer without a bias one, to correct for the mean of its inputs (the optimum). The
  models of the packages listed (Hugging Face ``transformers``) keep bias-free layers bias-free
  instead, solved without intercept: their architectures fix which layers have a bias, and
  ``transformers`` drops any other when a merged model is saved and loaded again.
* **Layers left dense by default**: output heads named ``lm_head`` (:data:`DEFAULT_EXCLUDE`;
  pass ``exclude=[]`` to :func:`~torch_lowrank.convert` to convert them too) and any layer whose
  weight is tied to another module's (GPT-2's ``lm_head`` shares the token embedding), since
  factorising one side of a tie would silently untie it.
* **Calibration forward**: a model with a Hugging Face ``config.use_cache`` is run with
  ``use_cache=False`` by :func:`~torch_lowrank.default_forward`: a key/value cache is
  useless for calibration, costs memory, and would make replayed blocks see stale keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ADAPTERS",
    "DEFAULT_EXCLUDE",
    "NO_ADDED_BIAS",
    "Adapter",
    "adapt",
    "default_add_bias",
    "forward_kwargs",
    "restore",
    "tied_weights",
]

#: fnmatch patterns of layers :func:`~torch_lowrank.convert` leaves dense unless told otherwise.
DEFAULT_EXCLUDE = ("lm_head", "*.lm_head")


def _conv1d_as_linear(layer: nn.Module) -> nn.Linear:
    """GPT-2's ``Conv1D`` (``y = x @ W + b`` with ``W`` of shape ``(in, out)``) as the
    ``nn.Linear`` it is; the weight is a transposed view of the same storage."""
    n_in, n_out = layer.weight.shape
    linear = nn.Linear(n_in, n_out, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(layer.weight.detach().T, layer.weight.requires_grad)
    if layer.bias is not None:
        linear.bias = layer.bias
    return linear


def _linear_as_conv1d(linear: nn.Linear, kind: type) -> nn.Module:
    """The ``Conv1D`` (class ``kind``) computing what ``linear`` computes: its weight transposed
    (a contiguous copy, as ``transformers`` saves it) and its bias (zeros when it has none, since
    ``Conv1D`` always adds one)."""
    with torch.device("meta"):
        layer = kind(linear.out_features, linear.in_features)  # Conv1D(nf, nx)
    weight = linear.weight.detach().T.contiguous()
    layer.weight = nn.Parameter(weight, linear.weight.requires_grad)
    if linear.bias is not None:
        layer.bias = linear.bias
    else:
        layer.bias = nn.Parameter(weight.new_zeros(linear.out_features), requires_grad=False)
    layer.train(linear.training)
    return layer


@dataclass(frozen=True)
class Adapter:
    """How a foreign layer type becomes a standard layer and back.

    Attributes:
        to_standard: ``to_standard(layer)``: the equivalent standard layer, sharing storage.
        from_standard: ``from_standard(standard, kind)``: a layer of the foreign class ``kind``
            equivalent to the standard layer.
    """

    to_standard: Callable[[nn.Module], nn.Module]
    from_standard: Callable[[nn.Module, type], nn.Module]


#: ``(package, class name) -> Adapter`` for layer types from other libraries.
ADAPTERS: dict[tuple[str, str], Adapter] = {
    ("transformers", "Conv1D"): Adapter(_conv1d_as_linear, _linear_as_conv1d),
}

#: Packages whose models keep bias-free layers bias-free by default (see the module docs).
NO_ADDED_BIAS = ("transformers",)


def _package(kind: type) -> str:
    return kind.__module__.split(".", 1)[0]


def adapt(module: nn.Module) -> nn.Module:
    """The standard layer equivalent to ``module`` (``module`` itself when it needs none).

    Example:
        >>> adapt(nn.Linear(3, 2)).__class__.__name__
        'Linear'
    """
    adapter = ADAPTERS.get((_package(type(module)), type(module).__name__))
    return module if adapter is None else adapter.to_standard(module)


def restore(standard: nn.Module, kind: type | None) -> nn.Module:
    """The layer of the foreign class ``kind`` equivalent to the standard layer ``standard``
    (``standard`` itself when ``kind`` is ``None`` or has no adapter): the inverse of
    :func:`adapt`.

    Example:
        >>> restore(nn.Linear(3, 2), None).__class__.__name__
        'Linear'
    """
    adapter = None if kind is None else ADAPTERS.get((_package(kind), kind.__name__))
    return standard if adapter is None else adapter.from_standard(standard, kind)


def default_add_bias(model: nn.Module) -> bool:
    """Whether :func:`~torch_lowrank.convert` gives the bias-free layers of ``model`` a bias by
    default: ``False`` for a model (or a block of one) from a package in
    :data:`NO_ADDED_BIAS`, ``True`` otherwise.

    Example:
        >>> default_add_bias(nn.Linear(2, 2))
        True
    """
    inner = getattr(model, "module", model)  # DistributedDataParallel
    return not any(_package(kind) in NO_ADDED_BIAS for kind in type(inner).__mro__)


def tied_weights(model: nn.Module) -> dict[nn.Module, str]:
    """Modules whose ``weight`` another module also holds, mapped to that other module's name.

    Example:
        >>> emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        >>> head.weight = emb.weight
        >>> list(tied_weights(nn.ModuleDict({"emb": emb, "head": head})).values())
        ['head', 'emb']
    """
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for parameter in module.parameters(recurse=False):
            holders.setdefault(id(parameter), []).append((name, module))
    tied: dict[nn.Module, str] = {}
    for owners in holders.values():
        for _, module in owners:
            others = [n for n, m in owners if m is not module]
            if others:
                tied[module] = others[0]
    return tied


def forward_kwargs(model: nn.Module) -> dict:
    """Extra keyword arguments for a calibration forward of ``model`` (see the module docs).

    Example:
        >>> forward_kwargs(nn.Linear(2, 2))
        {}
    """
    inner = getattr(model, "module", model)  # DistributedDataParallel
    config = getattr(inner, "config", None)
    if config is not None and isinstance(getattr(config, "use_cache", None), bool):
        return {"use_cache": False}
    return {}
