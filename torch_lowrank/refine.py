"""Block refinement: after corrective recovery, fit each block's factors to the original block.

Corrective recovery solves every layer on its own: its input comes from the compressed network,
its target from the original one. Inside a block (a transformer layer, a stage of an
``nn.Sequential``) the layers' errors still add up, and a closed form cannot see what a
LayerNorm, an attention softmax or a GELU downstream makes of them. Refinement fixes the block
as a whole: with the block's factor layers as the only free parameters, it minimises

    E || block~(x~) - block(x) ||^2

where ``x~`` is the block's input in the compressed network (earlier blocks already refined),
``x`` its input in the original network, ``block`` the original block and ``block~`` the block
with its low-rank factors. It runs on the block input cache of corrective recovery
(:mod:`torch_lowrank.blocks`), one calibration batch per step, with any ``torch.optim`` or
``torch_optimizer`` optimizer. The last batches are held out: every ``eval_every`` steps the
held-out error is measured, the best parameters so far are kept (the closed form counts as step
0), and the loop stops after ``patience`` evaluations without improvement. So refinement is
never worse than the closed form on the held-out batches.

See ``docs/corrective.md`` for when it helps and what it costs.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .blocks import BlockCache, Chain
from .options import optimizer_class
from .solvers import relative_error

__all__ = ["BlockRefinement", "RefineOptions", "refine_block", "refine_cached_block"]

Call = tuple[tuple, dict]  # (args, kwargs) of one block call


@dataclass(frozen=True)
class RefineOptions:
    """How to refine each block (``refine=`` of :func:`~torch_lowrank.compress` and
    :func:`~torch_lowrank.recover_`; ``refine=True`` takes these defaults).

    Attributes:
        steps: the most optimizer steps per block (one calibration batch each).
        lr: the learning rate.
        optimizer: a ``torch.optim`` / ``torch_optimizer`` name (any case), class, or a callable
            ``(params, lr=lr) -> Optimizer``.
        held_out: calibration batches kept out of the steps, for early stopping (``None``: an
            eighth of them, at least one; with a single batch, that batch).
        eval_every: steps between two held-out evaluations.
        patience: evaluations without improvement before a block stops.

    Example:
        >>> RefineOptions(steps=100, optimizer="sgd").steps
        100
    """

    steps: int = 1000
    lr: float = 1e-3
    optimizer: str | Callable[..., torch.optim.Optimizer] = "adam"
    held_out: int | None = None
    eval_every: int = 25
    patience: int = 4

    def __post_init__(self) -> None:
        for name, low in (("steps", 0), ("eval_every", 1), ("patience", 1)):
            self._integer(name, low)
        if self.held_out is not None:
            self._integer("held_out", 1)
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 < lr < math.inf:
            raise ValueError(f"refine: lr must be a finite float > 0\nbut got {lr!r}")
        object.__setattr__(self, "lr", float(lr))
        if isinstance(self.optimizer, str):
            try:
                object.__setattr__(self, "optimizer", optimizer_class(self.optimizer))
            except ValueError as error:
                raise ValueError(f"refine: optimizer: {error}") from None
        elif not callable(self.optimizer):
            raise ValueError(
                "refine: optimizer must be a name, an Optimizer class or a callable\n"
                f"but got {self.optimizer!r}"
            )

    def _integer(self, name: str, low: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"refine: {name} must be an int >= {low}\nbut got {value!r}")
        object.__setattr__(self, name, int(value))


@dataclass
class BlockRefinement:
    """What refining one block did (a row of ``report.info["refine"]``).

    Attributes:
        block: the block's qualified name.
        steps: optimizer steps taken.
        best_step: the step whose parameters were kept (0: the closed form).
        held_out_before / held_out_after: the block's relative output error
            ``sum ||block~(x~) - block(x)||^2 / sum ||block(x) - mean||^2`` on the held-out batches,
            with the closed form and after refinement (``nan`` when the targets do not vary and
            the error is not zero; such a block is left as it is).
        held_out_batches: how many batches were held out (0: one batch only, used for both).
        seconds: wall time, targets included.
    """

    block: str
    steps: int
    best_step: int
    held_out_before: float
    held_out_after: float
    held_out_batches: int
    seconds: float

    def as_dict(self) -> dict:
        """The record as a plain dict (for JSON)."""
        return asdict(self)


def _relative_error(run: Callable[[Call], Tensor], pairs: Sequence[tuple[Call, Tensor]]) -> float:
    error = total = 0.0
    with torch.no_grad():
        for call, target in pairs:
            target = target.double()
            error += float((run(call).double() - target).square().sum())
            total += float(
                (target - target.mean(dim=tuple(range(target.dim() - 1)))).square().sum()
            )
    return relative_error(error, total)


def refine_block(
    name: str,
    run: Callable[[Call], Tensor],
    pairs: Sequence[tuple[Call, Tensor]],
    params: Sequence[nn.Parameter],
    options: RefineOptions,
) -> BlockRefinement:
    """Fit ``params`` (the block's factor layers) so that ``run(call)`` matches the target of
    each pair, in place; the best held-out parameters are kept (see the module docstring).

    Args:
        name: the block's name, for the record.
        run: the compressed block on one call (with ``params`` in it), returning the output
            to match; it must not change its input.
        pairs: per calibration batch, the compressed network's block input and the original
            block's output; the last ``options.held_out`` are held out.
        params: the parameters to fit; nothing else is changed (no ``.grad`` is left anywhere).
        options: the refinement options.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = nn.Linear(4, 4)
        >>> batches = [(((torch.randn(16, 4),), {}), None) for _ in range(4)]
        >>> pairs = [(call, 2 * call[0][0]) for call, _ in batches]
        >>> record = refine_block("layer", lambda c: layer(*c[0]), pairs, list(layer.parameters()),
        ...                       RefineOptions(steps=300, lr=0.05, held_out=1))
        >>> record.held_out_after < 0.01 * record.held_out_before
        True
    """
    start = time.perf_counter()
    held = 0 if len(pairs) < 2 else min(options.held_out or max(1, len(pairs) // 8), len(pairs) - 1)
    train, check = (pairs[:-held], pairs[-held:]) if held else (pairs, pairs)
    best = before = _relative_error(run, check)
    best_state = [p.detach().clone() for p in params]
    best_step = step = since = 0
    wanted = [p.requires_grad for p in params]
    optimizer = options.optimizer(params, lr=options.lr)
    try:
        for p in params:
            p.requires_grad_(True)
        while step < options.steps and since < options.patience and best > 0:
            call, target = train[step % len(train)]
            step += 1

            def closure(call=call, target=target) -> Tensor:
                with torch.enable_grad():
                    loss = (run(call) - target).square().mean()
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = torch.zeros_like(p) if g is None else g
                return loss.detach()

            optimizer.step(closure)
            if step % options.eval_every == 0 or step == options.steps:
                error = _relative_error(run, check)
                if error < best:
                    best, best_step, since = error, step, 0
                    best_state = [p.detach().clone() for p in params]
                else:
                    since += 1
    finally:
        with torch.no_grad():
            for p, value, flag in zip(params, best_state, wanted):
                p.copy_(value)
                p.grad = None
                p.requires_grad_(flag)
    return BlockRefinement(name, step, best_step, before, best, held, time.perf_counter() - start)


def refine_cached_block(
    cache: BlockCache,
    block: tuple[Chain, int],
    layers: list[nn.Module],
    mode: Callable[[bool], contextlib.AbstractContextManager],
    options: RefineOptions,
) -> BlockRefinement:
    """Refine the factor ``layers`` of the chain child ``block`` on the inputs ``cache`` holds
    for it: the targets are the original child's outputs (``mode(False)``), the compressed
    child runs with the factors standing in (``mode(True)``).

    Example:
        >>> from torch_lowrank.blocks import BlockCache, Chain
        >>> from torch_lowrank.model import default_forward, module_names, stood_in
        >>> _ = torch.manual_seed(0)
        >>> model, factors = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 4)
        >>> swap, names = {model[1]: factors}, module_names(model)  # factors stand in for model[1]
        >>> mode = lambda compressed: stood_in(model, swap if compressed else {}, names, {})
        >>> data, chain = [torch.randn(16, 4) for _ in range(4)], Chain(model, "", 0, False)
        >>> cache = BlockCache(model, data, default_forward, mode)
        >>> cache.seek(chain, 1)  # the inputs of child 1, in both modes
        >>> record = refine_cached_block(cache, (chain, 1), [factors], mode,
        ...                              RefineOptions(steps=100, lr=0.05))
        >>> record.block, record.held_out_after < 0.01 * record.held_out_before
        ('1', True)
    """
    chain, index = block
    name = f"{chain.name}.{index}" if chain.name else str(index)

    def run(call: tuple) -> Tensor:
        return chain.stream(chain.run(index, chain.fresh(call)))

    with torch.no_grad(), mode(False):
        targets = [run(call) for call in cache.inputs(False)]
    params = [p for layer in layers for p in layer.parameters()]
    with mode(True):
        return refine_block(name, run, list(zip(cache.inputs(True), targets)), params, options)
