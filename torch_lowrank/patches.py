"""How a convolution's input becomes sample rows: receptive-field patches.

A conv with weight ``C_out x C_in x kh x kw`` is the matrix ``C_out x (C_in kh kw)`` acting on
every patch, so every output position is one sample row laid out like ``F.unfold``'s. A 1-d conv
is a 2-d conv over a map of height 1. Patches are built in memory-bounded chunks
(:func:`patch_rows`), or only at chosen output positions (:func:`patches_at`, for a reservoir
that keeps a few of millions of positions).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["out_size", "patch_rows", "patches_at"]


def out_size(x: Tensor, kernel: tuple, stride: tuple, dilation: tuple) -> tuple[int, int]:
    """The output size ``(h_out, w_out)`` of a conv over a padded ``(B, C, H, W)`` input
    (zero or negative: no position).

    Example:
        >>> out_size(torch.zeros(1, 3, 8, 9), kernel=(3, 3), stride=(2, 1), dilation=(1, 2))
        (3, 5)
    """
    H, W = x.shape[2:]
    h_out = (H - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    w_out = (W - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return max(h_out, 0), max(w_out, 0)


def patches_at(x: Tensor, index: Tensor, kernel: tuple, stride: tuple, dilation: tuple) -> Tensor:
    """The patches of a padded ``(B, C, H, W)`` input at flat output positions ``index``
    (``image * h_out * w_out + row * w_out + col``, the order of :func:`patch_rows`), as rows
    ``(len(index), C kh kw)`` laid out like ``unfold``'s.

    Example:
        >>> x = torch.randn(2, 3, 5, 5)  # a 3x3 kernel: 3 x 3 positions per image
        >>> rows = patches_at(x, torch.tensor([0, 10]), (3, 3), (1, 1), (1, 1))
        >>> every = F.unfold(x, 3).transpose(1, 2).reshape(-1, 27)  # all 18 positions
        >>> rows.shape, torch.equal(rows, every[[0, 10]])
        (torch.Size([2, 27]), True)
    """
    B, C = x.shape[:2]
    h_out, w_out = out_size(x, kernel, stride, dilation)
    image, place = index // (h_out * w_out), index % (h_out * w_out)
    top = (place // w_out) * stride[0]
    left = (place % w_out) * stride[1]
    rows = top[:, None] + dilation[0] * torch.arange(kernel[0], device=x.device)  # (k, kh)
    cols = left[:, None] + dilation[1] * torch.arange(kernel[1], device=x.device)  # (k, kw)
    patches = x[image[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (k, kh, kw, C)
    return patches.permute(0, 3, 1, 2).reshape(index.shape[0], C * kernel[0] * kernel[1])


def patch_rows(
    x: Tensor, kernel: tuple, stride: tuple, dilation: tuple, budget: int
) -> Iterator[Tensor]:
    """Receptive-field patches of a padded ``(B, C, H, W)`` input as rows ``(N, C kh kw)``, in
    chunks of at most ``budget`` elements (at least one output row of one image).

    Example:
        >>> x = torch.randn(2, 3, 5, 5)
        >>> chunks = list(patch_rows(x, (3, 3), (1, 1), (1, 1), budget=300))  # an image a chunk
        >>> [tuple(chunk.shape) for chunk in chunks]
        [(9, 27), (9, 27)]
        >>> torch.equal(torch.cat(chunks), F.unfold(x, 3).transpose(1, 2).reshape(-1, 27))
        True
    """
    B, C, H, W = x.shape
    n = C * kernel[0] * kernel[1]
    h_out, w_out = out_size(x, kernel, stride, dilation)
    if h_out <= 0 or w_out <= 0:
        return

    def rows(part: Tensor) -> Tensor:
        cols = F.unfold(part, kernel, dilation=dilation, stride=stride)  # (b, n, L)
        return cols.transpose(1, 2).reshape(-1, n)

    per_image = h_out * w_out * n
    if per_image <= budget:
        images = max(1, budget // per_image)
        for start in range(0, B, images):
            yield rows(x[start : start + images])
        return
    band = max(1, budget // (w_out * n))  # output rows per chunk
    span = dilation[0] * (kernel[0] - 1) + 1
    for image in range(B):
        for top in range(0, h_out, band):
            bottom = min(h_out, top + band)
            strip = x[image : image + 1, :, top * stride[0] : (bottom - 1) * stride[0] + span]
            yield rows(strip)
