"""Finding modules by name and swapping one module for another at every name it has.

A module can be reachable under several names (a layer shared by two parents, a model whose
``forward`` reuses a block); swapping it must replace it everywhere, and the parent is found by
qualified name and the child replaced with ``setattr`` (as torchao's ``quantize_`` does). These
helpers are the one place that does it.
"""

from __future__ import annotations

from torch import nn

__all__ = ["module_names", "replace", "replace_everywhere"]


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
