"""Tests of LowRankConv1d / LowRankConv2d (torch_lowrank/conv.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_lowrank as tl
from torch_lowrank import LowRankConv1d, LowRankConv2d

GEOMETRIES_2D = [
    # (kernel, stride, padding, dilation, padding_mode, input spatial size)
    ((3, 3), 1, 1, 1, "zeros", (9, 9)),
    ((3, 5), 2, (1, 2), 1, "zeros", (11, 8)),
    ((2, 3), 1, "same", 2, "zeros", (7, 10)),
    ((3, 3), 1, "same", 1, "reflect", (6, 7)),
    ((3, 1), (2, 1), 1, (2, 1), "replicate", (13, 5)),
    ((3, 3), 2, 1, 1, "circular", (9, 11)),
    ((1, 1), 1, 0, 1, "zeros", (5, 5)),
    ((4, 4), 3, "valid", 1, "zeros", (10, 13)),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("method", ["linear", "svd"])
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "mode", "size"), GEOMETRIES_2D)
def test_full_rank_conv2d_reproduces_the_conv(
    kernel, stride, padding, dilation, mode, size, method
):
    """At full rank the recovered module equals the conv (rel. 1e-5 in float32), for batch
    sizes 3 and 1 and unbatched input."""
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, kernel, stride, padding, dilation, padding_mode=mode)
    m, n = LowRankConv2d.matrix_shape_of(conv)
    layer = LowRankConv2d.from_conv2d(conv, rank=min(m, n))
    layer(torch.randn(8, 5, *size))
    layer.recover_(method)
    for x in (torch.randn(3, 5, *size), torch.randn(1, 5, *size), torch.randn(5, *size)):
        expected = conv(x)
        got = layer(x)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "mode"),
    [
        (3, 1, 1, 1, "zeros"),
        (5, 2, 2, 1, "reflect"),
        (3, 1, "same", 2, "circular"),
        (4, 3, 0, 1, "zeros"),
    ],
)
def test_full_rank_conv1d_reproduces_the_conv(kernel, stride, padding, dilation, mode):
    torch.manual_seed(1)
    conv = nn.Conv1d(6, 9, kernel, stride, padding, dilation, padding_mode=mode)
    m, n = LowRankConv1d.matrix_shape_of(conv)
    layer = LowRankConv1d.from_conv1d(conv, rank=min(m, n))
    layer(torch.randn(4, 6, 31))
    layer.recover_("linear")
    for x in (torch.randn(2, 6, 17), torch.randn(6, 23)):
        assert rel_err(layer(x), conv(x)) < 1e-5


def reference_patch_moments(conv: nn.Conv2d, x: torch.Tensor):
    """Mean and covariance of the receptive-field patches, straight from one big unfold."""
    pads = []
    for i in (1, 0):
        if conv.padding == "same":
            total = conv.dilation[i] * (conv.kernel_size[i] - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [conv.padding[i]] * 2
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, pads, mode=mode).double()
    cols = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return rows.mean(0), torch.cov(rows.T, correction=0), len(rows)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 700, 1])
@pytest.mark.parametrize(("padding", "mode"), [(1, "zeros"), ("same", "reflect"), (0, "zeros")])
def test_patch_statistics_are_exact_whatever_the_chunking(chunk_elements, padding, mode):
    """Small chunk budgets split the batch and then bands of output rows; the input-space
    statistics stay those of all patches (rel. 1e-10 in float64)."""
    torch.manual_seed(2)
    stride = 1 if padding == "same" else (2, 1)
    conv = nn.Conv2d(3, 4, (3, 2), stride=stride, padding=padding, padding_mode=mode)
    layer = LowRankConv2d.from_conv2d(conv.double(), rank=2)
    layer.stats_space = "input"  # 18-wide patches; the default keeps the 4 outputs
    layer.chunk_elements = chunk_elements
    x = torch.randn(3, 3, 11, 9, dtype=torch.float64)
    layer(x)
    mean, cov, count = reference_patch_moments(conv, x)
    (stats,) = layer.stats
    assert stats.count == count
    torch.testing.assert_close(stats.mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats.covariance, cov, rtol=1e-10, atol=1e-12)


def test_linear_error_on_patches_is_the_eigenvalue_tail_and_beats_svd():
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, padding=1).double()
    x = torch.randn(6, 8, 10, 10, dtype=torch.float64)
    x = torch.einsum("bchw,cd->bdhw", x, torch.randn(8, 8, dtype=torch.float64))  # correlated
    errors = {}
    for method in ("linear", "svd"):
        layer = LowRankConv2d.from_conv2d(copy.deepcopy(conv), rank=4)
        layer(x)
        row = layer.recover_(method)
        with torch.no_grad():
            y = conv(x)
            err = (layer(x) - y).square().sum(1).mean()
            var = (y - y.mean((0, 2, 3), keepdim=True)).square().sum(1).mean()
        errors[method] = row.relative_error
        assert row.relative_error == pytest.approx((err / var).item(), rel=1e-6)
    assert errors["linear"] < errors["svd"]


def test_grouped_conv_is_factored_per_group():
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=2)
    assert LowRankConv2d.matrix_shape_of(conv) == (6, 36)
    layer = LowRankConv2d.from_conv2d(conv, rank=6)  # full rank per group
    layer(torch.randn(4, 8, 7, 7))
    assert len(layer.stats) == 2
    row = layer.recover_("linear")
    assert layer.down.groups == 2 and layer.up.groups == 2
    assert layer.down.weight.shape == (12, 4, 3, 3) and layer.up.weight.shape == (12, 6, 1, 1)
    assert layer.rank == 6 and row.params_after == 2 * 6 * (6 + 36) + 12
    x = torch.randn(2, 8, 7, 7)
    assert rel_err(layer(x), conv(x)) < 1e-5
    torch.testing.assert_close(layer.weight, conv.weight, rtol=1e-4, atol=1e-5)
    assert rel_err(layer.to_conv2d()(x), conv(x)) < 1e-5


def test_depthwise_convs_stay_dense_and_grouped_ones_convert():
    model = nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise
        nn.Conv2d(16, 32, 3, padding=1, groups=4),
        nn.Conv2d(32, 64, 1, groups=16),  # grouped, 4 x 2 per group: saves nothing
    )
    tl.convert(model, ratio=0.5)
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[1], LowRankConv2d)
    tl.calibrate(model, [torch.randn(2, 16, 8, 8)])
    report = tl.recover_(model)
    assert report["0"].method == "dense" and report["0"].note == "depthwise conv stays dense"
    assert report["1"].rank == 3 and report["1"].note == "rank 3 per group, 4 groups"  # 8 x 36
    assert report["2"].method == "dense" and report["2"].note.startswith("ratio=0.5 leaves no rank")


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.layer1 = nn.Sequential(ResBlock(32), ResBlock(32))
        self.down = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.layer2 = ResBlock(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.layer2(F.relu(self.down(self.layer1(self.stem(x)))))
        return self.head(x.mean((2, 3)))


def trained_like(model: nn.Module) -> nn.Module:
    """Give BatchNorm non-trivial running statistics, then switch to eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16))
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resnet_style_cnn_converts_in_one_line_and_recovers_with_each_method(dtype):
    torch.manual_seed(5)
    model = trained_like(TinyResNet()).to(dtype)
    data = [torch.randn(4, 3, 16, 16, dtype=dtype) for _ in range(4)]
    test_x = torch.randn(4, 3, 16, 16, dtype=dtype)
    with torch.no_grad():
        expected = model(test_x)
    errors = {}
    for method in ("svd", "linear"):
        compressed, report = tl.compress(copy.deepcopy(model), data, ratio=0.3, method=method)
        kinds = {type(m).__name__ for m in compressed.modules()}
        assert "LowRankConv2d" in kinds and "LowRankLinear" in kinds
        assert report.params_after < report.params_before
        with torch.no_grad():
            out = compressed(test_x)
        assert out.shape == expected.shape and out.dtype == dtype
        errors[method] = rel_err(out, expected)
    assert errors["linear"] < errors["svd"]


def test_conv1d_sequence_model_converts_and_recovers():
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv1d(1, 32, 9, stride=2, padding=4),
        nn.ReLU(),
        nn.Conv1d(32, 64, 5, padding=2, dilation=1),
        nn.ReLU(),
        nn.Conv1d(64, 64, 3, padding="same", dilation=2, padding_mode="reflect"),
        nn.ReLU(),
    ).eval()
    t = torch.linspace(0, 20, 400)
    data = [
        torch.sin(t * (1 + k / 7)).reshape(1, 1, -1) + 0.05 * torch.randn(1, 1, 400)
        for k in range(8)
    ]
    model, report = tl.compress(model, data, ratio=0.5)
    assert isinstance(model[2], LowRankConv1d) and isinstance(model[4], LowRankConv1d)
    assert report["4"].rank == int(0.5 * 64 * 192 / (64 + 192))
    assert model(data[0]).shape == (1, 64, 200)


def test_state_dict_round_trip_and_errors():
    torch.manual_seed(7)
    layer = LowRankConv2d.from_conv2d(nn.Conv2d(4, 8, 3, padding=1), rank=3, name="enc.conv")
    with pytest.raises(
        ValueError,
        match=r"enc.conv: expected input of shape \(N, 4, \*, \*\)\nbut got shape \(2, 5, 6, 6\)",
    ):
        layer(torch.randn(2, 5, 6, 6))
    layer(torch.randn(2, 4, 6, 6))
    layer.recover_("linear")
    state = layer.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "down.weight": (3, 4, 3, 3),
        "up.weight": (8, 3, 1, 1),
        "up.bias": (8,),
    }
    fresh = LowRankConv2d(4, 8, 3, rank=3, padding=1)
    fresh.load_state_dict(state)
    x = torch.randn(1, 4, 6, 6)
    assert torch.equal(fresh(x), layer(x))
    assert "rank=3" in repr(fresh)
    with pytest.raises(TypeError, match="c: expected an nn.Conv2d\nbut got Conv1d"):
        LowRankConv2d.from_conv2d(nn.Conv1d(2, 2, 1), rank=1, name="c")
    with pytest.raises(ValueError, match="must be divisible by groups"):
        LowRankConv2d(4, 6, 3, rank=1, groups=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_convs_recover_in_their_dtype(dtype):
    torch.manual_seed(8)
    conv = nn.Conv2d(4, 8, 3, padding=1).to(dtype)
    layer = LowRankConv2d.from_conv2d(conv, rank=8)
    layer(torch.randn(4, 4, 8, 8).to(dtype))
    layer.recover_("linear")
    assert layer.down.weight.dtype == dtype
    x = torch.randn(2, 4, 8, 8).to(dtype)
    assert rel_err(layer(x), conv(x)) < 3e-2
