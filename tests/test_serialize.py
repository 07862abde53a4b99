"""Tests of torch_lowrank/serialize.py: loading a compressed model's state dict into a freshly
built dense model (ranks from tensor shapes), meta-device loading, torch.load(weights_only=True)
and safetensors round trips, and the failures PyTorch itself reports."""

import pytest
import torch
from torch import nn

import torch_lowrank as tl
from torch_lowrank.serialize import load_state_dict

pytestmark = pytest.mark.usefixtures("single_thread")


class Net(nn.Module):
    """Conv2d (grouped), Conv1d without bias, a Linear shared under two names, a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList([nn.Linear(128, 32), nn.Linear(32, 32, bias=False)])
        self.shared = nn.Linear(32, 32)
        self.again = self.shared
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))  # (B, 8, 4, 4)
        h = self.conv1d(h.flatten(2)).flatten(1)  # (B, 128)
        for block in self.blocks:
            h = torch.relu(block(h))
        return self.head(self.again(self.shared(h)))


def compressed(seed: int = 0, **kwargs) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(32, 4, 4, 4)
    kwargs = kwargs or {"rank": 3}
    model, _ = tl.compress(
        Net(), [x], method="linear", corrective=False, exclude="head", progress=False, **kwargs
    )
    return model, x


def low_rank_names(model: nn.Module) -> dict[str, tuple[str, int]]:
    return {
        name: (type(m).__name__, m.rank)
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, (tl.LowRankLinear, tl.LowRankConv1d, tl.LowRankConv2d))
    }


def test_round_trip_into_a_fresh_dense_model():
    """Every converted layer (grouped conv, bias-free conv1d that gained a bias, a shared Linear)
    comes back as the same low-rank class at the same rank; outputs are bitwise equal; the dense
    head stays dense; the shared layer stays one module."""
    model, x = compressed()
    fresh = load_state_dict(Net(), model.state_dict())
    assert low_rank_names(fresh) == low_rank_names(model)
    assert set(low_rank_names(fresh)) == {
        "conv",
        "conv1d",
        "blocks.0",
        "blocks.1",
        "shared",
        "again",
    }
    assert fresh.shared is fresh.again and type(fresh.head) is nn.Linear
    assert fresh.conv1d.up.bias is not None and fresh.blocks[1].up.bias is not None
    assert torch.equal(fresh(x), model(x))


def test_ranks_differ_per_layer():
    model, x = compressed(ratio=0.3)
    fresh = load_state_dict(Net(), model.state_dict())
    assert low_rank_names(fresh) == low_rank_names(model)
    assert len({rank for _, rank in low_rank_names(fresh).values()}) > 1
    assert torch.equal(fresh(x), model(x))


def test_meta_model_with_assign():
    """A model built on the meta device gets low-rank modules on meta, and with assign=True ends
    with every tensor on the CPU, the saved tensors themselves, equal outputs."""
    model, x = compressed()
    state = model.state_dict()
    with torch.device("meta"):
        fresh = Net()
    fresh = load_state_dict(fresh, state, assign=True)
    assert all(t.device.type == "cpu" for t in fresh.state_dict().values())
    assert fresh.conv.down.weight.data_ptr() == state["conv.down.weight"].data_ptr()
    assert torch.equal(fresh(x), model(x))
    with torch.device("meta"):
        empty = Net()
    # a fresh state dict: PyTorch records assign=True in the metadata of the one it loaded
    with pytest.warns(UserWarning, match="no-op"):  # PyTorch's: copying into meta tensors
        empty = load_state_dict(empty, model.state_dict())
    assert isinstance(empty.conv, tl.LowRankConv2d) and empty.conv.up.weight.is_meta


def test_dtype_requires_grad_and_mode_follow_the_dense_layer():
    """The low-rank modules take the dense model's dtype (the float32 factors are cast),
    requires_grad and train/eval mode."""
    model, x = compressed()
    fresh = Net().double()
    fresh.blocks.requires_grad_(False)
    fresh.eval()
    fresh = load_state_dict(fresh, model.state_dict())
    assert all(p.dtype == torch.float64 for p in fresh.parameters())
    assert not any(p.requires_grad for p in fresh.blocks.parameters())
    assert all(p.requires_grad for p in fresh.conv.parameters())
    assert not any(m.training for m in fresh.modules())
    assert torch.allclose(fresh(x.double()), model(x).double(), rtol=1e-5, atol=1e-6)


def test_single_layer_model_returns_the_new_root():
    torch.manual_seed(0)
    layer = tl.LowRankLinear(16, 8, rank=2)
    fresh = load_state_dict(nn.Linear(16, 8), layer.state_dict())
    assert isinstance(fresh, tl.LowRankLinear) and fresh.rank == 2
    x = torch.randn(5, 16)
    assert torch.equal(fresh(x), layer(x))


def test_other_rank_into_a_converted_model_is_a_size_mismatch():
    """Factors of another rank into an already converted model fail with PyTorch's own error."""
    model, _ = compressed()
    other, _ = compressed(rank=2)
    with pytest.raises(RuntimeError, match="size mismatch for conv.down.weight"):
        load_state_dict(model, other.state_dict())


def test_failed_load_puts_the_dense_layers_back():
    """strict=True with an unexpected key raises PyTorch's error and leaves the model as it was;
    strict=False loads and ignores it."""
    model, x = compressed()
    state = {**model.state_dict(), "extra.weight": torch.zeros(1)}
    fresh = Net()
    layers = dict(fresh.named_modules())
    with pytest.raises(RuntimeError, match='Unexpected key.*"extra.weight"'):
        load_state_dict(fresh, state)
    assert dict(fresh.named_modules()) == layers
    fresh = load_state_dict(fresh, state, strict=False)
    assert torch.equal(fresh(x), model(x))


def test_bad_saved_rank_names_the_layer():
    torch.manual_seed(0)
    state = tl.LowRankLinear(16, 8, rank=2).state_dict()
    state["down.weight"] = torch.zeros(9, 16)  # rank 9 > min(16, 8)
    state["up.weight"] = torch.zeros(8, 9)
    with pytest.raises(ValueError, match="layer '': LowRankLinear: rank must be in"):
        load_state_dict(nn.Linear(16, 8), state)
    conv = tl.LowRankConv2d(4, 8, 3, rank=2, groups=2).state_dict()
    conv["down.weight"] = torch.zeros(3, 2, 3, 3)
    with pytest.raises(ValueError, match="multiple of groups=2"):
        load_state_dict(nn.Conv2d(4, 8, 3, groups=2), conv)


def test_torch_load_weights_only(tmp_path):
    """A saved recovered state dict loads with torch.load(weights_only=True)."""
    model, x = compressed()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert set(state) == set(model.state_dict())
    assert torch.equal(load_state_dict(Net(), state)(x), model(x))


def test_safetensors_round_trip(tmp_path):
    """safetensors refuses shared tensors, so the shared layer is saved under one name
    (save_model / load_model handle that); the loaded model is bitwise equal."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, x = compressed()
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_model(model, str(path))
    state = safetensors_torch.load_file(str(path))
    assert {"conv.down.weight", "conv.up.weight", "conv.up.bias"} <= set(state)
    fresh = load_state_dict(Net(), state, strict=False)
    assert fresh.shared is fresh.again and isinstance(fresh.again, tl.LowRankLinear)
    assert torch.equal(fresh(x), model(x))
