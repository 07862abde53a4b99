"""``LowRankConv1d`` and ``LowRankConv2d``: low-rank drop-in replacements for convolutions.

A conv with weight ``C_out x C_in x kh x kw`` is the matrix ``C_out x (C_in kh kw)`` acting on
every receptive-field patch (``docs/methods.md``), so every output position is one sample row. The
recovered module is a ``C_in -> r`` conv with the original kernel size, stride, padding, padding
mode and dilation, followed by a ``1 x 1`` conv ``r -> C_out`` with the bias.

A grouped conv is ``groups`` independent matrices ``(C_out/g) x (C_in/g kh kw)``; each group is
factored separately at the same rank ``r`` and the two factor convs keep ``groups=g``. A
depthwise conv (one input channel per group) has matrices of rank 1 at most, saves nothing and
stays dense.

State dict of a recovered ``LowRankConv2d`` (the rank is ``down.weight.shape[0] // groups``)::

    down.weight  (g r, C_in / g, kh, kw)
    up.weight    (C_out, r, 1, 1)
    up.bias      (C_out,)               only when the layer has a bias

Calibration memory: patches are extracted with ``unfold`` in chunks of at most
:attr:`_LowRankConv.chunk_elements` elements (``2**24``, 64 MiB in float32), splitting the batch
and, for very large maps, bands of output rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import solvers
from .base import LowRankModule
from .linear import new_parameter
from .patches import out_size, patch_rows, patches_at
from .ranks import target_rank

__all__ = ["LowRankConv1d", "LowRankConv2d"]


def _pair(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


class _LowRankConv(LowRankModule):
    """The shared body of :class:`LowRankConv1d` and :class:`LowRankConv2d`."""

    _dims: int
    _dense_type: type
    #: Largest number of patch elements unfolded at once during calibration.
    chunk_elements: int = 1 << 24

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._set_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode
        )
        target_rank(self.matrix_shape, rank, None, None, type(self).__name__)
        self._start_recovered(rank, bias)
        conv, kw = self._dense_type, {"device": device, "dtype": dtype}
        self.down = conv(
            in_channels, groups * rank, self.kernel_size, self.stride, self.padding,
            self.dilation, groups, bias=False, padding_mode=padding_mode, **kw,
        )  # fmt: skip
        self.up = conv(groups * rank, out_channels, 1, groups=groups, bias=bias, **kw)

    @classmethod
    def matrix_shape_of(cls, conv: nn.Module) -> tuple[int, int]:
        """One group's weight of ``conv`` as a matrix ``(C_out/g, C_in/g * prod(kernel))``."""
        g = conv.groups
        return conv.out_channels // g, conv.in_channels // g * math.prod(conv.kernel_size)

    @classmethod
    def describe(cls, conv: nn.Module) -> str:
        """The weight as messages name it: its real shape and the matrix it is."""
        m, n = cls.matrix_shape_of(conv)
        per_group = " per group" if conv.groups > 1 else ""
        return f"{tuple(conv.weight.shape)} weight ({m} x {n} as a matrix{per_group})"

    def _set_geometry(
        self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, mode
    ) -> None:
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{type(self).__name__}: in_channels and out_channels must be divisible by "
                f"groups\nbut got {in_channels}, {out_channels} and groups={groups}"
            )
        d = self._dims
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, d)
        self.stride = _pair(stride, d)
        self.padding = padding if isinstance(padding, str) else _pair(padding, d)
        self.dilation = _pair(dilation, d)
        self.groups = groups
        self.padding_mode = mode

    @classmethod
    def _shell(cls, conv: nn.Module) -> _LowRankConv:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._set_geometry(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.padding_mode,
        )  # fmt: skip
        return module

    @property
    def matrix_shape(self) -> tuple[int, int]:
        g = self.groups
        return self.out_channels // g, self.in_channels // g * math.prod(self.kernel_size)

    def _shape_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1,) * self._dims:
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return text

    # -- calibration: patches as rows ---------------------------------------------------------
    def count_inputs(self, x: Tensor) -> int:
        return x.shape[0] if x.dim() == self._dims + 2 else 1

    def _explicit_padding(self) -> list[int]:
        """``F.pad`` amounts for the spatial dims, last dim first, as the conv itself pads."""
        pads: list[int] = []
        for i in reversed(range(self._dims)):
            if self.padding == "same":
                total = self.dilation[i] * (self.kernel_size[i] - 1)
                pads += [total // 2, total - total // 2]
            elif self.padding == "valid":
                pads += [0, 0]
            else:
                pads += [self.padding[i], self.padding[i]]
        return pads

    def check_input(self, x: Tensor) -> None:
        d = self._dims
        if x.dim() not in (d + 1, d + 2) or x.shape[-d - 1] != self.in_channels:
            raise ValueError(
                f"{self.layer_name}: expected input of shape (N, {self.in_channels}, "
                f"{', '.join('*' * d)})\nbut got shape {tuple(x.shape)}"
            )

    def _padded(self, x: Tensor) -> tuple[Tensor, tuple, tuple, tuple]:
        """``x`` as the conv sees it: batched, padded, 2d; with kernel, stride and dilation."""
        d = self._dims
        if x.dim() == d + 1:
            x = x.unsqueeze(0)  # unbatched input
        pads = self._explicit_padding()
        if any(pads):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, pads, mode=mode)
        kernel, stride, dilation = self.kernel_size, self.stride, self.dilation
        if d == 1:  # a 1d conv is a 2d conv over a map of height 1
            x = x.unsqueeze(2)
            kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
        return x, kernel, stride, dilation

    def input_rows(self, x: Tensor) -> Iterator[Tensor]:
        self.check_input(x)
        return patch_rows(*self._padded(x), self.chunk_elements)

    def paired_rows(
        self, x: Tensor, x_tilde: Tensor, positions: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The patch rows of two inputs of one shape (what the original and the compressed
        network feed the layer) at the same output positions, in chunks: every position, or
        with ``positions`` a uniform sample of that many per image (an image with no more
        keeps all of its own), chosen on the device: the ``topk`` of random keys, no sync.

        Example:
            >>> layer = LowRankConv2d.from_conv2d(nn.Conv2d(2, 4, 3), rank=1)
            >>> x = torch.randn(5, 2, 10, 10)  # 64 positions per image
            >>> [tuple(a.shape) for a, _ in layer.paired_rows(x, x, positions=16)]
            [(80, 18)]
            >>> [tuple(a.shape) for a, _ in layer.paired_rows(x, x)]
            [(320, 18)]
        """
        self.check_input(x)
        self.check_input(x_tilde)
        (x, kernel, stride, dilation), x_t = self._padded(x), self._padded(x_tilde)[0]
        per_image = math.prod(out_size(x, kernel, stride, dilation))
        if positions is None or per_image <= positions:
            budget = self.chunk_elements
            yield from zip(*(patch_rows(p, kernel, stride, dilation, budget) for p in (x, x_t)))
            return
        keys = torch.rand(x.shape[0], per_image, device=x.device)
        chosen = keys.topk(positions, dim=1, sorted=False).indices.sort(dim=1).values
        index = (chosen + per_image * torch.arange(x.shape[0], device=x.device)[:, None]).flatten()
        step = max(1, self.chunk_elements // (x.shape[1] * math.prod(kernel)))  # rows a chunk
        for part in index.split(step):
            yield tuple(patches_at(p, part, kernel, stride, dilation) for p in (x, x_t))

    def offer_samples(self, x: Tensor, reservoirs: list) -> None:
        """Offer every output position to the reservoirs, and build the patches of only the
        positions that can enter (at most ``samples`` per batch): no ``unfold`` of the map."""
        padded, kernel, stride, dilation = self._padded(x)
        count = padded.shape[0] * math.prod(out_size(padded, kernel, stride, dilation))
        if count == 0:
            return

        def pick(index: Tensor | None, channels: Tensor) -> Tensor:
            if index is None:  # every position can enter
                index = torch.arange(count, device=padded.device)
            return patches_at(channels, index, kernel, stride, dilation)

        # each group's reservoir builds its patches from that group's channels only
        for reservoir, channels in zip(reservoirs, padded.chunk(self.groups, dim=1)):
            reservoir.offer(count, lambda index, c=channels: pick(index, c))

    def output_rows(self, y: Tensor) -> Tensor:
        if y.dim() == self._dims + 1:
            y = y.unsqueeze(0)  # unbatched input
        return y.movedim(1, -1)  # (B, *positions, C_out), a view

    def matrices(self) -> list[tuple[Tensor, Tensor | None]]:
        m, n = self.matrix_shape
        weight = self.dense.weight.reshape(self.groups, m, n)
        bias = self.dense.bias
        return [
            (weight[j], None if bias is None else bias[j * m : (j + 1) * m])
            for j in range(self.groups)
        ]

    @torch.no_grad()
    def factor_layers(self, factors: list[solvers.Factors]) -> tuple[nn.Module, nn.Module]:
        r = factors[0].rank
        like = self.dense.weight
        d, g = self._dims, self.groups
        down = self._dense_type(
            self.in_channels, g * r, self.kernel_size, self.stride, self.padding, self.dilation,
            g, bias=False, padding_mode=self.padding_mode, device="meta",
        )  # fmt: skip
        has_bias = factors[0].bias is not None
        up = self._dense_type(g * r, self.out_channels, 1, groups=g, bias=has_bias, device="meta")
        down_w = torch.cat([f.down for f in factors])  # (g r, C_in/g * prod(k))
        up_w = torch.cat([f.up for f in factors])  # (C_out, r)
        down.weight = new_parameter(
            down_w.reshape(g * r, -1, *self.kernel_size), like, self.factor_device
        )
        up.weight = new_parameter(
            up_w.reshape(self.out_channels, r, *(1,) * d), like, self.factor_device
        )
        if has_bias:
            bias = torch.cat([f.bias for f in factors])
            up.bias = new_parameter(
                bias, like if self.dense.bias is None else self.dense.bias, self.factor_device
            )
        return down, up

    # -- dense views ---------------------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The dense weight ``(C_out, C_in/g, *kernel)``: the original while calibrating, else
        the product of the factors (computed on every read)."""
        if self.calibrating:
            return self.dense.weight
        g, r = self.groups, self.rank
        m, n = self.matrix_shape
        up = self.up.weight.reshape(g, m, r)
        down = self.down.weight.reshape(g, r, n)
        return torch.bmm(up, down).reshape(self.out_channels, -1, *self.kernel_size)

    @property
    def bias(self) -> Tensor | None:
        """The bias ``(C_out,)`` or ``None``."""
        return self.dense.bias if self.calibrating else self.up.bias

    def to_dense(self) -> nn.Module:
        """The equivalent dense conv: while calibrating the original layer itself, once
        recovered a new one holding the product of the factors (same device and dtype)."""
        if self.calibrating:
            return self.dense
        dense = self._dense_type(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, bias=self.up.bias is not None,
            padding_mode=self.padding_mode, device="meta",
        )  # fmt: skip
        with torch.no_grad():
            dense.weight = new_parameter(self.weight, self.up.weight)
            if self.up.bias is not None:
                dense.bias = new_parameter(self.up.bias, self.up.bias)
        return dense


class LowRankConv2d(_LowRankConv):
    r"""A low-rank drop-in replacement for :class:`torch.nn.Conv2d`: ``y = up(down(x))``.

    ``down`` is a ``C_in -> groups * r`` conv with the original kernel size, stride, padding,
    padding mode, dilation and groups; ``up`` a ``1 x 1`` conv ``groups * r -> C_out`` with the
    bias. The constructor takes ``nn.Conv2d``'s arguments plus ``rank`` (per group) and builds a
    recovered module with freshly initialised factors.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)` or :math:`(C_{in}, H, W)`; output as the dense conv's.

    Example:
        >>> conv = nn.Conv2d(16, 32, 3, padding=1)
        >>> layer = LowRankConv2d.from_conv2d(conv, rank=4)
        >>> _ = layer(torch.randn(2, 16, 8, 8))  # calibration: 2 * 8 * 8 = 128 patches
        >>> _ = layer.recover_("linear")
        >>> layer(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 8, 8])
    """

    _dims = 2
    _dense_type = nn.Conv2d

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, **kwargs) -> LowRankConv2d:
        """Wrap a trained ``nn.Conv2d`` in a calibrating ``LowRankConv2d``.

        Takes the keyword arguments of :meth:`LowRankLinear.from_linear` (``rank`` / ``ratio`` /
        ``energy``, ``add_bias``, ``name``); ``rank`` is per group and ``ratio`` the fraction of
        the weight parameters kept.

        Example:
            >>> layer = LowRankConv2d.from_conv2d(nn.Conv2d(8, 8, 3), ratio=0.5)
            >>> layer.rank  # floor(0.5 * 8 * 72 / (8 + 72))
            3
        """
        return cls.from_dense(conv, **kwargs)

    def to_conv2d(self) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d`` (see :meth:`to_dense`).

        Example:
            >>> layer = LowRankConv2d(4, 6, 3, rank=2, padding=1)
            >>> x = torch.randn(1, 4, 5, 5)
            >>> torch.allclose(layer.to_conv2d()(x), layer(x), atol=1e-5)
            True
        """
        return self.to_dense()


class LowRankConv1d(_LowRankConv):
    r"""A low-rank drop-in replacement for :class:`torch.nn.Conv1d` (see :class:`LowRankConv2d`).

    Shape:
        - Input: :math:`(N, C_{in}, L)` or :math:`(C_{in}, L)`; output as the dense conv's.

    Example:
        >>> conv = nn.Conv1d(16, 32, 5, padding=2)
        >>> layer = LowRankConv1d.from_conv1d(conv, rank=4)
        >>> _ = layer(torch.randn(2, 16, 50))
        >>> _ = layer.recover_("linear")
        >>> layer(torch.randn(2, 16, 50)).shape
        torch.Size([2, 32, 50])
    """

    _dims = 1
    _dense_type = nn.Conv1d

    @classmethod
    def from_conv1d(cls, conv: nn.Conv1d, **kwargs) -> LowRankConv1d:
        """Wrap a trained ``nn.Conv1d`` in a calibrating ``LowRankConv1d`` (keyword arguments
        as :meth:`LowRankConv2d.from_conv2d`).

        Example:
            >>> LowRankConv1d.from_conv1d(nn.Conv1d(8, 8, 3), rank=2).calibrating
            True
        """
        return cls.from_dense(conv, **kwargs)

    def to_conv1d(self) -> nn.Conv1d:
        """The equivalent ``nn.Conv1d`` (see :meth:`to_dense`).

        Example:
            >>> layer = LowRankConv1d(4, 6, 3, rank=2)
            >>> x = torch.randn(2, 4, 9)
            >>> torch.allclose(layer.to_conv1d()(x), layer(x), atol=1e-5)
            True
        """
        return self.to_dense()
