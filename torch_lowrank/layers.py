"""Parameters of the layers the library builds (factor layers, merged dense layers): in the
dtype, on the device and with the ``requires_grad`` of the layer they come from."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["new_parameter"]


def new_parameter(value: Tensor, like: Tensor, device: torch.device | None = None) -> nn.Parameter:
    """``value`` as a parameter with the dtype, device and ``requires_grad`` of ``like``
    (on ``device`` instead, when given).

    Example:
        >>> like = nn.Parameter(torch.zeros(2, dtype=torch.float16), requires_grad=False)
        >>> p = new_parameter(torch.ones(2, dtype=torch.float64), like)
        >>> p.dtype, p.requires_grad
        (torch.float16, False)
    """
    return nn.Parameter(
        value.detach().to(device=device or like.device, dtype=like.dtype).contiguous(),
        requires_grad=like.requires_grad,
    )
