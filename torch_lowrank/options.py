"""Validated solver options: one frozen dataclass per recovery method.

Options reach the solvers through several frames, so a typo (``max_itr=5``) or a bad value
(``tol=-1``) is caught here, once, by :func:`make_options`, naming the option, range and value:

=========== ============== ==================================================================
method      class          options (default)
=========== ============== ==================================================================
``svd``     SvdOptions     none
``linear``  LinearOptions  ``damping`` (1e-2)
``relu``    ReluOptions    ``damping``, ``max_iter`` (30), ``tol`` (1e-6), ``optimizer``, ``lr``
``nuclear`` NuclearOptions ``damping``, ``max_iter`` (200), ``tol``, ``lam`` (None: fit rank)
=========== ============== ==================================================================

``damping`` (float >= 0) is the corrective ridge weight (:func:`torch_lowrank.solvers.corrective`);
the others go to :func:`torch_lowrank.projected.activation_aware` (``relu``) or ``nuclear``
(:meth:`Options.solver_kwargs`). ``optimizer`` is a ``torch.optim`` / ``torch_optimizer`` class,
its name, or a callable ``(params, lr=lr) -> Optimizer``; ``lr`` (> 0) comes with it, and only
with it. NumPy scalars count as numbers (stored as Python ones); bools, NaN and inf do not.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any, Callable, ClassVar, NoReturn

import torch
import torch_optimizer

__all__ = ["METHODS", "POSITIONS", "Options", "check_positions", "make_options", "make_spec"]
__all__ += ["optimizer_class"]
__all__ += ["SvdOptions", "LinearOptions", "ReluOptions", "NuclearOptions"]

#: Recovery methods, in the order they are listed to users. ``relu`` is activation-aware.
METHODS = ("relu", "linear", "svd", "nuclear")


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class called ``name`` (any case) in ``torch.optim``, else ``torch_optimizer``.

    Raises:
        ValueError: no such optimizer; the message lists the known names.

    Example:
        >>> optimizer_class("AdamW") is torch.optim.AdamW
        True
        >>> optimizer_class("lamb") is torch_optimizer.Lamb
        True
    """
    found = {
        key.lower(): value
        for namespace in (torch_optimizer, torch.optim)  # torch.optim wins on shared names
        for key, value in vars(namespace).items()
        if isinstance(value, type) and issubclass(value, torch.optim.Optimizer)
    }
    found.pop("optimizer", None)  # the base class
    if not isinstance(name, str) or name.lower() not in found:
        raise ValueError(
            "unknown optimizer name; expected one of torch.optim or torch_optimizer:\n"
            f"{', '.join(sorted(found))}\nbut got {name!r}"
        )
    return found[name.lower()]


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of the option classes; :func:`make_options` builds the one for a method.

    Example:
        >>> isinstance(make_options("linear", {}), Options)
        True
    """

    method: ClassVar[str] = ""

    def _fail(self, name: str, expected: str, value: Any) -> NoReturn:
        raise ValueError(f"{self.method}: {name} must be {expected}\nbut got {value!r}")

    def _check(self, name: str, expected: str, integer: bool = False, positive: bool = False):
        """Store ``self.name`` as a finite Python number ``>= 0`` (``> 0`` if ``positive``)."""
        value = getattr(self, name)
        kind = numbers.Integral if integer else numbers.Real
        number = math.nan
        if isinstance(value, kind) and not isinstance(value, bool):
            number = int(value) if integer else float(value)
        if not 0 <= number < math.inf or (positive and number == 0):
            self._fail(name, expected, value)
        object.__setattr__(self, name, number)

    def solver_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the iterative solver: every option except ``damping``.

        Example:
            >>> NuclearOptions(lam=0.5).solver_kwargs()
            {'max_iter': 200, 'tol': 1e-06, 'lam': 0.5}
            >>> LinearOptions().solver_kwargs()
            {}
        """
        names = (f.name for f in dataclasses.fields(self) if f.name != "damping")
        return {name: getattr(self, name) for name in names}


@dataclasses.dataclass(frozen=True)
class SvdOptions(Options):
    """``method="svd"`` takes no options.

    Example:
        >>> SvdOptions().solver_kwargs()
        {}
    """

    method: ClassVar[str] = "svd"


@dataclasses.dataclass(frozen=True)
class LinearOptions(Options):
    """``method="linear"``: ``damping``, the corrective ridge weight (float >= 0).

    Example:
        >>> LinearOptions(damping=0.1)
        LinearOptions(damping=0.1)
    """

    method: ClassVar[str] = "linear"
    damping: float = 1e-2

    def __post_init__(self) -> None:
        self._check("damping", "a finite float >= 0")


@dataclasses.dataclass(frozen=True)
class NuclearOptions(LinearOptions):
    """``method="nuclear"``: ``damping``, ``max_iter``, ``tol``, ``lam`` (None: fit the rank).

    Example:
        >>> NuclearOptions(max_iter=50, lam=1e-3)
        NuclearOptions(damping=0.01, max_iter=50, tol=1e-06, lam=0.001)
    """

    method: ClassVar[str] = "nuclear"
    max_iter: int = 200
    tol: float = 1e-6
    lam: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check("max_iter", "an int >= 0", integer=True)
        self._check("tol", "a finite float >= 0")
        if self.lam is not None:
            self._check("lam", "None or a finite float >= 0")


@dataclasses.dataclass(frozen=True)
class ReluOptions(LinearOptions):
    """``method="relu"``: ``damping``, ``max_iter``, ``tol``, and an ``optimizer`` replacing the
    plain gradient step with its ``lr``; a name is resolved by :func:`optimizer_class`.

    Example:
        >>> options = ReluOptions(optimizer="adam", lr=1e-3)
        >>> options.optimizer is torch.optim.Adam, options.lr
        (True, 0.001)
    """

    method: ClassVar[str] = "relu"
    max_iter: int = 30
    tol: float = 1e-6
    optimizer: str | Callable[..., torch.optim.Optimizer] | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check("max_iter", "an int >= 0", integer=True)
        self._check("tol", "a finite float >= 0")
        optimizer = self.optimizer
        if isinstance(optimizer, str):
            try:
                object.__setattr__(self, "optimizer", optimizer_class(optimizer))
            except ValueError as error:
                raise ValueError(f"{self.method}: optimizer: {error}") from None
        elif optimizer is not None:
            is_class = isinstance(optimizer, type)
            if not (
                issubclass(optimizer, torch.optim.Optimizer) if is_class else callable(optimizer)
            ):
                self._fail("optimizer", "None, a name, an Optimizer class or a callable", optimizer)
        if optimizer is None and self.lr is not None:
            self._fail("lr", "None without an optimizer", self.lr)
        if optimizer is not None:
            self._check("lr", "a finite float > 0 with an optimizer", positive=True)


_CLASSES = {cls.method: cls for cls in (ReluOptions, LinearOptions, SvdOptions, NuclearOptions)}


def make_options(
    method: str, options: Mapping[str, Any] | Options | None = None, *, where: str = "recover_"
) -> Options:
    """The validated options of ``method`` from a mapping, an options object, or ``None``.

    ``where`` (the caller's public name) starts every message; an object is returned as is.

    Raises:
        ValueError: an unknown method, or a bad value (naming the option, range and value).
        TypeError: an unknown option name (listing the valid ones), an options object of
            another method's class, or ``options`` of another type.

    Example:
        >>> make_options("relu", {"max_iter": 50})
        ReluOptions(damping=0.01, max_iter=50, tol=1e-06, optimizer=None, lr=None)
        >>> make_options("linear", {"max_itr": 5})
        Traceback (most recent call last):
        ...
        TypeError: recover_: unknown option 'max_itr' for method='linear'
        valid options: damping
    """
    if method not in _CLASSES:
        raise ValueError(f"{where}: method must be one of {', '.join(METHODS)}\nbut got {method!r}")
    cls = _CLASSES[method]
    if isinstance(options, Options):
        if type(options) is not cls:
            raise TypeError(
                f"{where}: method={method!r} takes {cls.__name__}\nbut got {type(options).__name__}"
            )
        return options
    options = {} if options is None else options
    if not isinstance(options, Mapping):
        raise TypeError(f"{where}: options must be a mapping\nbut got {type(options).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in valid:
            raise TypeError(
                f"{where}: unknown option {key!r} for method={method!r}\n"
                f"valid options: {', '.join(valid) or '(none)'}"
            )
    try:
        return cls(**options)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def make_spec(
    cls: type, value: Any, *, what: str, where: str = "recover_", names: tuple[str, ...] = ()
) -> Any:
    """A validated settings dataclass ``cls`` (e.g. the ``refine=`` or ``weighting=`` of
    :func:`~torch_lowrank.compress`) from what a caller passed: ``None`` or ``False`` for none,
    ``True`` (or one of ``names``) for the defaults, a mapping of ``cls``'s fields, or a
    ``cls``. ``what`` names the argument and ``where`` the public call in every message.

    Raises:
        TypeError: an unknown field (the message lists the valid ones) or another type.
        ValueError: a bad value, naming it.

    Example:
        >>> from torch_lowrank.refine import RefineOptions
        >>> make_spec(RefineOptions, {"steps": 5}, what="refine").steps
        5
        >>> make_spec(RefineOptions, {"stepz": 5}, what="refine")
        Traceback (most recent call last):
        ...
        TypeError: recover_: unknown refine option 'stepz'
        valid options: steps, lr, optimizer, held_out, eval_every, patience
    """
    if value is None or value is False:
        return None
    if value is True or (isinstance(value, str) and value in names):
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        accepted = "".join(f", {name!r}" for name in names)
        raise TypeError(
            f"{where}: {what} must be a bool{accepted}, a mapping or {cls.__name__}\n"
            f"but got {value!r}"
        )
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in value:
        if key not in valid:
            raise TypeError(
                f"{where}: unknown {what} option {key!r}\nvalid options: {', '.join(valid)}"
            )
    try:
        return cls(**value)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


#: The default ``positions=`` of :func:`~torch_lowrank.recover_` and
#: :func:`~torch_lowrank.compress`: the patch positions per image that a conv's corrective
#: statistics keep (``docs/corrective.md`` gives the measured cost in quality).
POSITIONS = 64


def check_positions(positions: Any, where: str = "recover_") -> int | None:
    """``positions`` as an int ``>= 1``, or ``None`` (every patch position).

    Raises:
        ValueError: anything else, naming ``where`` and the value.

    Example:
        >>> check_positions(32), check_positions(None)
        (32, None)
        >>> check_positions(0)
        Traceback (most recent call last):
        ...
        ValueError: recover_: positions must be None or an int >= 1 (patch positions per image)
        but got 0
    """
    integer = isinstance(positions, numbers.Integral) and not isinstance(positions, bool)
    if positions is None or (integer and positions >= 1):
        return None if positions is None else int(positions)
    raise ValueError(
        f"{where}: positions must be None or an int >= 1 (patch positions per image)\n"
        f"but got {positions!r}"
    )
