"""The forward hooks a user puts on a low-rank module, kept so they can follow it.

A low-rank module is replaced by another layer at times (:func:`~torch_lowrank.merge_`, a layer
put back dense at recovery). PyTorch offers no public way to list a module's hooks, so the
low-rank modules (a :class:`HookCarrier` each) remember the hooks registered on them
(:class:`HookLedger`) and register the ones still in place on the layer that takes their place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["HookCarrier", "HookLedger"]


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


class HookCarrier(nn.Module):
    """A module whose forward hooks and pre-hooks can follow it to the layer that replaces it
    (:meth:`carry_hooks_to`); the base of every low-rank module."""

    def register_forward_hook(self, hook: Callable, *args: Any, **kwargs: Any) -> RemovableHandle:
        """:meth:`torch.nn.Module.register_forward_hook`, remembered so that
        :meth:`carry_hooks_to` can move it to a layer that replaces this module."""
        handle = super().register_forward_hook(hook, *args, **kwargs)
        return self._ledger().remember(Hook(False, hook, args, kwargs, handle))

    def register_forward_pre_hook(
        self, hook: Callable, *args: Any, **kwargs: Any
    ) -> RemovableHandle:
        """:meth:`torch.nn.Module.register_forward_pre_hook`, remembered likewise."""
        handle = super().register_forward_pre_hook(hook, *args, **kwargs)
        return self._ledger().remember(Hook(True, hook, args, kwargs, handle))

    def _ledger(self) -> HookLedger:  # a plain attribute, not module state
        return self.__dict__.setdefault("hook_ledger", HookLedger())

    def carry_hooks_to(self, new: nn.Module) -> int:
        """Register this module's forward hooks and pre-hooks that are still in place on
        ``new``, the layer that replaces it; returns how many.

        Example:
            >>> from torch_lowrank import LowRankLinear
            >>> layer = LowRankLinear(4, 4, rank=1)
            >>> _ = layer.register_forward_hook(lambda module, args, out: None)
            >>> layer.carry_hooks_to(layer.to_linear())
            1
        """
        return self._ledger().carry_to(new)
