"""Quantized weights on disk: byte counts, and state dicts for ``safetensors``.

A weight quantized by :func:`~torch_lowrank.quantize_factors_` is a torchao tensor subclass
holding plain tensors (``qdata``, ``scale``, ``zero_point``) and a few attributes.
``torch.save`` / ``torch.load(..., weights_only=True)`` keep it as it is; ``safetensors`` stores
plain tensors only, so :func:`flatten_state_dict` splits each quantized tensor into its plain
tensors plus JSON metadata (torchao's safetensors support) and :func:`unflatten_state_dict`
rebuilds it. A state dict with quantized tensors loads into a freshly built model with
``assign=True`` (:func:`~torch_lowrank.load_state_dict` too).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from .quantize import is_quantized, require_torchao

__all__ = ["flatten_state_dict", "unflatten_state_dict", "weight_bytes"]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of ``model``, a quantized weight counted by the
    tensors it stores (weights, scales, zero points).

    Example:
        >>> weight_bytes(nn.Linear(4, 2))  # 8 + 2 float32 numbers
        40
    """
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if is_quantized(tensor):
            names, _ = tensor.__tensor_flatten__()
            total += sum(getattr(tensor, n).nbytes for n in names)
        else:
            total += tensor.nbytes
    return total


def flatten_state_dict(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
    """A state dict holding quantized tensors as plain tensors plus string metadata, the form
    ``safetensors.torch.save_file(tensors, path, metadata=metadata)`` takes (torchao's
    safetensors support; plain tensors pass through under their own names).

    Example:
        >>> tensors, metadata = flatten_state_dict(nn.Sequential(nn.Linear(2, 2)).state_dict())
        >>> sorted(tensors), sorted(metadata)
        (['0.bias', '0.weight'], ['0.bias', '0.weight', 'tensor_names'])
    """
    support = require_torchao("prototype.safetensors.safetensors_support")
    return support.flatten_tensor_state_dict(dict(state_dict))


def unflatten_state_dict(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict:
    """The inverse of :func:`flatten_state_dict`: the state dict with its quantized tensors
    rebuilt (load it with ``assign=True``). Metadata that :func:`flatten_state_dict` did not
    write (no ``tensor_names``: a file of plain tensors) gives ``tensors`` back as they are,
    without importing torchao.

    Example:
        >>> import torch
        >>> sd = nn.Sequential(nn.Linear(2, 2)).state_dict()
        >>> back = unflatten_state_dict(*flatten_state_dict(sd))
        >>> all(torch.equal(back[k], sd[k]) for k in sd)
        True
    """
    if "tensor_names" not in (metadata or {}):
        return dict(tensors)
    support = require_torchao("prototype.safetensors.safetensors_support")
    result, leftover = support.unflatten_tensor_state_dict(dict(tensors), dict(metadata))
    if leftover:
        raise ValueError(
            f"unflatten_state_dict: tensors the metadata does not name\nbut got {sorted(leftover)}"
        )
    return result
