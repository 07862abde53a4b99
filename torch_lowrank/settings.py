"""Settings that belong to a whole conversion, in one frozen object the modules carry.

:func:`~torch_lowrank.convert` decides some things for the whole model: whether BatchNorms are
folded, how ranks are allocated globally, which layers it left dense and why. It puts them in one
:class:`Settings` that every module it converted holds (``module.settings``), so that
:func:`~torch_lowrank.recover_` finds them on the modules themselves: no registry keyed by model,
nothing stored on the user's model. The model-level hooks of the conversion (the batch gate and
the activation detector) travel with it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

from .report import LayerReport

__all__ = ["GlobalAllocation", "Settings"]

BUDGETS = ("params", "flops", "bytes")
#: The quantization schemes a byte budget may choose (8-bit integers, one scale per row: the
#: error model of :func:`~torch_lowrank.bytes_budget.quantization_error`).
BYTE_SCHEMES = ("int8", "int8-dynamic")
#: What global allocation weighs the layers' errors by: their normalised spectra alone, or the
#: measured effect of each layer's error on the model's output (:mod:`torch_lowrank.sensitivity`).
ALLOCATE_BY = ("spectra", "kl", "mse")


def _int_at_least(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"convert: {name} must be an int >= {low}\nbut got {value!r}")
    return int(value)


@dataclass(frozen=True)
class GlobalAllocation:
    """Global rank allocation (see :mod:`torch_lowrank.allocation`), validated when built.

    Attributes:
        ratio: the fraction of the converted layers' total cost kept, in (0, 1].
        budget: what is counted: ``"params"`` (weights), ``"flops"`` or ``"bytes"`` (weights
            at their precision: the allocation also chooses which layers to quantize).
        round_to: ranks are multiples of this.
        min_rank / max_rank: bounds on every allocated rank.
        allocate_by: ``"spectra"`` (every layer's normalised error alike), ``"kl"`` or ``"mse"``
            (each layer's error weighed by its measured effect on the output: the KL divergence
            of the output distributions, for logits, or the relative squared error).
        scheme: with ``budget="bytes"``, the quantization it may choose: ``"int8"`` (default)
            or ``"int8-dynamic"`` (:mod:`torch_lowrank.quantize`).

    Example:
        >>> GlobalAllocation(0.5, min_rank=4, max_rank=2)
        Traceback (most recent call last):
        ...
        ValueError: convert: min_rank must be <= max_rank
        but got min_rank=4, max_rank=2
    """

    ratio: float
    budget: str = "params"
    round_to: int = 1
    min_rank: int = 1
    max_rank: int | None = None
    allocate_by: str = "spectra"
    scheme: str | None = None

    def __post_init__(self) -> None:
        ratio = self.ratio
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
            raise ValueError(f"convert: ratio must be a number in (0, 1]\nbut got {ratio!r}")
        object.__setattr__(self, "ratio", float(ratio))
        if self.budget not in BUDGETS:
            raise ValueError(
                f"convert: budget must be one of {', '.join(BUDGETS)}\nbut got {self.budget!r}"
            )
        if self.budget == "bytes":
            scheme = "int8" if self.scheme is None else self.scheme
            if scheme not in BYTE_SCHEMES:
                raise ValueError(
                    f"convert: scheme must be one of {', '.join(BYTE_SCHEMES)}\nbut got {scheme!r}"
                )
            object.__setattr__(self, "scheme", scheme)
        elif self.scheme is not None:
            raise ValueError(
                f"convert: scheme={self.scheme!r} is for budget='bytes'\n"
                f"but got budget={self.budget!r}"
            )
        if self.allocate_by not in ALLOCATE_BY:
            raise ValueError(
                f"convert: allocate_by must be one of {', '.join(ALLOCATE_BY)}\n"
                f"but got {self.allocate_by!r}"
            )
        object.__setattr__(self, "round_to", _int_at_least("round_to", self.round_to, 1))
        object.__setattr__(self, "min_rank", _int_at_least("min_rank", self.min_rank, 1))
        if self.max_rank is not None:
            object.__setattr__(self, "max_rank", _int_at_least("max_rank", self.max_rank, 1))
            if self.min_rank > self.max_rank:
                raise ValueError(
                    "convert: min_rank must be <= max_rank\n"
                    f"but got min_rank={self.min_rank}, max_rank={self.max_rank}"
                )

    def as_dict(self) -> dict:
        """The settings as a plain dict (for the report)."""
        return {
            "ratio": self.ratio,
            "budget": self.budget,
            "round_to": self.round_to,
            "min_rank": self.min_rank,
            "max_rank": self.max_rank,
            "allocate_by": self.allocate_by,
            "scheme": self.scheme,
        }


@dataclass(frozen=True)
class Settings:
    """What :func:`~torch_lowrank.convert` decided for the whole model.

    Attributes:
        fold_batchnorm: fold an eval BatchNorm between a layer and its activation.
        allocation: global allocation, or ``None`` (each layer has its own rank).
        skipped: report rows of the layers left dense, with the reason.
        hooks: the model-level hooks of the conversion
            (:class:`~torch_lowrank.observer.ModelHooks`).
    """

    fold_batchnorm: bool = True
    allocation: GlobalAllocation | None = None
    skipped: tuple[LayerReport, ...] = ()
    hooks: Any = field(default=None, compare=False, repr=False)
