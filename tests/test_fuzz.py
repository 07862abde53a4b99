"""Property-based fuzzing of the whole pipeline on random small architectures.

convert -> calibrate -> recover (every method, parallel and corrective) must never crash on a
valid model, must keep every output's shape and dtype, and must keep outputs finite. CI runs a
few dozen examples; a long run is
``TORCH_LOWRANK_FUZZ_EXAMPLES=3000 python -m pytest tests/test_fuzz.py``.
"""

import os
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torch_lowrank as tl

ACTIVATIONS = [nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.LeakyReLU, nn.ReLU6, None]


class Residual(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


class Stack(nn.Module):
    """Layers kept in a ModuleList and applied in order."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@st.composite
def linear_models(draw):
    width = draw(st.integers(2, 24))
    first = width
    blocks = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["linear", "residual", "nested"]))
        act = draw(st.sampled_from(ACTIVATIONS))
        if kind == "linear":
            out = draw(st.integers(1, 24))
            layer = [nn.Linear(width, out, bias=draw(st.booleans()))]
            width = out
        else:
            layer = [nn.Linear(width, width), *([act()] if act else []), nn.Linear(width, width)]
            layer = [Residual(nn.Sequential(*layer))] if kind == "residual" else [Stack(layer)]
        blocks += layer + ([act()] if act and kind == "linear" else [])
    extra = draw(st.sampled_from([(), (3,), (2, 5)]))  # leading token dimensions
    return nn.Sequential(*blocks), (*extra, first)


@st.composite
def setups(draw):
    if draw(st.booleans()):
        model, shape = draw(linear_models())
    else:
        dims = draw(st.sampled_from([1, 2]))
        model, shape = draw(conv_models_fixed(dims))
    spec = draw(
        st.one_of(
            st.builds(lambda r: {"rank": r}, st.integers(1, 6)),
            st.builds(lambda r: {"ratio": r}, st.floats(0.05, 1.0)),
            st.builds(lambda e: {"energy": e}, st.floats(0.3, 1.0)),
        )
    )
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    method = draw(st.sampled_from(["linear", "svd", "relu"]))
    corrective = draw(st.booleans())
    batches = draw(st.integers(1, 3))
    batch = draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if "ratio" in spec and draw(st.booleans()):
        spec["allocation"] = "global"
    return model, shape, spec, dtype, method, corrective, batches, batch, scale


@st.composite
def conv_models_fixed(draw, dims):
    conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
    channels = draw(st.integers(1, 8))
    size = draw(st.integers(7, 12))
    shape = (channels, *(size,) * dims)
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        groups = 2 if channels % 2 == 0 and draw(st.booleans()) else 1
        out = groups * draw(st.integers(1, 6))
        kernel = draw(st.integers(1, 3))
        stride = draw(st.integers(1, 2))
        padding = draw(st.sampled_from([0, 1, "same"])) if stride == 1 else draw(st.integers(0, 1))
        mode = "zeros" if padding == 0 else draw(st.sampled_from(["zeros", "reflect", "circular"]))
        layer = conv(channels, out, kernel, stride, padding, groups=groups, padding_mode=mode)
        with torch.no_grad():
            size = layer(torch.zeros(1, channels, *(size,) * dims)).shape[-1]
        layers.append(layer)
        channels = out
        if draw(st.booleans()):
            layers.append(bn(channels))
        act = draw(st.sampled_from(ACTIVATIONS))
        if act:
            layers.append(act())
        if size < 3:
            break
    return nn.Sequential(*layers), shape


@settings(
    max_examples=int(os.environ.get("TORCH_LOWRANK_FUZZ_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(setups(), st.integers(0, 2**16))
def test_random_models_compress_without_crashing(setup, seed):
    model, shape, spec, dtype, method, corrective, n_batches, batch, scale = setup
    torch.manual_seed(seed)
    model = model.to(dtype).eval()
    with torch.no_grad():
        for module in model.modules():  # trained-looking BatchNorm statistics
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.running_var.uniform_(0.5, 2.0)
                module.running_mean.uniform_(-1.0, 1.0)
    data = [scale * torch.randn(batch, *shape, dtype=dtype) for _ in range(n_batches)]
    with torch.no_grad():
        expected = model(data[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "no calibrating low-rank module" on tiny models
        try:
            compressed, report = tl.compress(
                model,
                data,
                method=method,
                corrective=corrective,
                options={"max_iter": 10} if method == "relu" else None,
                progress=False,
                **spec,
            )
        except ValueError as err:  # the one documented refusal: a global budget below rank 1
            assert "below what the smallest ranks already keep" in str(err)
            assert spec.get("allocation") == "global"
            return
    with torch.no_grad():
        out = compressed(data[0])
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert torch.isfinite(out).all()
    for module in compressed.modules():
        if isinstance(module, (tl.LowRankLinear, tl.LowRankConv1d, tl.LowRankConv2d)):
            assert not module.calibrating and module.stats is None
            assert module.saves_parameters(module.rank)  # no layer kept that saves nothing
            assert report[module.layer_name].rank == module.rank
