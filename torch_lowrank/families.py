"""The small registry that lets model families work without special cases elsewhere.

* **Foreign layer types** (:data:`ADAPTERS`): a layer that computes what a standard layer
  computes but stores it differently is converted through an equivalent standard layer that
  shares its storage. Hugging Face GPT-2's ``Conv1D`` is an ``nn.Linear`` whose weight is stored
  transposed, ``(in, out)``; it becomes an ``nn.Linear`` over the transposed weight (a view, no
  copy) before conversion. It is recognised by class name and module, so ``transformers`` is
  never imported here.
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

from torch import nn

__all__ = ["ADAPTERS", "DEFAULT_EXCLUDE", "adapt", "tied_weights", "forward_kwargs"]

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


#: ``(module path prefix, class name) -> adapter`` for layer types from other libraries.
ADAPTERS: dict[tuple[str, str], Callable[[nn.Module], nn.Module]] = {
    ("transformers", "Conv1D"): _conv1d_as_linear,
}


def adapt(module: nn.Module) -> nn.Module:
    """The standard layer equivalent to ``module`` (``module`` itself when it needs none).

    Example:
        >>> adapt(nn.Linear(3, 2)).__class__.__name__
        'Linear'
    """
    package = type(module).__module__.split(".", 1)[0]
    adapter = ADAPTERS.get((package, type(module).__name__))
    return module if adapter is None else adapter(module)


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
