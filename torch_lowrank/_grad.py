"""``no_grad`` for the calibration hot path.

The calibration hooks run once per layer and batch, almost always inside ``torch.no_grad()``
already (:func:`torch_lowrank.calibrate`). The ``torch.no_grad()`` decorator enters and leaves
its context on every call anyway, which on small batches can cost as much as the hooks' own
work. This decorator checks first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["no_grad"]

F = TypeVar("F", bound=Callable)


def no_grad(fn: F) -> F:
    """Run ``fn`` without gradients, entering ``torch.no_grad()`` only when they are on.

    Example:
        >>> double = no_grad(lambda x: x * 2)
        >>> double(torch.ones(2, requires_grad=True)).requires_grad
        False
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
