"""Corrective waves of a ``torch.fx.GraphModule`` run from cached node values, not the model.

A model exported to a :class:`torch.fx.GraphModule` (``symbolic_trace``, a quantization or export
flow) is one flat graph: no chain of blocks (:mod:`torch_lowrank.blocks`), so every wave of
corrective recovery would run the whole model twice per batch. The graph says what a wave needs:
its *cut* is the first node that calls one of its layers, and the values live across that cut
(computed before, read at or after it) are all the rest of the graph reads. :class:`GraphCache`
keeps those values for every calibration batch, as the original network and as the compressed
network computes them, and a wave runs only the nodes from its cut on (and stops once its layers
have their inputs). Moving on to the next wave's cut runs the nodes in between once per mode.

The cache is used only where it reproduces the model: the graph module must be the model itself,
called once per batch by ``forward_fn``, with plain positional and keyword parameters, and the
first batch, replayed from its captured arguments, must give the very output of the model's own
forward. Otherwise the waves run the whole model, with the same result.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, suppress
from typing import Any

import torch
from torch import Tensor, fx, nn

__all__ = ["GraphCache"]

Env = dict[fx.Node, Any]


class _Stop(Exception):
    """Raised by a hook to end a forward once the graph module's arguments are captured."""


def _same(a: Any, b: Any) -> bool:
    """Whether two outputs are equal, tensors bit for bit (nested tuples, lists and dicts)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def _copy(env: Env) -> Env:
    """The values with fresh tensors: a node may change its input in place."""
    return {node: v.clone() if isinstance(v, Tensor) else v for node, v in env.items()}


class GraphCache:
    """The values live across one cut of a ``GraphModule`` for every calibration batch, as the
    original (``False``) and the compressed (``True``) network compute them.

    Build it with :meth:`of`, which returns ``None`` where the cache would not reproduce the
    model (module docstring). :meth:`cut` gives a wave's cut, :meth:`seek` moves the cache
    there and :meth:`runs` gives one callable per batch that runs the graph from it.

    Example:
        >>> import contextlib, torch_lowrank as tl
        >>> model = fx.symbolic_trace(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
        >>> model = tl.convert(model, rank=2)
        >>> data = [torch.randn(5, 8)]
        >>> plain = lambda compressed: contextlib.nullcontext()  # no stand-ins: one network
        >>> cache = GraphCache.of(model, data, tl.default_forward, plain)
        >>> cut = cache.cut([model.get_submodule("2")])
        >>> cache.seek(cut)
        >>> [node.name for node in cache.entries[0][False]], cache.forward_passes
        (['_1'], 2)
    """

    def __init__(
        self,
        model: fx.GraphModule,
        data: Iterable[Any],
        forward_fn: Callable,
        mode: Callable[[bool], AbstractContextManager],
    ) -> None:
        self.model, self.data, self.forward_fn, self.mode = model, data, forward_fn, mode
        self.nodes = list(model.graph.nodes)
        self.order = {node: i for i, node in enumerate(self.nodes)}
        self.start = sum(node.op == "placeholder" for node in self.nodes)
        self.position = self.start  # the cut the entries are at
        self.entries: list[dict[bool, Env]] = []
        self.interpreter = fx.Interpreter(model, garbage_collect_values=False)
        self.forward_passes = 0
        self.graph_passes = 0

    @classmethod
    @torch.no_grad()
    def of(
        cls,
        model: nn.Module,
        data: Iterable[Any],
        forward_fn: Callable,
        mode: Callable[[bool], AbstractContextManager],
    ) -> GraphCache | None:
        """A cache for ``model`` if it is a ``GraphModule`` whose replay from the first batch's
        arguments gives its own output; else ``None`` (two forward passes, or none)."""
        if not isinstance(model, fx.GraphModule):
            return None
        if any(n.op == "placeholder" and str(n.target).startswith("*") for n in model.graph.nodes):
            return None
        cache = cls(model, data, forward_fn, mode)
        batch = next(iter(data))
        calls: list[tuple[tuple, dict]] = []
        outputs: list[Any] = []
        handles = [
            nn.Module.register_forward_pre_hook(
                model, lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True
            ),
            nn.Module.register_forward_hook(model, lambda m, args, out: outputs.append(out)),
        ]
        try:
            with mode(False):
                forward_fn(model, batch)
        finally:
            for handle in handles:
                handle.remove()
        cache.forward_passes += 1
        if len(calls) != 1:
            return None
        with mode(False):
            env = cache._bind(*calls[0])
            replayed = None if env is None else cache._advance(env, len(cache.nodes))
        if replayed is None or not _same(replayed.get(cache.nodes[-1]), outputs[0]):
            return None
        return cache

    def _bind(self, args: tuple, kwargs: dict) -> Env | None:
        """The placeholder values of one call of the graph module (``None``: they do not bind)."""
        try:
            bound = inspect.signature(self.model.forward).bind(*args, **kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        return {n: bound.arguments.get(n.target) for n in self.nodes[: self.start]}

    def _advance(self, env: Env, to: int) -> Env:
        """Run the nodes from the current cut up to ``to`` (exclusive; ``len(nodes)``: to the
        output) on ``env``; returns the values live across ``to``."""
        self.interpreter.env = env
        for node in self.nodes[self.position : to]:
            env[node] = self.interpreter.run_node(node)
        return {
            node: value
            for node, value in env.items()
            if to == len(self.nodes) or any(self.order[u] >= to for u in node.users)
        }

    def cut(self, wave: list[nn.Module]) -> int | None:
        """The index of the first node that calls a module of ``wave``, or a leaf module of the
        trace holding one (``None``: none does).

        Example:
            >>> import torch_lowrank as tl
            >>> model = tl.convert(fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4))), rank=1)
            >>> GraphCache(model, [], tl.default_forward, None).cut([model.get_submodule("0")])
            1
        """
        for i, node in enumerate(self.nodes):
            if node.op == "call_module" and any(
                m in wave for m in self.model.get_submodule(node.target).modules()
            ):
                return i
        return None

    @property
    def nbytes(self) -> int:
        """Memory held by the cached values, in bytes."""
        return sum(
            v.numel() * v.element_size()
            for entry in self.entries
            for env in entry.values()
            for v in env.values()
            if isinstance(v, Tensor)
        )

    @torch.no_grad()
    def seek(self, cut: int) -> None:
        """Make the cache hold the values live across ``cut`` (from the start when it was past
        it: one pass per batch and mode that stops at the graph module's call)."""
        if cut < self.position or not self.entries:
            self._capture()
        for entry in self.entries:
            for compressed in (False, True):
                with self.mode(compressed):
                    entry[compressed] = self._advance(_copy(entry[compressed]), cut)
                self.graph_passes += 1
        self.position = cut

    def _capture(self) -> None:
        captured: list[Env | None] = []

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(self._bind(args, kwargs))
            raise _Stop

        handle = nn.Module.register_forward_pre_hook(self.model, stop, with_kwargs=True)
        self.entries, self.position = [], self.start
        try:
            for batch in self.data:
                captured.clear()
                with suppress(_Stop):
                    self.forward_fn(self.model, batch)
                self.forward_passes += 1
                if captured and captured[0] is not None:  # a batch that never calls it adds nothing
                    self.entries.append({False: captured[0], True: dict(captured[0])})
        finally:
            handle.remove()

    def runs(self) -> list[Callable[[bool], None]]:
        """One callable per batch that runs the graph from the cut in the given mode, on a
        copy of the cached values (a pass may end early once the wave has its inputs)."""

        def run(entry: dict[bool, Env], compressed: bool) -> None:
            self.graph_passes += 1
            with self.mode(compressed):
                self._advance(_copy(entry[compressed]), len(self.nodes))

        return [lambda compressed, entry=entry: run(entry, compressed) for entry in self.entries]
