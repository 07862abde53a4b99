"""The one call: convert, calibrate and recover (:func:`compress`), changing nothing until it
can succeed."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Callable

from torch import nn

from .convert import convert, revert
from .model import calibrate, low_rank_modules
from .options import POSITIONS, Options, check_positions, make_options, make_spec
from .recover import check_refine, recover_
from .refine import RefineOptions
from .report import Report
from .weighting import FisherWeighting

__all__ = ["compress"]


def _checked_data(data: Iterable[Any], corrective: bool) -> Iterable[Any]:
    """``data``, checked before anything changes: not empty, and reusable when corrective
    recovery will iterate it several times."""
    one_shot = iter(data) is data
    if one_shot and corrective:
        raise TypeError(
            "compress: data: corrective recovery iterates the calibration data several times\n"
            "but got a one-shot iterator; pass a list or a DataLoader (or corrective=False)"
        )
    iterator = iter(data)
    first = next(iterator, None)
    if first is None:
        raise ValueError("compress: data is empty; pass at least one calibration batch")
    return itertools.chain([first], iterator) if one_shot else data


@contextlib.contextmanager
def _observers_disabled(model: nn.Module) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for module in low_rank_modules(model):
            if module.calibrating:
                stack.enter_context(module.observer.disabled())
        yield


def compress(
    model: nn.Module,
    data: Iterable[Any],
    *,
    method: str = "relu",
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    corrective: bool = True,
    options: dict | Options | None = None,
    progress: bool = True,
    cache_blocks: bool = True,
    refine: bool | dict | RefineOptions | None = None,
    weighting: str | dict | FisherWeighting | None = None,
    positions: int | None = POSITIONS,
    **convert_kwargs: Any,
) -> tuple[nn.Module, Report]:
    """Convert, calibrate on ``data`` and recover, in one call (corrective by default).

    Nothing changes until the call can succeed: bad arguments, empty data, a one-shot
    iterator where the data is needed twice, or any failure on the way (an error in the
    model's forward, Ctrl-C) leave the model as it was, every layer and buffer included.

    Args:
        model: the trained model (changed in place).
        data: calibration batches (see :func:`default_forward`): a list or a DataLoader.
        method: the recovery method (see :func:`recover_`).
        forward_fn: ``forward_fn(model, batch)`` runs one batch; defaults to
            :func:`default_forward`.
        corrective: recover correctively (``recover_(model, data=data)``); ``False``: parallel
            recovery from the first pass, which iterates the data only once.
        options: the method's options (see :func:`recover_`).
        progress: tqdm progress bars on an interactive terminal (``False``: never).
        cache_blocks: see :func:`recover_`.
        refine: refine each block after its corrective solve (see :func:`recover_`).
        weighting: ``"fisher"``: weigh each layer's output errors by their effect on the loss
            (see :func:`recover_`); needs ``corrective``.
        positions: the patch positions per image a conv's corrective statistics keep (see
            :func:`recover_`; ``None``: all of them).
        **convert_kwargs: passed to :func:`convert` (``rank`` / ``ratio`` / ``energy``,
            ``include``, ``exclude``, ``add_bias``, ``samples``, ``activation``, ...).

    Returns:
        ``(model, report)``.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        >>> batches = [torch.randn(128, 32) for _ in range(4)]
        >>> model, report = compress(model, batches, ratio=0.25)
        >>> [row.rank for row in report.layers]
        [5, 5]
    """
    opts = make_options(method, options, where="compress")
    positions = check_positions(positions, "compress")
    refining = make_spec(RefineOptions, refine, what="refine", where="compress")
    if refining is not None:
        check_refine(corrective and method != "svd", cache_blocks, "compress")
    weighing = make_spec(
        FisherWeighting, weighting, what="weighting", where="compress", names=("fisher",)
    )
    if weighing is not None and not (corrective and method != "svd"):
        raise ValueError(
            "compress: weighting='fisher' is measured during corrective recovery;\n"
            "use corrective=True and a method other than svd"
        )
    by = convert_kwargs.get("allocate_by", "spectra")
    if by != "spectra" and not corrective:
        raise ValueError(
            f"compress: allocate_by={by!r} probes the layers during corrective recovery;\n"
            "use corrective=True or allocate_by='spectra'"
        )
    samples = convert_kwargs.get("samples", 4096)
    aware = method in ("relu", "nuclear") and convert_kwargs.get("activation", "auto") is not None
    if aware and samples == 0:
        raise ValueError(
            f"compress: samples=0 keeps no sample rows, which method={method!r} needs\n"
            "for layers followed by an activation; use samples > 0 or method='linear'"
        )
    data = _checked_data(data, corrective and method != "svd")
    parallel_first = convert_kwargs.get("allocation", "uniform") == "global"
    model = convert(model, **convert_kwargs)
    try:
        if corrective and method != "svd" and not parallel_first:
            # Corrective recovery collects its own statistics wave by wave; the first pass only
            # observes the activations, on one batch, and keeps no statistics.
            with _observers_disabled(model):
                calibrate(model, [next(iter(data))], forward_fn, progress=False)
        else:
            calibrate(model, data, forward_fn, progress)
        report = recover_(
            model, method=method, data=data if corrective else None, forward_fn=forward_fn,
            progress=progress, cache_blocks=cache_blocks, refine=refining, weighting=weighing,
            options=opts, positions=positions,
        )  # fmt: skip
    except BaseException:
        revert(model)
        raise
    return model, report
