"""Loss-aware global allocation: how much each layer's error moves the model's output.

Global allocation from spectra alone (``allocate_by="spectra"``) minimises the sum of the
layers' *normalised* errors: a unit of relative error costs the same in every layer. But an
error in one layer may move the model's output far more than the same error in another. With
``allocate_by="kl"`` (or ``"mse"``) every layer's error is put in one currency first: the layer
alone is replaced by its ``linear`` factors at the rank a uniform ``ratio`` would give it, the
first :data:`PROBE_BATCHES` calibration batches are run, and the change of the model's output
(the KL divergence of the output distributions, or the output's relative squared error) is
divided by the layer's own relative error at that rank. The allocation then minimises the
summed normalised errors, each times its layer's sensitivity
(:class:`~torch_lowrank.allocation.LayerBudget` ``weight``). It costs one closed-form solve and
``PROBE_BATCHES`` forward passes per layer, and uses nothing but the calibration batches.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .model import module_names, stood_in, world_size
from .observer import Observation
from .options import LinearOptions
from .plan import plan_layer
from .ranks import target_rank
from .settings import GlobalAllocation
from .solvers import relative_error
from .weighting import FisherWeighting

__all__ = ["PROBE_BATCHES", "output_distance", "output_tensor", "sensitivities"]
__all__ += ["output_fisher"]

#: Calibration batches run per probed layer.
PROBE_BATCHES = 4


def output_tensor(output: Any) -> Tensor:
    """The tensor a model's output is compared by: the output itself, its ``logits`` (Hugging
    Face outputs) or the first tensor of a tuple or list.

    Example:
        >>> output_tensor((torch.ones(2), "cache")).shape
        torch.Size([2])
    """
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else None
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        "allocate_by: the model's output must be a tensor, have .logits, or start with a tensor\n"
        f"but got {type(output).__name__}"
    )


def output_distance(kind: str, outputs: list[Tensor], dense: list[Tensor]) -> float:
    """How far ``outputs`` are from ``dense``: ``"kl"``, the mean KL divergence
    ``KL(softmax(dense) || softmax(output))`` over the last dimension, per position; ``"mse"``,
    ``sum ||output - dense||^2 / sum ||dense - mean||^2``.

    Example:
        >>> dense = [torch.tensor([[2.0, 0.0]])]
        >>> output_distance("kl", dense, dense), output_distance("mse", [dense[0] + 1], dense)
        (0.0, 1.0)
    """
    if kind == "kl":
        total = positions = 0.0
        for out, ref in zip(outputs, dense):
            p, q = ref.double().log_softmax(-1), out.double().log_softmax(-1)
            total += float((p.exp() * (p - q)).sum())
            positions += ref.numel() // max(ref.shape[-1], 1)
        return total / max(positions, 1)
    error = sum(float((o.double() - r.double()).square().sum()) for o, r in zip(outputs, dense))
    spread = sum(float((r.double() - r.double().mean()).square().sum()) for r in dense)
    return error / spread if spread > 0 else 0.0


def _probe_rank(module: nn.Module, spec: GlobalAllocation) -> int:
    """The rank a uniform ``spec.ratio`` gives the layer, within the allocation's bounds."""
    shape = module.matrix_shape
    rank = target_rank(shape, None, spec.ratio, None, module.layer_name, "probe")
    rank = max(rank, spec.min_rank)
    return rank if spec.max_rank is None else min(rank, spec.max_rank)


def sensitivities(
    model: nn.Module,
    modules: list[nn.Module],
    fold: Mapping[nn.Module, list[str]],
    observed: Mapping[nn.Module, Observation],
    spec: GlobalAllocation,
    data: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any],
) -> dict[nn.Module, float]:
    """Each module's output change per unit of its relative error (see the module docstring);
    a layer that cannot be probed (no saving rank) gets the median of the others. The model
    and its statistics are left as they were.

    Args:
        model: the calibrating model (in eval mode).
        modules: the calibrating modules whose ranks are allocated.
        fold: per module, the names of the BatchNorm folded into it (empty: none).
        observed: per module, the statistics to solve from.
        spec: the allocation (its ``ratio``, rank bounds and ``allocate_by``).
        data: the calibration batches; the first :data:`PROBE_BATCHES` are run.
        forward_fn: how to run one batch.

    Example:
        >>> import torch_lowrank as tl
        >>> from torch_lowrank.settings import GlobalAllocation
        >>> model = tl.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), rank=2)
        >>> batches = [torch.randn(32, 8) for _ in range(2)]
        >>> _ = tl.calibrate(model, batches, progress=False)
        >>> layers, spec = [model[0], model[2]], GlobalAllocation(0.5, allocate_by="kl")
        >>> observed = {m: m.observer.observation() for m in layers}
        >>> weights = sensitivities(model, layers, {m: [] for m in layers}, observed, spec,
        ...                         batches, tl.default_forward)
        >>> [w > 0 for w in weights.values()], [m.samples_seen for m in layers]  # stats unchanged
        ([True, True], [64, 64])
    """
    batches = list(itertools.islice(iter(data), PROBE_BATCHES))
    names = module_names(model)
    measured: dict[nn.Module, float] = {}
    with contextlib.ExitStack() as quiet, torch.no_grad():
        for module in names:  # the probes must not add to any layer's statistics
            if getattr(module, "calibrating", False):
                quiet.enter_context(module.observer.disabled())
        dense = [output_tensor(forward_fn(model, batch)) for batch in batches]
        for module in modules:
            plan = plan_layer(
                module, "linear", LinearOptions(), fold=bool(fold[module]),
                rank=_probe_rank(module, spec), observation=observed[module],
            )  # fmt: skip
            if plan.factors is None:
                continue
            error = relative_error(
                sum(f.error for f in plan.factors), sum(f.variance for f in plan.factors)
            )
            if not error > 0:  # exact at that rank, or no variance: nothing to measure
                continue
            folded = {module: fold[module]} if plan.folded else {}
            with stood_in(model, {module: nn.Sequential(*plan.layers)}, names, folded):
                outputs = [output_tensor(forward_fn(model, batch)) for batch in batches]
            measured[module] = output_distance(spec.allocate_by, outputs, dense) / error
    fallback = statistics.median(measured.values()) if measured else 1.0
    weights = {module: measured.get(module, fallback) for module in modules}
    if world_size() > 1:  # every rank probed its own batches: all allocate from the mean
        values = torch.tensor(
            list(weights.values()), dtype=torch.float64, device=modules[0].matrices()[0][0].device
        )
        torch.distributed.all_reduce(values)
        weights = dict(zip(weights, (values / world_size()).tolist()))
    return weights


def _sampled_loss(output: Any, batch: Any) -> Tensor:
    """Cross-entropy of labels drawn from the output's own distribution (logits, last dim)."""
    logits = output_tensor(output)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    labels = torch.distributions.Categorical(logits=flat.detach()).sample()
    return nn.functional.cross_entropy(flat, labels, reduction="sum")


def output_fisher(
    model: nn.Module,
    modules: list[nn.Module],
    data: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any],
    spec: FisherWeighting,
) -> dict[nn.Module, Tensor]:
    """Per module, ``G = E[g g^T]`` ``(m_total, m_total)`` over its output rows, ``g`` the
    gradient of the loss with respect to the module's output (channels last for convs), on
    the module's device. Gradients are taken with :func:`torch.autograd.grad`, so no
    parameter's ``.grad`` changes; the modules' observers see nothing. A module whose output
    does not reach the loss gets ``G = 0``.

    Example:
        >>> import torch_lowrank as tl
        >>> model = tl.convert(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)), rank=2)
        >>> layers = [model[0], model[1]]
        >>> fisher = output_fisher(model, layers, [torch.randn(16, 8)], tl.default_forward,
        ...                        FisherWeighting())
        >>> fisher[model[1]].shape
        torch.Size([3, 3])
    """
    loss_fn = spec.loss or _sampled_loss
    outputs: dict[nn.Module, list[Tensor]] = {}

    def capture(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        if not output.requires_grad:  # nothing upstream needs grad: start the graph here
            output = output.detach().requires_grad_()
        outputs.setdefault(module, []).append(output)
        return output

    sums = {m: None for m in modules}
    rows = dict.fromkeys(modules, 0)
    with contextlib.ExitStack() as stack, torch.enable_grad():
        for module in modules:
            stack.enter_context(module.observer.disabled())
            stack.callback(module.register_forward_hook(capture).remove)
        for i, batch in enumerate(data):
            if spec.batches is not None and i >= spec.batches:
                break
            outputs.clear()
            loss = loss_fn(forward_fn(model, batch), batch)
            seen = [(m, out) for m, outs in outputs.items() for out in outs]
            grads = torch.autograd.grad(loss, [out for _, out in seen], allow_unused=True)
            for (module, out), grad in zip(seen, grads):
                g = (torch.zeros_like(out) if grad is None else grad).detach().float()
                g = g.movedim(1, -1) if g.dim() > 2 and not _is_linear(module) else g
                g = g.reshape(-1, g.shape[-1])
                product = g.T @ g
                sums[module] = product if sums[module] is None else sums[module] + product
                rows[module] += g.shape[0]
    if world_size() > 1:  # every rank ran its own batches: all weigh by the pooled G
        for module in modules:
            out = module.dense.weight.shape[0]
            device = module.factor_device or module.dense.weight.device
            total = sums[module]
            if total is None:
                total = torch.zeros(out, out, device=device)
            count = torch.tensor([float(rows[module])], device=total.device)
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
            sums[module], rows[module] = total, int(count.item())
    return {m: (s.double() / max(rows[m], 1)) for m, s in sums.items() if s is not None}


def _is_linear(module: nn.Module) -> bool:
    """A Linear's outputs are channels last; a conv's are channels first."""
    return len(module.dense.weight.shape) == 2
