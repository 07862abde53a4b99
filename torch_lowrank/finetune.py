"""After recovery: fine-tuning the factors, and merging them back into dense layers.

Recovered low-rank modules hold their factors as ordinary ``nn.Parameter``s of two ordinary layers
(``down`` and ``up``), so any ``torch.optim`` or ``torch_optimizer`` optimizer trains them.
:func:`finetune_` is a short training loop for the common case, distillation from the original
dense model (or any loss you give); :func:`merge_` swaps every recovered module for the dense layer
holding the product of its factors (e.g. for hardware where one large GEMM beats two small ones).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LowRankModule
from .families import restore
from .model import default_forward, low_rank_modules, progress_bar, replace_everywhere
from .options import optimizer_class

__all__ = ["finetune_", "merge_"]

Loss = Union[str, Callable[[Any, Any], Tensor], None]
OptimizerSpec = Union[str, Callable[..., torch.optim.Optimizer]]


def _optimizer_factory(optimizer: OptimizerSpec) -> Callable[..., torch.optim.Optimizer]:
    if not isinstance(optimizer, str):
        if not callable(optimizer):
            raise ValueError(
                f"finetune_: optimizer must be a name or an optimizer class\nbut got {optimizer!r}"
            )
        return optimizer
    try:
        return optimizer_class(optimizer)
    except ValueError as err:
        raise ValueError(f"finetune_: {err}") from None


def _logits(output: Any) -> Tensor:
    """The tensor of a model output: itself, its ``logits``, or the first item of a tuple."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ValueError(
        "finetune_: cannot distil from this output; expected a tensor, a tuple whose first item "
        f"is one, or an object with .logits\nbut got {type(output).__name__}"
    )


def _kl(student: Tensor, teacher: Tensor) -> Tensor:
    """``KL(softmax(teacher) || softmax(student))`` over the last dimension, averaged over rows."""
    s = F.log_softmax(student.float().reshape(-1, student.shape[-1]), dim=-1)
    t = teacher.to(student.device).float().reshape(-1, teacher.shape[-1])
    return F.kl_div(s, F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)


def _mse(student: Tensor, teacher: Tensor) -> Tensor:
    return F.mse_loss(student.float(), teacher.to(student.device).float())


def _objective(teacher: nn.Module | None, loss: Loss) -> Callable[[Any, Any], Tensor]:
    """``objective(output, target)``: ``target`` is the teacher's output, or else the batch."""
    if teacher is None:
        if not callable(loss):
            raise ValueError(
                "finetune_: without a teacher, loss must be a callable loss(output, batch)\n"
                f"but got {loss!r}"
            )
        return loss
    if loss is None or loss == "mse":
        return lambda out, target: _mse(_logits(out), _logits(target))
    if loss == "kl":
        return lambda out, target: _kl(_logits(out), _logits(target))
    if callable(loss):
        return loss
    raise ValueError(
        "finetune_: with a teacher, loss must be 'mse', 'kl' or a callable "
        f"loss(output, teacher_output)\nbut got {loss!r}"
    )


def _batches(data: Iterable[Any]) -> Iterable[Any]:
    """Cycle over ``data``; a pass that yields nothing (empty data, spent iterator) is an error."""
    seen = 0
    while True:
        count = 0
        for batch in data:
            count += 1
            yield batch
        seen += count
        if count == 0:
            raise ValueError(
                f"finetune_: data yielded no batch after {seen}; pass a non-empty list or "
                "DataLoader (a one-shot iterator cannot be cycled)"
            )


def finetune_(
    model: nn.Module,
    data: Iterable[Any],
    *,
    teacher: nn.Module | None = None,
    loss: Loss = None,
    steps: int = 100,
    lr: float = 1e-4,
    optimizer: OptimizerSpec = "adamw",
    only_factors: bool = True,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
) -> list[float]:
    """Fine-tune a compressed model in place, by distillation from ``teacher`` or on ``loss``.

    One step: one batch of ``data`` (cycled as often as needed) forward, backward and an
    optimizer step. The model runs in train mode (dropout on, BatchNorm statistics updated as in
    any training) and gets its train/eval mode back at the end; the teacher runs in eval mode
    without gradients and is restored too. The gradients of the trained parameters are freed
    afterwards.

    Args:
        model: the compressed model (its low-rank modules recovered).
        data: a list or ``DataLoader`` of batches, as in
            :func:`~torch_lowrank.convert.default_forward`: a tensor, a mapping of keyword
            arguments, or a tuple whose first item is the input.
        teacher: the original dense model. With it, the loss is computed between the model's and
            the teacher's outputs (their tensors, ``.logits`` or first items) on the same batch.
        loss: with a teacher: ``"mse"`` (default), ``"kl"`` (KL divergence of the softmaxes over
            the last dimension, the teacher's as target) or ``loss(output, teacher_output)``;
            without a teacher, required: ``loss(output, batch) -> scalar tensor``.
        steps: optimizer steps.
        lr: learning rate.
        optimizer: a name in ``torch.optim`` or ``torch_optimizer`` (case-insensitive, e.g.
            ``"adamw"``, ``"sgd"``, ``"lamb"``; ``torch.optim`` wins on names in both, such as
            ``"radam"``), or a class / callable ``optimizer(params, lr=lr)``. It gets a closure,
            so ``LBFGS`` works too.
        only_factors: train only the parameters of recovered low-rank modules; the other
            parameters get ``requires_grad=False`` during the run and their flags back after it.
            ``False``: train every parameter that requires grad.
        forward_fn: ``forward_fn(model, batch) -> output``; default
            :func:`~torch_lowrank.convert.default_forward`.
        progress: a tqdm progress bar on an interactive terminal (``False``: never).

    Returns:
        the loss of every step, in order.

    Raises:
        ValueError: a missing or unknown loss, an unknown optimizer name, no parameter to train,
            calibrating low-rank modules in the model, or data that yields no batch.
        FloatingPointError: the loss became NaN or infinite (the step is not taken).

    Example:
        >>> import copy, torch_lowrank as tl
        >>> _ = torch.manual_seed(0)
        >>> teacher = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
        >>> data = [torch.randn(64, 32) for _ in range(4)]
        >>> model, _ = tl.compress(copy.deepcopy(teacher), data, ratio=0.25, method="linear",
        ...                        corrective=False, progress=False)
        >>> losses = finetune_(model, data, teacher=teacher, steps=40, lr=1e-2, progress=False)
        >>> len(losses), sum(losses[-10:]) < sum(losses[:10])
        (40, True)
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"finetune_: steps must be an int >= 0\nbut got {steps!r}")
    if teacher is model:
        raise ValueError("finetune_: the teacher must be a separate model (e.g. a deep copy)")
    objective = _objective(teacher, loss)
    make_optimizer = _optimizer_factory(optimizer)
    forward_fn = forward_fn or default_forward
    found = low_rank_modules(model)
    calibrating = [names[0] for module, names in found.items() if module.calibrating]
    if calibrating:
        raise ValueError(
            "finetune_: recover every low-rank module first; still calibrating:\n"
            f"{', '.join(calibrating)}"
        )
    if only_factors:
        chosen = {id(p) for module in found for p in module.parameters()}
    else:
        chosen = {id(p) for p in model.parameters()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    params = [p for p, flag in flags if flag and id(p) in chosen]
    if not params:
        raise ValueError(
            "finetune_: nothing to train: no parameter "
            + ("of a recovered low-rank module " if only_factors else "")
            + "requires grad"
        )
    opt = make_optimizer(params, lr=lr)
    modes = [(m, m.training) for m in model.modules()]
    modes += [(m, m.training) for m in teacher.modules()] if teacher is not None else []
    try:
        for p, _ in flags:
            if id(p) not in chosen:
                p.requires_grad_(False)
        model.train()
        if teacher is not None:
            teacher.eval()
        with torch.enable_grad():
            history = _train(model, teacher, data, objective, opt, forward_fn, steps, progress)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for p in params:
            p.grad = None
        for module, training in modes:
            module.training = training
    return history


def _train(
    model: nn.Module,
    teacher: nn.Module | None,
    data: Iterable[Any],
    objective: Callable[[Any, Any], Tensor],
    opt: torch.optim.Optimizer,
    forward_fn: Callable[[nn.Module, Any], Any],
    steps: int,
    progress: bool,
) -> list[float]:
    """The loop of :func:`finetune_`: ``steps`` optimizer steps over cycled ``data``."""
    history: list[float] = []
    batches = iter(_batches(data))
    bar = progress_bar(range(steps), "fine-tuning", progress)
    for step in bar:
        batch = next(batches)
        if teacher is None:
            target = batch
        else:
            with torch.no_grad():
                target = forward_fn(teacher, batch)
        first: list[float] = []

        def closure(batch=batch, target=target, first=first, step=step) -> Tensor:
            opt.zero_grad(set_to_none=True)
            value = objective(forward_fn(model, batch), target)
            if not torch.isfinite(value.detach()).all():
                raise FloatingPointError(f"finetune_: the loss is {value.item()} at step {step}")
            if not first:  # LBFGS evaluates the closure several times: keep the first value
                first.append(value.item())
            value.backward()
            return value

        opt.step(closure)
        history.append(first[0])
        if step % 10 == 0:
            bar.set_postfix(loss=f"{first[0]:.4g}")
    return history


@torch.no_grad()
def merge_(model: nn.Module) -> nn.Module:
    """Replace every recovered low-rank module of ``model`` by its dense layer, in place.

    Each module becomes its :meth:`~torch_lowrank.LowRankLinear.to_dense` layer (an
    ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` holding the product of the factors), or the
    architecture's own layer type when the module replaced a foreign one (Hugging Face GPT-2's
    ``Conv1D``, see :mod:`torch_lowrank.families`), at every name it is reachable under, on the
    same device, in the same dtype, with the same train/eval mode; its weight requires grad when
    a factor did, its bias when ``up.bias`` did. A layer without a bias stays without one (a
    ``Conv1D`` always has one: zeros), so a model compressed with ``add_bias=False`` (the default
    for Hugging Face models) merges into the architecture it came from. Forward hooks and
    pre-hooks registered on a low-rank module are registered on its dense layer too.

    Raises:
        RuntimeError: a low-rank module is still calibrating (named); nothing is merged.

    Returns:
        ``model``, or the dense layer when ``model`` itself is a recovered low-rank module.

    Example:
        >>> import torch_lowrank as tl
        >>> model = nn.Sequential(tl.LowRankLinear(16, 16, rank=2), nn.ReLU())
        >>> x = torch.randn(4, 16)
        >>> expected = model(x)
        >>> model = merge_(model)
        >>> type(model[0]).__name__, torch.allclose(model(x), expected, atol=1e-6)
        ('Linear', True)
    """
    found = low_rank_modules(model)
    calibrating = [names[0] or "model" for module, names in found.items() if module.calibrating]
    if calibrating:
        raise RuntimeError(
            "merge_: recover every low-rank module first; still calibrating:\n"
            f"{', '.join(calibrating)}"
        )
    root = model
    for module, names in found.items():
        dense = _dense_of(module)
        module.carry_hooks_to(dense)
        replaced = replace_everywhere(model, names, dense)
        root = root if replaced is model else replaced
    return root


def _dense_of(module: LowRankModule) -> nn.Module:
    dense = module.to_dense()
    dense.weight.requires_grad_(module.up.weight.requires_grad or module.down.weight.requires_grad)
    if module.up.bias is not None:
        dense.bias.requires_grad_(module.up.bias.requires_grad)
    dense.train(module.training)
    return restore(dense, module.source_type)
