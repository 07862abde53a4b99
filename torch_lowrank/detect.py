"""Which elementwise activation consumes each low-rank layer's output.

Real models rarely trace cleanly, so the activation that follows a layer is *observed*: during the
first calibration forward a :class:`~torch.overrides.TorchFunctionMode` records every function
that consumes a low-rank module's output tensor. A layer is followed by an activation only when
its output has exactly one consumer and that consumer is a known elementwise activation
(``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu``, ``nn.ReLU6``, ``nn.LeakyReLU``,
``nn.GELU``, ``nn.SiLU``, ``nn.Tanh``, ``nn.Sigmoid`` and their functional forms). An eval-mode
BatchNorm between the two is allowed and recorded, so it can be folded into the layer. Anything
else (a residual add, a norm, a reshape, a second consumer) means "linear" (no activation).
``nn.Sequential`` adjacency and ``torch.fx`` are cross-checks (:func:`static_activations`). The
activations themselves are :data:`torch_lowrank.activations.ACTIVATIONS`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .activations import ACTIVATIONS, BATCHNORMS, Activation, leaky, module_activation

__all__ = ["FirstForwardDetector", "paused", "settle_activations", "static_activations"]

logger = logging.getLogger(__name__)


_RELU = {F.relu, torch.relu, Tensor.relu, torch.relu_, Tensor.relu_}
_TANH = {torch.tanh, Tensor.tanh, F.tanh}
_SIGMOID = {torch.sigmoid, Tensor.sigmoid, F.sigmoid}
# Functions that only read metadata do not consume a tensor's values.
_METADATA = {
    "dim",
    "size",
    "numel",
    "__len__",
    "stride",
    "is_contiguous",
    "is_floating_point",
    "__get__",
    "element_size",
}


# Consumers that only read a tensor (their result is a new tensor, never a view of it), with the
# position of their ``inplace`` flag where they have one: a layer output read only by these
# needs no copy while a calibration batch is pending (observer.BatchGate).
_READ_ONLY = {
    **dict.fromkeys((F.relu, F.relu6, F.silu, F.elu), 1),
    F.leaky_relu: 2,
    F.hardtanh: 3,
    **dict.fromkeys(
        (torch.relu, Tensor.relu, F.gelu, torch.tanh, Tensor.tanh, F.tanh, torch.sigmoid)
        + (Tensor.sigmoid, F.sigmoid, F.batch_norm, F.layer_norm, F.group_norm, F.linear)
        + (F.conv1d, F.conv2d, torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.add)
        + (Tensor.add, Tensor.__add__, Tensor.__radd__, torch.mul, Tensor.mul, Tensor.__mul__)
        + (Tensor.__rmul__, Tensor.__sub__, Tensor.__rsub__, Tensor.__truediv__)
        + (F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool2d),
        None,
    ),
}


def _reads_only(func, args: tuple, kwargs: dict) -> bool:
    """Whether a recorded call only reads its tensor arguments (see ``_READ_ONLY``)."""
    if func not in _READ_ONLY or "out" in kwargs:
        return False
    index = _READ_ONLY[func]
    return index is None or not _bound(args, kwargs, index, "inplace", False)


def _bound(args: tuple, kwargs: dict, index: int, key: str, default):
    if len(args) > index:
        return args[index]
    return kwargs.get(key, default)


def _call_activation(func, args: tuple, kwargs: dict) -> Activation | None:
    """The activation a recorded call applies to its first argument, if it is one."""
    if func in _RELU:
        return ACTIVATIONS["relu"]
    if func in _TANH:
        return ACTIVATIONS["tanh"]
    if func in _SIGMOID:
        return ACTIVATIONS["sigmoid"]
    if func is F.silu:
        return ACTIVATIONS["silu"]
    if func is F.gelu:
        approximate = _bound(args, kwargs, 1, "approximate", "none")
        return ACTIVATIONS["gelu_tanh" if approximate == "tanh" else "gelu"]
    if func is F.leaky_relu:
        return leaky(float(_bound(args, kwargs, 1, "negative_slope", 0.01)))
    if func in (F.relu6, F.hardtanh):
        low = _bound(args, kwargs, 1, "min_val", 0.0 if func is F.relu6 else -1.0)
        high = _bound(args, kwargs, 2, "max_val", 6.0 if func is F.relu6 else 1.0)
        if (low, high) == (0.0, 6.0):
            return ACTIVATIONS["relu6"]
    return None


@dataclass
class Observed:
    """What follows one layer: the activation (``None``: linear) and an eval BatchNorm between."""

    activation: Activation | None
    batchnorm: nn.Module | None = None


class ConsumerRecorder(TorchFunctionMode):
    """Records, during one forward, every function call that consumes a watched tensor.

    Layers call :meth:`watch` on their outputs (from a forward hook); when the forward is over,
    :meth:`result` says what followed each layer. Calls made while :func:`paused` is active (the
    library's own calibration hooks) are not recorded.
    """

    def __init__(self, batchnorms: dict[int, nn.Module]) -> None:
        super().__init__()
        self._batchnorms = batchnorms  # id(running_mean) -> the BatchNorm module
        # id(tensor) -> (tensor, (layer name, call index), BatchNorm the tensor came out of)
        self._watched: dict[int, tuple[Tensor, tuple[str, int], nn.Module | None]] = {}
        self._uses: dict[tuple[str, int], list[tuple]] = {}
        self._calls: dict[str, int] = {}
        self.pause = 0

    def watch(self, name: str, output: Tensor) -> None:
        call = (name, self._calls.get(name, 0))
        self._calls[name] = call[1] + 1
        self._watched[id(output)] = (output, call, None)
        self._uses[call] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.pause or getattr(func, "__name__", "") in _METADATA:
            return out
        for position, value in enumerate((*args, *kwargs.values())):
            entry = self._watched.get(id(value)) if isinstance(value, Tensor) else None
            if entry is None or entry[0] is not value:
                continue
            _, call, batchnorm = entry
            self._uses[call].append((func, args, kwargs, position, batchnorm))
            if func is F.batch_norm and position == 0 and batchnorm is None:
                bn = self._batchnorms.get(id(_bound(args, kwargs, 1, "running_mean", None)))
                if bn is not None and not _bound(args, kwargs, 5, "training", False):
                    self._watched[id(out)] = (out, call, bn)
        return out

    def read_only(self) -> dict[str, bool]:
        """Per watched layer name, whether every consumer of its output, in every call, only
        reads it (then the output cannot change after the layer returns)."""
        found: dict[str, bool] = {}
        for (name, _), uses in self._uses.items():
            direct = [u for u in uses if u[4] is None]
            reads = all(_reads_only(func, args, kwargs) for func, args, kwargs, _, _ in direct)
            found[name] = found.get(name, True) and reads
        return found

    def result(self) -> dict[str, Observed]:
        """Per watched layer name, what consumes its output (every call must agree)."""
        per_call: dict[str, list[Observed]] = {}
        for (name, _), uses in self._uses.items():
            per_call.setdefault(name, []).append(_decide(uses))
        return {
            name: found[0] if all(o == found[0] for o in found) else Observed(None)
            for name, found in per_call.items()
        }


def _decide(uses: list[tuple]) -> Observed:
    """The activation of one call's output from its consumers: exactly one, elementwise."""
    direct = [u for u in uses if u[4] is None]
    after_bn = [u for u in uses if u[4] is not None]
    if len(direct) != 1 or direct[0][3] != 0:
        return Observed(None)
    func, args, kwargs, _, _ = direct[0]
    if func is F.batch_norm:
        if len(after_bn) == 1 and after_bn[0][3] == 0:
            return Observed(_call_activation(*after_bn[0][:3]), after_bn[0][4])
        # Several consumers after the BatchNorm: fold it all the same (exact), no activation.
        return Observed(None, after_bn[0][4] if after_bn else None)
    return Observed(_call_activation(func, args, kwargs))


#: The recorder of the forward in progress, if any (the calibration hooks pause it).
_ACTIVE: list[ConsumerRecorder] = []


class paused:
    """Context manager: calls inside are not recorded as consumers."""

    def __enter__(self) -> None:
        for recorder in _ACTIVE:
            recorder.pause += 1

    def __exit__(self, *exc) -> None:
        for recorder in _ACTIVE:
            recorder.pause -= 1


def static_activations(
    model: nn.Module, names: list[str], leaf: Callable[[nn.Module], bool] = lambda m: False
) -> dict[str, Activation | None]:
    """What ``nn.Sequential`` adjacency and, when the model traces, ``torch.fx`` say follows each
    named layer; a name missing from the result could not be decided statically. Modules for
    which ``leaf`` is true are not traced into.

    Example:
        >>> seq = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
        >>> {k: (v.name if v else None) for k, v in static_activations(seq, ["0", "2"]).items()}
        {'0': 'gelu', '2': None}
    """
    found: dict[str, Activation | None] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if name else None
        if isinstance(parent, nn.Sequential):
            keys = [k for k, _ in parent.named_children()]
            i = keys.index(child)
            nxt = parent.get_submodule(keys[i + 1]) if i + 1 < len(keys) else None
            if nxt is not None and module_activation(nxt) is not None:
                found[name] = module_activation(nxt)
            elif nxt is not None:
                found[name] = None

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return leaf(m) or super().is_leaf_module(m, qualname)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = Tracer().trace(model)
    except Exception:  # untraceable models are common; observation is the primary source
        logger.debug("torch.fx could not trace %s; using observation only", type(model).__name__)
        return found
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in names:
            continue
        users = list(node.users)
        act = None
        if len(users) == 1:
            user = users[0]
            if user.op == "call_module":
                act = module_activation(model.get_submodule(user.target))
            elif user.op in ("call_function", "call_method"):
                func = (
                    user.target
                    if user.op == "call_function"
                    else getattr(Tensor, user.target, None)
                )
                act = _call_activation(func, tuple(user.args), dict(user.kwargs))
        found.setdefault(node.target, act)
    return found


def _exit(recorder: ConsumerRecorder) -> None:
    recorder.__exit__(None, None, None)
    _ACTIVE.remove(recorder)


class FirstForwardDetector:
    """Observes the first complete forward of ``model`` and sets, on every pending layer, the
    activation that consumed its output (and the eval BatchNorm in between, when ``fold``).

    It holds a forward pre-hook and an always-called forward hook on ``model`` and a forward hook
    on each layer, all ``RemovableHandle``s, removed after that forward or by :meth:`remove`.

    Args:
        model: the model whose forward is observed.
        layers: the low-rank modules to observe, with their names.
        fold: record an eval-mode BatchNorm between a layer and its activation (to be folded);
            otherwise such a layer counts as linear.
    """

    def __init__(self, model: nn.Module, layers: dict[nn.Module, str], fold: bool) -> None:
        self.layers = layers
        self.fold = fold
        #: the first forward was observed, or the hooks were removed (a plain attribute, so that
        #: checking it costs no call)
        self.done = False
        self._batchnorms = {
            id(m.running_mean): m
            for m in model.modules()
            if isinstance(m, BATCHNORMS) and m.running_mean is not None
        }
        self._recorder: ConsumerRecorder | None = None
        self._handles = [
            model.register_forward_pre_hook(self._begin),
            model.register_forward_hook(self._end, always_call=True),
        ]
        # nn.Module's registration: a low-rank layer records only its user's hooks
        self._handles += [nn.Module.register_forward_hook(m, self._watch) for m in layers]

    def _begin(self, model: nn.Module, args: tuple) -> None:
        if self._recorder is None:
            self._recorder = ConsumerRecorder(self._batchnorms)
            self._recorder.__enter__()
            _ACTIVE.append(self._recorder)

    def _watch(self, layer: nn.Module, args: tuple, output) -> None:
        if self._recorder is not None and isinstance(output, Tensor):
            self._recorder.watch(self.layers[layer], output)

    def _end(self, model: nn.Module, args: tuple, output) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is None:
            return
        _exit(recorder)
        if output is None:  # the forward raised: observe the next one instead
            return
        self.remove()
        observed, read_only = recorder.result(), recorder.read_only()
        for layer, name in self.layers.items():
            if name in read_only and layer.observer is not None:
                layer.observer.copy_outputs = not read_only[name]
            if layer.activation_source != "auto" or name not in observed:
                continue
            found = observed[name]
            if found.batchnorm is not None and not self.fold:
                found = Observed(None)
            layer.set_activation_(found.activation, found.batchnorm, "observed")

    def abort(self) -> None:
        """End an observation that a forward left open (PyTorch runs no hook after Ctrl-C):
        its mode leaves the stack, and the next forward is observed instead."""
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            _exit(recorder)

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.done = True


def settle_activations(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Give every low-rank layer of ``layers`` (by name) whose activation is still pending (no
    forward reached it) the static answer: Sequential adjacency or ``torch.fx``, tracing the
    ``layers`` as leaves; ``None`` (linear) where neither can tell.

    Example:
        >>> import torch_lowrank as tl
        >>> seq = tl.convert(nn.Sequential(nn.Linear(4, 4), nn.GELU()), rank=1)
        >>> settle_activations(seq, {"0": seq[0]})  # no forward ran: the static answer
        >>> seq[0].activation.name, seq[0].activation_source
        ('gelu', 'static')
    """
    pending = {name: m for name, m in layers.items() if m.activation_source == "auto"}
    leaf = set(layers.values())
    static = static_activations(model, list(pending), leaf=lambda m: m in leaf)
    for name, module in pending.items():
        if name in static:
            module.set_activation_(static[name], None, "static")
        else:
            module.set_activation_(None, None, "none")
