"""Block input caching for corrective recovery: a wave runs only its own block (as GPTQ does).

A *chain* is an ``nn.Sequential`` or ``nn.ModuleList`` whose children run one after another, each
fed the previous child's output (the *stream*) plus arguments that are the same for every child
(an attention mask, position embeddings). Transformer layer stacks and ``nn.Sequential`` stages
are chains. :func:`find_chains` finds them on one calibration batch and checks them by replaying
the chain from its first input; only chains whose replay reproduces the model's own outputs are
used, so a model whose blocks are stateful, random or fed differently falls back to whole-model
passes.

:class:`BlockCache` keeps, for every calibration batch, the input of one chain child twice: as the
original network feeds it and as the compressed network feeds it. A wave of layers inside child
``k`` then runs only child ``k`` (twice per batch), and moving on to child ``k + 1`` runs child
``k`` once per mode. The cache is built by a forward pass that stops at the chain's first child.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Chain", "BlockCache", "find_chains"]

logger = logging.getLogger(__name__)

Call = tuple[tuple, dict]  # (args, kwargs) of one child call


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the chain's first input is captured."""


def _map(fn: Callable[[Tensor], Any], obj: Any) -> Any:
    """``fn`` applied to every tensor in nested tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(fn, item) for item in obj)
    if isinstance(obj, dict):
        return {key: _map(fn, item) for key, item in obj.items()}
    return obj


def _device(obj: Any) -> torch.device | None:
    """The device of the first tensor in ``obj``."""
    found: list[torch.device] = []
    _map(lambda t: found.append(t.device), obj)
    return found[0] if found else None


def _clone(obj: Any) -> Any:
    return _map(lambda t: t.detach().clone(), obj)


def _same(a: Any, b: Any) -> bool:
    """Whether two call arguments are the same: identical objects, or equal tensors/values."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an argument without a usable ==
        return False


def _plain(obj: Any) -> bool:
    """Whether ``obj`` is plain data (tensors, numbers, strings, None, and containers of them):
    a block given anything else (a key/value cache object) may keep state between calls."""
    if isinstance(obj, (tuple, list)):
        return all(_plain(item) for item in obj)
    if isinstance(obj, dict):
        return all(_plain(item) for item in obj.values())
    return obj is None or isinstance(obj, (Tensor, bool, int, float, str, torch.dtype))


def _close(a: Any, b: Any) -> bool:
    """Whether a replayed output matches the recorded one (tensors to float tolerance)."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not a.is_floating_point():
            return bool(torch.equal(a, b))
        scale = b.abs().max().item() if b.numel() else 0.0
        return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-30)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return _same(a, b)


@dataclass(eq=False)
class Chain:
    """A container whose children pass one stream along (see the module docstring).

    ``position`` is where the stream enters a child (a positional index or a keyword) and
    ``unpack`` whether it leaves as ``output[0]`` (blocks returning tuples) or as ``output``."""

    container: nn.Module
    name: str
    position: int | str
    unpack: bool

    def __len__(self) -> int:
        return len(self.container)

    def stream(self, output: Any) -> Any:
        """The stream part of a child's output."""
        return output[0] if self.unpack else output

    def with_stream(self, call: Call, value: Any) -> Call:
        """``call`` with its stream argument replaced by ``value``."""
        args, kwargs = call
        if isinstance(self.position, int):
            args = (*args[: self.position], value, *args[self.position + 1 :])
        else:
            kwargs = {**kwargs, self.position: value}
        return args, kwargs

    def stream_of(self, call: Call) -> Any:
        args, kwargs = call
        return args[self.position] if isinstance(self.position, int) else kwargs[self.position]

    def fresh(self, call: Call) -> Call:
        """``call`` with a copy of its stream (a child may change its input in place)."""
        return self.with_stream(call, _clone(self.stream_of(call)))

    def run(self, index: int, call: Call) -> Any:
        """Run child ``index`` (looked up now, so a BatchNorm bypass applies) on ``call``."""
        args, kwargs = call
        return self.container[index](*args, **kwargs)


def _stream_position(call: Call, previous: Any) -> tuple[int | str, bool] | None:
    """Where ``call`` takes the previous child's output ``previous`` (or its first element)."""
    args, kwargs = call
    first = previous[0] if isinstance(previous, (tuple, list)) and previous else None
    places = [*enumerate(args), *kwargs.items()]
    for position, value in places:
        if value is previous:
            return position, False
    for position, value in places:
        if first is not None and value is first:
            return position, True
    return None


def _verify(container: nn.Module, name: str, calls: list[list]) -> Chain | None:
    """A :class:`Chain` if the recorded calls of ``container``'s children form one, else None.

    ``calls[i]`` lists child ``i``'s calls as ``[order, call, input copy, output, output copy]``."""
    if any(len(c) != 1 for c in calls):
        return None  # a child ran twice or never
    records = [c[0] for c in calls]
    if [r[0] for r in records] != sorted(r[0] for r in records):
        return None
    found = {_stream_position(records[i][1], records[i - 1][3]) for i in range(1, len(records))}
    if len(found) != 1 or None in found:
        return None
    position, unpack = found.pop()
    chain = Chain(container, name, position, unpack)
    first = records[0][1]
    if not _plain(chain.with_stream(first, None)):
        return None
    if isinstance(position, int) and len(first[0]) <= position:
        return None
    if isinstance(position, str) and position not in first[1]:
        return None
    for record in records[1:]:  # the other arguments: the same for every child
        if not _same(chain.with_stream(record[1], None), chain.with_stream(first, None)):
            return None
    call = records[0][2]  # replay from a copy of the first input; outputs must match
    for index, record in enumerate(records):
        try:
            output = chain.run(index, call)
        except Exception:  # noqa: BLE001 - a block that cannot be replayed is not a chain
            return None
        if not _close(output, record[4]):
            return None
        call = chain.with_stream(call, chain.stream(output))
    return chain


@torch.no_grad()
def find_chains(
    model: nn.Module, modules: list[nn.Module], batch: Any, forward_fn: Callable
) -> tuple[dict[nn.Module, tuple[Chain, int]], int]:
    """Find the chains holding ``modules``: maps each module inside one to ``(chain, index of
    the child holding it)``; also returns the number of forward passes spent (0 or 1).

    Example:
        >>> import torch_lowrank as tl
        >>> model = tl.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), rank=2)
        >>> batch = torch.randn(4, 8)
        >>> where, _ = find_chains(model, [model[0], model[2]], batch, tl.default_forward)
        >>> [index for chain, index in where.values()]
        [0, 2]
    """
    wanted = set(modules)
    candidates = []
    for name, container in model.named_modules():
        if not isinstance(container, (nn.Sequential, nn.ModuleList)) or len(container) < 2:
            continue
        owner = {m: i for i, child in enumerate(container) for m in child.modules() if m in wanted}
        if len(set(owner.values())) >= 2:
            candidates.append((name, container, owner))
    if not candidates:
        return {}, 0
    counter = itertools.count()
    calls = [[[] for _ in container] for _, container, _ in candidates]
    handles = []

    def hooks(record: list) -> tuple[Callable, Callable]:
        def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
            record.append([next(counter), (args, kwargs), _clone((args, kwargs)), None, None])

        def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            record[-1][3:] = [output, _clone(output)]

        return before, after

    try:
        for (_, container, _), records in zip(candidates, calls):
            for child, record in zip(container, records):
                before, after = hooks(record)
                # nn.Module's registration: a low-rank child records only its user's hooks
                handles.append(nn.Module.register_forward_pre_hook(child, before, with_kwargs=True))
                handles.append(nn.Module.register_forward_hook(child, after, with_kwargs=True))
        forward_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    chains = []
    for (name, container, owner), records in zip(candidates, calls):
        chain = _verify(container, name, records)
        if chain is None:
            logger.info("%s: not a chain of blocks; its waves run the whole model", name or "model")
        else:
            chains.append((len(set(owner.values())), name.count(".") if name else -1, chain, owner))
    where: dict[nn.Module, tuple[Chain, int]] = {}
    for *_, chain, owner in sorted(chains, key=lambda c: (-c[0], c[1])):
        if not any(m in where for m in owner):  # nested chains: the one with most blocks wins
            where.update({m: (chain, index) for m, index in owner.items()})
    return where, 1


class BlockCache:
    """The inputs of one chain child for every calibration batch, as the original (``False``)
    and the compressed (``True``) network feed it.

    Args:
        model, data, forward_fn: the model and how to run its calibration batches.
        mode: ``mode(compressed)`` returns a context manager that sets the model's mode.
        store: where cached tensors live between uses (``None``: where they were made; a
            device such as ``"cpu"`` keeps them in host memory).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        forward_fn: Callable,
        mode: Callable[[bool], AbstractContextManager],
        store: str | torch.device | None = None,
    ) -> None:
        self.model, self.data, self.forward_fn, self.mode = model, data, forward_fn, mode
        self.store = store
        self.chain: Chain | None = None
        self.index = 0
        self.entries: list[dict[bool, Call]] = []
        self.device: torch.device | None = None
        self.forward_passes = 0
        self.block_passes = 0

    @property
    def nbytes(self) -> int:
        """Memory held by the cached inputs, in bytes."""
        sizes: list[int] = []
        for entry in self.entries:
            _map(lambda t: sizes.append(t.numel() * t.element_size()), list(entry.values()))
        return sum(sizes)

    def _keep(self, call: Call) -> Call:
        return call if self.store is None else _map(lambda t: t.to(self.store), call)

    def _use(self, call: Call) -> Call:
        if self.store is None or self.device is None:
            return call
        return _map(lambda t: t.to(self.device), call)

    @torch.no_grad()
    def _build(self, chain: Chain) -> None:
        """Capture the first child's input for every batch by passes that stop there."""
        captured: list[Call] = []

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append((args, kwargs))
            raise _Stop

        self.entries, self.chain, self.index = [], chain, 0
        first = chain.container[0]
        handle = nn.Module.register_forward_pre_hook(first, stop, with_kwargs=True)
        try:
            for batch in self.data:
                entry = {}
                for compressed in (False, True):
                    captured.clear()
                    with self.mode(compressed), suppress(_Stop):
                        self.forward_fn(self.model, batch)
                    self.forward_passes += 1
                    if captured:
                        self.device = _device(captured[0]) or self.device
                        entry[compressed] = self._keep(captured[0])
                if len(entry) == 2:  # a batch that never reaches the chain adds nothing
                    self.entries.append(entry)
        finally:
            handle.remove()

    @torch.no_grad()
    def seek(self, chain: Chain, index: int) -> None:
        """Make the cache hold the inputs of ``chain``'s child ``index``."""
        if self.chain is not chain or self.index > index:
            self._build(chain)
        while self.index < index:
            for entry in self.entries:
                for compressed in (False, True):
                    call = self._use(entry[compressed])
                    with self.mode(compressed):
                        output = chain.run(self.index, call)
                    entry[compressed] = self._keep(chain.with_stream(call, chain.stream(output)))
                    self.block_passes += 1
            self.index += 1

    def runs(self) -> list[Callable[[bool], None]]:
        """One callable per batch that runs the current child in the given mode, on a copy of
        the cached stream (a child may change its input in place)."""

        def run(entry: dict[bool, Call], compressed: bool) -> None:
            call = self.chain.fresh(self._use(entry[compressed]))
            self.block_passes += 1  # first: a pass may end early once the wave has its inputs
            with self.mode(compressed):
                self.chain.run(self.index, call)

        return [lambda compressed, entry=entry: run(entry, compressed) for entry in self.entries]

    def inputs(self, compressed: bool) -> list[Call]:
        """The current child's cached inputs in one mode, one per batch, on the compute device
        (pass each through :meth:`Chain.fresh` before running a child on it)."""
        return [self._use(entry[compressed]) for entry in self.entries]
