"""Which rank a layer keeps: ``rank``, ``ratio`` (the fraction of parameters kept) or
``energy`` (the fraction of output variance kept, decided at recovery), validated in one place.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["target_rank"]


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (NumPy scalars too), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def target_rank(
    shape: tuple[int, int],
    rank: int | None,
    ratio: float | None,
    energy: float | None,
    name: str,
    described: str | None = None,
) -> int | None:
    """Validate the rank specification of a layer whose weight matrix is ``shape = (m, n)`` and
    return its rank (``None`` with ``energy``: the rank is chosen at recovery).

    ``ratio`` is the fraction of the weight parameters kept: ``rank = floor(ratio m n / (m + n))``.
    NumPy scalars are numbers too. ``described`` names the weight in messages (default
    ``"m x n weight"``; a conv says its real shape).

    Example:
        >>> target_rank((64, 32), None, 0.5, None, "fc")
        10
    """
    m, n = shape
    what = described or f"{m} x {n} weight"
    given = [k for k, v in (("rank", rank), ("ratio", ratio), ("energy", energy)) if v is not None]
    if len(given) != 1:
        raise ValueError(
            f"{name}: give exactly one of rank, ratio or energy\n"
            f"but got {', '.join(given) if given else 'none'}"
        )
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise TypeError(f"{name}: rank must be an int\nbut got {rank!r}")
        if not 1 <= rank <= min(m, n):
            raise ValueError(
                f"{name}: rank must be in [1, {min(m, n)}] for a {what}\nbut got {rank}"
            )
        return int(rank)
    value, label = (ratio, "ratio") if ratio is not None else (energy, "energy")
    number = _number(value)
    if number is None or not 0 < number <= 1:
        raise ValueError(f"{name}: {label} must be a number in (0, 1]\nbut got {value!r}")
    if energy is not None:
        return None
    r = math.floor(number * m * n / (m + n))
    if r < 1:
        raise ValueError(
            f"{name}: ratio={number} leaves no rank for a {what}\n"
            f"(rank 1 keeps {(m + n) / (m * n):.3f} of its parameters)"
        )
    return min(r, m, n)
