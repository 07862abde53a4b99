"""Quantized factors (torchao): which layers are quantized, how accurately, errors, saving and
loading, and the byte budget that chooses between rank and precision."""

import io
import itertools
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_lowrank as tl
from torch_lowrank.allocation import LayerBudget, QuantizedError
from torch_lowrank.bytes_budget import Choice, allocate_bytes, bytes_total, quantization_error
from torch_lowrank.quantize import SCHEMES, available_schemes, quantization_of, quantize_layers_
from torch_lowrank.quantized_state import flatten_state_dict, unflatten_state_dict, weight_bytes

pytest.importorskip("torchao")
pytestmark = pytest.mark.usefixtures("single_thread")

#: Output signal-to-noise ratio (dB) a quantized model keeps against its float self, per
#: scheme: int8 rounding noise is ~1e-4 of the signal at worst (~40 dB), float8 e4m3 ~30 dB.
MIN_SNR = {"int8": 35.0, "int8-dynamic": 30.0, "float8": 24.0}


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def batches(seed=1, n=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(256, 64, generator=gen) for _ in range(n)]


def compressed(seed=0):
    model, _ = tl.compress(mlp(seed), batches(), rank=16, method="linear", progress=False)
    return model


def snr_db(ref, out):
    return float(10 * torch.log10(ref.square().sum() / (ref - out).square().sum()))


@pytest.mark.parametrize("scheme", sorted(MIN_SNR))
def test_factor_layers_are_quantized_and_accurate(scheme):
    model = compressed()
    x = batches(seed=5, n=1)[0]
    with torch.no_grad():
        ref = model(x)
        head = model[4].weight
        tl.quantize_factors_(model, scheme)
        out = model(x)
    assert quantization_of(model) == {f"{i}.{p}": scheme for i in (0, 2) for p in ("down", "up")}
    assert model[4].weight is head  # the head (excluded from conversion) stays float
    assert snr_db(ref, out) >= MIN_SNR[scheme]


def test_dense_linears_on_request():
    model = compressed()
    tl.quantize_factors_(model, "int8", dense="4")
    assert set(quantization_of(model)) == {"0.down", "0.up", "2.down", "2.up", "4"}
    alone = tl.quantize_factors_(mlp(), "int8", dense=True)  # int8 alone: the same call
    assert quantization_of(alone) == {"0": "int8", "2": "int8", "4": "int8"}


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 16, 64)
        self.out = nn.Linear(64, 4)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def test_conv_factors_stay_float():
    data = [torch.randn(16, 8, 4, 4)]
    model, _ = tl.compress(SmallCNN(), data, rank=4, method="linear", progress=False)
    conv_down = model.conv.down.weight
    tl.quantize_factors_(model, "int8")
    assert quantization_of(model) == {"fc.down": "int8", "fc.up": "int8"}
    assert model.conv.down.weight is conv_down
    only_convs, _ = tl.compress(
        nn.Sequential(nn.Conv2d(8, 32, 3)), data, rank=4, method="linear", progress=False
    )
    with pytest.raises(ValueError, match=r"no Linear layer to quantize \(2 conv factor layers"):
        tl.quantize_factors_(only_convs, "int8")


def test_bad_input_is_refused_and_changes_nothing():
    model = compressed()
    with pytest.raises(
        ValueError, match="scheme must be one of int8, int8-dynamic.*\nbut got 'int3'"
    ):
        tl.quantize_factors_(model, "int3")
    with pytest.raises(ValueError, match="dense must be a bool"):
        tl.quantize_factors_(model, "int8", dense=3)
    quantize_layers_(model, {model[2].up: "2.up"}, "int8", "test")
    before = {name: p for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="layer '2.up' is already quantized \\(int8\\)"):
        tl.quantize_factors_(model, "int8")
    assert {name: p for name, p in model.named_parameters()} == before  # same objects
    calibrating = tl.convert(mlp(), rank=8)
    with pytest.raises(ValueError, match="layer '0' is still calibrating"):
        tl.quantize_factors_(calibrating, "int8")


def test_a_scheme_that_does_not_run_here_names_scheme_device_and_the_ones_that_do():
    missing = [s for s in SCHEMES if s not in available_schemes("cpu")]
    if not missing:
        pytest.skip("every scheme runs on this CPU")
    with pytest.raises(ValueError, match=f"scheme '{missing[0]}' does not run on cpu") as err:
        tl.quantize_factors_(compressed(), missing[0])
    assert "schemes that run there: int8, int8-dynamic" in str(err.value)


def test_missing_torchao_is_an_import_error_with_the_install_hint(monkeypatch):
    for name in [n for n in sys.modules if n == "torchao" or n.startswith("torchao.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'torch_lowrank\[quant\]'"):
        tl.quantize_factors_(compressed(), "int8")
    with pytest.raises(ImportError, match="torchao"):
        tl.convert(mlp(), ratio=0.5, allocation="global", budget="bytes")


def test_importing_the_library_does_not_import_torchao():
    code = "import sys, torch_lowrank; print('torchao' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic"])
def test_save_and_load_keep_the_quantized_outputs(scheme):
    model = tl.quantize_factors_(compressed(), scheme)
    x = batches(seed=5, n=1)[0]
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    with pytest.raises(ValueError, match="load only with assign=True"):
        tl.load_state_dict(mlp(seed=3), state)
    loaded = tl.load_state_dict(mlp(seed=3), state, assign=True)
    assert quantization_of(loaded) == quantization_of(model)
    assert torch.equal(loaded(x), model(x))
    pytest.importorskip("safetensors")
    from safetensors.torch import load, save

    tensors, metadata = flatten_state_dict(model.state_dict())
    back = unflatten_state_dict(load(save(tensors, metadata=metadata)), metadata)
    again = tl.load_state_dict(mlp(seed=3), back, assign=True)
    assert torch.equal(again(x), model(x))
    plain = compressed().state_dict()  # a file of plain tensors passes through
    assert unflatten_state_dict(plain, {"format": "pt"}).keys() == plain.keys()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic", "float8"])
def test_byte_counts_match_what_torchao_stores(scheme, dtype):
    layer = nn.Sequential(nn.Linear(96, 40, bias=False, dtype=dtype))
    quantize_layers_(layer, {layer[0]: "0"}, scheme, "test")
    assert weight_bytes(layer) == SCHEMES[scheme].nbytes(40, 96)


@pytest.mark.parametrize(("m", "n", "rank"), [(64, 48, 6), (48, 96, 12), (96, 96, 40)])
def test_predicted_quantization_error_matches_the_measured_one(m, n, rank):
    """The noise model (docs/quantization.md) against torchao's int8 on the `linear` factors
    and on the dense weight: within a factor 1.5 (it came out 0.8-1.0 when written)."""
    torch.manual_seed(m + n)
    dense = nn.Linear(n, m)
    x = (torch.randn(4096, n) * torch.linspace(2.0, 0.1, n)) + 0.3
    layer = tl.LowRankLinear.from_linear(dense, rank=rank)
    layer(x)
    predicted = quantization_error(layer.problem(samples=False))
    layer.recover_("linear")
    with torch.no_grad():
        before, dense_before = layer(x), dense(x)
        quantize_layers_(layer, {layer.down: "down", layer.up: "up"}, "int8", "test")
        quantize_layers_(nn.Sequential(dense), {dense: "d"}, "int8", "test")
        measured = (layer(x) - before).square().sum(1).mean()
        measured_dense = (dense(x) - dense_before).square().sum(1).mean()
    assert 1 / 1.5 <= float(predicted.factors[rank - 1] / measured) <= 1.5
    assert 1 / 1.5 <= predicted.dense / float(measured_dense) <= 1.5


# -- byte budgets --------------------------------------------------------------------------------


@st.composite
def byte_layers(draw, max_layers=3, max_size=6):
    layers = []
    for i in range(draw(st.integers(1, max_layers))):
        m, n = draw(st.integers(2, max_size)), draw(st.integers(2, max_size))
        k = min(m, n)
        values = sorted(draw(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k)), reverse=True)
        spectrum = torch.tensor(values, dtype=torch.float64) + 1e-3
        noise = torch.tensor(
            draw(st.lists(st.floats(1e-6, 0.05), min_size=k, max_size=k)), dtype=torch.float64
        ).cumsum(0)  # quantization always adds some error, more with more rank
        quantized = QuantizedError(noise, draw(st.floats(1e-6, 0.05)))
        scheme = SCHEMES["int8"] if draw(st.booleans()) else None
        layers.append(LayerBudget(f"l{i}", (m, n), spectrum, scheme=scheme, quantized=quantized))
    return layers


def total_error(layers, choices):
    error = 0.0
    for layer in layers:
        choice, total = choices[layer.name], float(layer.spectrum.sum())
        if choice.rank is None:
            noise = layer.quantized.dense if choice.quantized else 0.0
        else:
            noise = float(layer.spectrum[choice.rank :].sum())
            noise += float(layer.quantized.factors[choice.rank - 1]) if choice.quantized else 0.0
        error += noise / total
    return error


def every_choice(layer):
    ranks = [*range(1, layer.largest_saving_rank + 1), None]
    precisions = [False, True] if layer.scheme is not None else [False]
    return [Choice(r, q) for r in ranks for q in precisions]


@settings(max_examples=60, deadline=None)
@given(byte_layers(), st.floats(0.05, 1.0))
def test_byte_budget_holds_and_is_near_the_brute_force_optimum(layers, ratio):
    allowed = ratio * sum(4 * layer.shape[0] * layer.shape[1] for layer in layers)
    try:
        choices = allocate_bytes(layers, ratio)
    except ValueError:
        return
    assert bytes_total(choices, layers) <= allowed * (1 + 1e-9)
    best = min(
        total_error(layers, dict(zip([x.name for x in layers], combo)))
        for combo in itertools.product(*(every_choice(x) for x in layers))
        if bytes_total(dict(zip([x.name for x in layers], combo)), layers) <= allowed * (1 + 1e-9)
    )
    got = total_error(layers, choices)
    assert best - 1e-9 <= got <= best + largest_step(layers) + 1e-9


def largest_step(layers):
    """The most error one step between two choices of a layer, next in bytes, removes: greedy
    allocation can stop at most about one such step short (a knapsack remainder)."""
    steps = [0.0]
    for layer in layers:
        options = sorted(
            (bytes_total({layer.name: c}, [layer]), total_error([layer], {layer.name: c}))
            for c in every_choice(layer)
        )
        best_so_far = options[0][1]
        for _, error in options[1:]:
            steps.append(best_so_far - min(error, best_so_far))
            best_so_far = min(best_so_far, error)
    return max(steps)


@settings(max_examples=40, deadline=None)
@given(byte_layers(max_layers=4, max_size=12))
def test_a_budget_that_fits_everything_at_full_precision_cuts_nothing(layers):
    choices = allocate_bytes(layers, 1.0)
    assert all(choice == Choice(None) for choice in choices.values())


def test_planted_flat_layer_goes_int8_dense_and_low_rank_layer_keeps_few_ranks():
    flat = LayerBudget(
        "flat", (32, 32), torch.ones(32), scheme=SCHEMES["int8"],
        quantized=QuantizedError(torch.full((32,), 1e-4), 1e-4),
    )  # fmt: skip
    planted = torch.zeros(32)
    planted[:2] = 10.0
    low = LayerBudget(
        "low", (32, 32), planted, scheme=SCHEMES["int8"],
        quantized=QuantizedError(torch.full((32,), 1e-3), 1e-3),
    )  # fmt: skip
    choices = allocate_bytes([flat, low], ratio=0.2)
    assert choices == {"flat": Choice(None, True), "low": Choice(2, True)}


def test_compress_under_a_byte_budget():
    model, report = tl.compress(
        mlp(), batches(), ratio=0.15, allocation="global", budget="bytes", method="linear",
        exclude=[], progress=False,
    )  # fmt: skip
    weights = sum(
        4 * m.out_features * m.in_features for m in mlp().modules() if hasattr(m, "out_features")
    )
    biases = sum(p.nbytes for name, p in model.named_parameters() if name.endswith("bias"))
    assert weight_bytes(model) - biases <= 0.15 * weights
    assert report.info["quantized"] == quantization_of(model)
    assert report.info["allocation"]["scheme"] == "int8"
    assert any("int8 weights" in row.note for row in report.layers)
    full, report = tl.compress(
        mlp(), batches(), ratio=1.0, allocation="global", budget="bytes", progress=False
    )
    assert "quantized" not in report.info and quantization_of(full) == {}


def test_byte_budget_arguments_are_checked():
    with pytest.raises(ValueError, match="need allocation='global'"):
        tl.convert(mlp(), ratio=0.5, budget="bytes")
    with pytest.raises(
        ValueError, match="scheme must be one of int8, int8-dynamic\nbut got 'float8'"
    ):
        tl.convert(mlp(), ratio=0.5, allocation="global", budget="bytes", scheme="float8")
    with pytest.raises(ValueError, match="scheme='int8' is for budget='bytes'"):
        tl.convert(mlp(), ratio=0.5, allocation="global", scheme="int8")
