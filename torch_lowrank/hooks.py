"""The forward hooks a user puts on a low-rank module, kept so they can follow it.

A low-rank module is replaced by another layer at times (:func:`~torch_lowrank.merge_`, a layer
put back dense at recovery). PyTorch offers no public way to list a module's hooks, so the
low-rank modules remember the hooks registered on them (:class:`HookLedger`) and register the
ones still in place on the layer that takes their place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["HookLedger"]


@dataclass(frozen=True)
class Hook:
    """A forward hook or pre-hook registered on a low-rank module, kept so that it can be
    registered again on the layer that replaces the module."""

    pre: bool
    hook: Callable
    args: tuple
    kwargs: dict
    handle: RemovableHandle

    @property
    def live(self) -> bool:
        table = self.handle.hooks_dict_ref()
        return table is not None and self.handle.id in table


class HookLedger:
    """The hooks registered on one module (those removed since are forgotten).

    Example:
        >>> ledger, layer = HookLedger(), nn.Linear(2, 2)
        >>> handle = layer.register_forward_hook(lambda module, args, out: None)
        >>> _ = ledger.remember(Hook(False, lambda module, args, out: None, (), {}, handle))
        >>> ledger.carry_to(nn.Linear(2, 2))
        1
    """

    def __init__(self) -> None:
        self.hooks: list[Hook] = []

    def remember(self, hook: Hook) -> RemovableHandle:
        """Keep ``hook`` (and drop the records of hooks removed since); returns its handle."""
        self.hooks = [*(h for h in self.hooks if h.live), hook]
        return hook.handle

    def carry_to(self, new: nn.Module) -> int:
        """Register the hooks still in place on ``new``; returns how many."""
        live = [h for h in self.hooks if h.live]
        for h in live:
            register = new.register_forward_pre_hook if h.pre else new.register_forward_hook
            register(h.hook, *h.args, **h.kwargs)
        return len(live)
