"""Loading a compressed model's state dict into a freshly built dense model.

A recovered low-rank module saves its factors as ``<name>.down.weight``, ``<name>.up.weight`` and
(optionally) ``<name>.up.bias`` (see :mod:`torch_lowrank.linear` and :mod:`torch_lowrank.conv`),
and the rank is a tensor shape, so the state dict alone says which layers are low-rank and at what
rank. :func:`load_state_dict` reads that, swaps the dense layers of a new model for recovered
low-rank modules of those ranks, and loads: no calibration data, no recovery, no pickled modules.
State dicts hold plain tensors, so ``torch.load(path, weights_only=True)`` and ``safetensors``
read them.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from .activations import BATCHNORMS, FoldedBatchNorm
from .convert import REPLACEMENTS
from .families import adapt
from .linear import LowRankLinear
from .model import module_names, replace_everywhere
from .quantize import is_quantized

__all__ = ["load_state_dict"]


def _low_rank_like(
    dense: nn.Module, state_dict: Mapping[str, Tensor], prefix: str, name: str
) -> nn.Module | None:
    """A recovered low-rank module for ``dense`` shaped by the factors under ``prefix`` in
    ``state_dict``, with the device, dtype, ``requires_grad`` and mode of ``dense`` and its factors
    uninitialised (loading fills them); ``None`` when ``dense`` is no supported layer. A foreign
    layer (GPT-2's ``Conv1D``) goes through its standard form and is remembered for ``merge_``."""
    foreign, dense = dense, adapt(dense)
    kind = next((lr for d, lr in REPLACEMENTS if isinstance(dense, d)), None)
    if kind is None:
        return None
    down = state_dict[f"{prefix}down.weight"]
    groups = getattr(dense, "groups", 1)
    if down.dim() < 1 or down.shape[0] % groups:
        raise ValueError(
            f"load_state_dict: layer {name!r}: down.weight's first dimension must be a multiple "
            f"of groups={groups}\nbut got shape {tuple(down.shape)}"
        )
    rank, bias = down.shape[0] // groups, f"{prefix}up.bias" in state_dict
    weight = dense.weight
    kw = {"device": "meta", "dtype": weight.dtype}
    try:
        if kind is LowRankLinear:
            module = LowRankLinear(dense.in_features, dense.out_features, rank, bias, **kw)
        else:
            module = kind(
                dense.in_channels, dense.out_channels, dense.kernel_size, rank, dense.stride,
                dense.padding, dense.dilation, groups, bias, dense.padding_mode, **kw,
            )  # fmt: skip
    except ValueError as err:
        raise ValueError(f"load_state_dict: layer {name!r}: {err}") from err
    module = module.to_empty(device=weight.device)  # no initialisation: loading fills the factors
    if foreign is not dense:
        module.source_type = type(foreign)
    module.requires_grad_(weight.requires_grad)
    if bias and dense.bias is not None:
        module.up.bias.requires_grad_(dense.bias.requires_grad)
    module.train(foreign.training)
    return module


def load_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    strict: bool = True,
    assign: bool = False,
) -> nn.Module:
    """Load the state dict of a compressed model into a freshly built dense ``model``.

    Every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (or Hugging Face GPT-2 ``Conv1D``) at a
    name ``<name>`` for which ``state_dict`` holds ``<name>.down.weight`` and ``<name>.up.weight``
    is replaced (at every name it is reachable under) by a recovered
    :class:`~torch_lowrank.LowRankLinear` /
    :class:`~torch_lowrank.LowRankConv1d` / :class:`~torch_lowrank.LowRankConv2d` whose rank is
    read from ``down.weight``'s first dimension (divided by ``groups``) and which has a bias when
    ``<name>.up.bias`` is there; it takes the dense layer's device (``meta`` too), dtype,
    ``requires_grad`` and train/eval mode. Then ``model.load_state_dict(state_dict,
    strict=strict, assign=assign)`` loads everything (quantized factors, from
    :func:`~torch_lowrank.quantize_factors_`, with ``assign=True``). Layers that are already
    low-rank are left as they are, so factors of another rank fail with PyTorch's own "size
    mismatch" error. If loading fails, the replaced dense layers are put back.

    Args:
        model: the dense model, e.g. built on the ``meta`` device (then pass ``assign=True``).
        state_dict: the compressed model's ``state_dict()`` (from ``torch.load(...,
            weights_only=True)``, ``safetensors.torch.load_file``, ...).
        strict / assign: as in :meth:`torch.nn.Module.load_state_dict`.

    Returns:
        ``model``, or the new low-rank module when ``model`` itself is a single layer.

    Raises:
        ValueError: a saved rank the layer cannot hold (out of range, not a multiple of groups),
            or quantized (torchao) tensors without ``assign=True``.
        RuntimeError: from :meth:`~torch.nn.Module.load_state_dict` (missing or unexpected keys,
            size mismatches).

    Example:
        >>> import torch, torch_lowrank as tl
        >>> def build():
        ...     return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> compressed = tl.convert(build(), rank=4, exclude="2")
        >>> _ = tl.recover_(compressed, method="svd")
        >>> with torch.device("meta"):
        ...     fresh = build()
        >>> fresh = load_state_dict(fresh, compressed.state_dict(), assign=True)
        >>> type(fresh[0]).__name__, fresh[0].rank, fresh[0].up.weight.device.type
        ('LowRankLinear', 4, 'cpu')
    """
    quantized = sorted(k for k, v in state_dict.items() if is_quantized(v))
    if quantized and not assign:
        raise ValueError(
            "load_state_dict: quantized (torchao) tensors load only with assign=True\n"
            f"but got assign=False for {', '.join(quantized)}"
        )
    names = module_names(model)
    swaps: list[tuple[nn.Module, nn.Module]] = []  # (dense, low-rank or folded BatchNorm)
    for module, where in names.items():
        for name in where:
            prefix = f"{name}." if name else ""
            if f"{prefix}down.weight" in state_dict and f"{prefix}up.weight" in state_dict:
                new = _low_rank_like(module, state_dict, prefix, name)
                if new is not None:
                    swaps.append((module, new))
                break
            if isinstance(module, BATCHNORMS) and f"{prefix}folded" in state_dict:
                swaps.append((module, FoldedBatchNorm.like(module)))
                break
    root = model
    for dense, new in swaps:
        replaced = replace_everywhere(model, names[dense], new)
        root = root if replaced is model else replaced
    try:
        root.load_state_dict(state_dict, strict=strict, assign=assign)
    except BaseException:
        for dense, _ in swaps:
            replace_everywhere(model, [n for n in names[dense] if n], dense)
        raise
    return root
