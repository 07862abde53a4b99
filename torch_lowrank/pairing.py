"""The paired statistics of one corrective wave: ``(x~, x)`` pairs, batch by batch.

For every calibration batch a wave's inputs are captured twice, as the original network feeds
them (``x``) and as the compressed one does (``x~``), and their rows feed a
:class:`~torch_lowrank.cross.CrossStats` per group (and, for the activation-aware methods, a
reservoir of ``[x~, x]`` rows). What it costs, and the two economies (``docs/corrective.md``):

* **positions**: a conv keeps the paired rows of a uniform sample of ``positions`` patch
  positions per image (:meth:`~torch_lowrank.LowRankConv2d.paired_rows`), chosen on the device;
  ``None`` keeps every position.
* **the products ``W x``**: a layer whose statistics live in the output space (it narrows,
  ``m < n``) pairs ``x~`` with ``W x`` instead of ``x``, all a corrective solve reads of the
  original side: ``n x m`` and ``m x m`` sums instead of two more ``n x n`` ones.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Container, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .cross import CrossStats, PairedGroup
from .linear import LowRankLinear
from .observer import group_parts
from .reservoir import Reservoir

__all__ = ["Pairs", "accumulate_wave", "device_of", "original_width", "reduced"]

#: Per group of a layer: its paired moments and its reservoir of ``[x~, x]`` rows (or ``None``).
Pairs = list[PairedGroup]


class _WaveCaptured(Exception):
    """Raised by a capture hook to end a pass once every module of the wave has its input."""


def _capture(
    modules: Iterable[nn.Module], store: dict[nn.Module, list[Tensor]], stop: bool = False
) -> list:
    """Forward pre-hooks that append each module's input to ``store[module]``; with ``stop``
    (every module runs once per pass), the pass ends as soon as all of them have one."""

    def hook(module: nn.Module, args: tuple) -> None:
        store[module].append(args[0].detach())
        if stop and all(store.values()):
            raise _WaveCaptured

    # The library's own hooks: nn.Module's registration, not the one that records user hooks.
    return [nn.Module.register_forward_pre_hook(module, hook) for module in modules]


def device_of(module: nn.Module) -> torch.device:
    """The device of a calibrating module's dense weight.

    Example:
        >>> import torch_lowrank as tl
        >>> device_of(tl.LowRankLinear.from_linear(nn.Linear(4, 4), rank=1))
        device(type='cpu')
    """
    return module.matrices()[0][0].device


def original_width(module: nn.Module) -> int:
    """The width of the original side of a layer's pairs: ``m`` (the products ``W x``) where
    its statistics live in the output space, else ``n`` (the inputs ``x``).

    Example:
        >>> import torch_lowrank as tl
        >>> original_width(tl.LowRankLinear.from_linear(nn.Linear(64, 8), rank=2))
        8
    """
    m, n = module.matrix_shape
    return m if module.stats_space == "output" else n


@torch.no_grad()
def accumulate_wave(
    wave: list[nn.Module],
    runs: Iterable[Callable[[bool], Any]],
    with_samples: Container[nn.Module],
    clock: dict[str, float] | None = None,
    stop: bool = False,
    positions: int | None = None,
) -> dict[nn.Module, Pairs]:
    """Pair the wave's inputs in the original and the compressed network, batch by batch.

    Each of ``runs`` runs one batch (through the whole model or through the wave's block) as
    the original network (``run(False)``) or as the compressed one (``run(True)``). The modules
    in ``with_samples`` (those an activation-aware solve will fit) also keep a reservoir of
    ``[x~, x]`` rows. With
    ``stop`` (each module of the wave runs once per pass) a pass ends once the wave has its
    inputs. ``positions``: patch positions per image a conv pairs (``None``: all).
    ``clock["passes"]`` and ``clock["statistics"]`` receive the seconds spent.

    Example:
        >>> import torch_lowrank as tl
        >>> layer = tl.LowRankLinear.from_linear(nn.Linear(6, 2), rank=1)
        >>> x = torch.randn(10, 6)
        >>> paired = accumulate_wave([layer], [lambda compressed: layer(x)], ())
        >>> paired[layer][0].moments.count, paired[layer][0].moments.original_features
        (10, 2)
    """
    paired: dict[nn.Module, Pairs] = {}
    leaders: dict[nn.Module, nn.Module] = {}  # a Linear fed the same tensors shares their moments
    products: dict[nn.Module, list[Tensor]] = {}  # per group W^T, for pairs with W x
    clock = {"passes": 0.0, "statistics": 0.0} if clock is None else clock
    for run in runs:
        inputs: dict[bool, dict[nn.Module, list[Tensor]]] = {}
        started = time.perf_counter()
        for compressed in (False, True):
            store: dict[nn.Module, list[Tensor]] = {m: [] for m in wave}
            handles = _capture(wave, store, stop)
            try:
                with contextlib.suppress(_WaveCaptured):
                    run(compressed)
            finally:
                for handle in handles:
                    handle.remove()
            inputs[compressed] = store
        passed = time.perf_counter()
        clock["passes"] += passed - started
        for module, leader in list(leaders.items()):  # inputs that part: the state so far, copied
            if not _same_inputs(leader, module, inputs):
                del leaders[module]
                paired[module] = [
                    PairedGroup(copy.deepcopy(g.moments), g.rows) for g in paired[module]
                ]
        for module in wave:
            n, groups, samples = module.matrix_shape[1], module.groups, module.observer.samples
            keep = module in with_samples and samples > 0  # samples=0: the solve names it
            width = original_width(module)
            if module not in paired:
                leader = next((o for o in paired if _same_inputs(o, module, inputs)), None)
                if leader is not None:
                    leaders[module] = leader
                paired[module] = [
                    PairedGroup(
                        paired[leader][j].moments
                        if leader is not None
                        else CrossStats(n, module.offload, original_features=width),
                        Reservoir(samples, module.offload) if keep else None,
                    )
                    for j in range(groups)
                ]
                if width != n:
                    products[module] = [w.detach().T for w, _ in module.matrices()]
            shared = module in leaders  # its moments are its leader's: only its reservoir to fill
            for x, x_tilde in zip(inputs[False][module], inputs[True][module]):
                if shared and not keep:
                    break
                for rows, rows_tilde in module.paired_rows(x, x_tilde, positions):
                    parts = zip(group_parts(rows, n, groups), group_parts(rows_tilde, n, groups))
                    for j, (part, part_tilde) in enumerate(parts):
                        group = paired[module][j]
                        if not shared:
                            original = part
                            if module in products:
                                original = _products(part, products[module], j)
                            group.moments.update(part_tilde, original)
                        if group.rows is not None:
                            group.rows.update(torch.cat([part_tilde, part], 1))
        clock["statistics"] += time.perf_counter() - passed
    return paired


def _products(rows: Tensor, weights_t: list[Tensor], group: int) -> Tensor:
    """``W x`` of rows ``(N, n)`` by the group's ``W^T`` ``(n, m)``, in float32 (float64 for
    float64 rows), on the rows' device: a dense weight kept elsewhere (``offload``) or in
    another dtype is copied over once, and the copy kept in ``weights_t``."""
    work = torch.float64 if rows.dtype == torch.float64 else torch.float32
    weight_t = weights_t[group]
    if weight_t.device != rows.device or weight_t.dtype != work:
        weight_t = weights_t[group] = weight_t.to(rows.device, work)
    return rows.to(work) @ weight_t


def _same_inputs(a: nn.Module, b: nn.Module, inputs: dict[bool, dict]) -> bool:
    """Whether Linears ``a`` and ``b`` were fed the very same tensors in both networks (q, k
    and v) and pair them with their inputs: their paired moments are then the same, and
    computed once."""
    if not (isinstance(a, LowRankLinear) and type(a) is type(b)) or a.offload != b.offload:
        return False
    if (a.matrix_shape[1], a.groups) != (b.matrix_shape[1], b.groups):
        return False
    if original_width(a) != a.matrix_shape[1] or original_width(b) != b.matrix_shape[1]:
        return False  # pairs with W x depend on each layer's own W
    return all(
        len(inputs[c][a]) == len(inputs[c][b])
        and all(_same_tensor(x, y) for x, y in zip(inputs[c][a], inputs[c][b]))
        for c in (False, True)
    )


def _same_tensor(x: Tensor, y: Tensor) -> bool:
    """Whether two captured inputs (``detach``-ed views) are views of the same memory alike."""
    return (x.data_ptr(), x.shape, x.stride(), x.dtype, x.device) == (
        y.data_ptr(),
        y.shape,
        y.stride(),
        y.dtype,
        y.device,
    )


def reduced(module: nn.Module, pairs: Pairs | None, with_samples: bool) -> Pairs:
    """``pairs`` summed over every rank of the default process group (collective; ``None``:
    this rank saw no data).

    Example:
        >>> import tempfile, torch.distributed as dist, torch_lowrank as tl
        >>> dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(),
        ...                         rank=0, world_size=1)
        >>> layer = tl.LowRankLinear.from_linear(nn.Linear(6, 2), rank=1)
        >>> x = torch.randn(10, 6)
        >>> pairs = accumulate_wave([layer], [lambda compressed: layer(x)], ())[layer]
        >>> reduced(layer, pairs, False)[0].moments.count
        10
        >>> dist.destroy_process_group()
    """
    n, device = module.matrix_shape[1], device_of(module)
    out = []
    for j in range(module.groups):
        moments = None if pairs is None else pairs[j].moments  # None: this rank saw no data
        rows = None if pairs is None else pairs[j].rows
        merged = CrossStats.all_reduce(moments, n, device, original_width(module))
        if with_samples and module.observer.samples:
            rows = Reservoir.all_reduce(rows, module.observer.samples, 2 * n, device)
        out.append(PairedGroup(merged, rows))
    return out
