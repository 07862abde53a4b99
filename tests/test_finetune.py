"""Tests of torch_lowrank/finetune.py: training recovered factors (any optimizer, finetune_) and
merging them back into dense layers (merge_)."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torch_optimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_lowrank as tl
from torch_lowrank.finetune import finetune_, merge_

pytestmark = pytest.mark.usefixtures("single_thread")


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)
    )


def setup(seed: int = 0):
    """A random teacher MLP, an SVD-compressed copy (the head stays dense), anisotropic training
    batches and held-out inputs."""
    torch.manual_seed(seed)
    teacher = mlp().eval()
    mix = torch.randn(32, 32) / 32**0.5 * torch.logspace(0, -1, 32)
    data = [3 * torch.randn(128, 32) @ mix.T for _ in range(8)]
    held_out = 3 * torch.randn(512, 32) @ mix.T
    student, _ = tl.compress(
        copy.deepcopy(teacher),
        data,
        ratio=0.15,
        method="svd",
        corrective=False,
        exclude="4",
        progress=False,
    )
    return teacher, student, data, held_out


@torch.no_grad()
def mse(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    return F.mse_loss(student(x), teacher(x)).item()


@torch.no_grad()
def kl(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    s, t = F.log_softmax(student(x), -1), F.log_softmax(teacher(x), -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean").item()


def recovered_layer(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    if kind == "linear":
        layer, x = tl.LowRankLinear.from_linear(nn.Linear(24, 16), rank=4), torch.randn(64, 24)
    else:
        conv = nn.Conv2d(6, 8, 3, padding=1)
        layer, x = tl.LowRankConv2d.from_conv2d(conv, rank=3), torch.randn(4, 6, 6, 6)
    layer(x)
    layer.recover_("linear")
    return layer, x


# -- factors are ordinary parameters ---------------------------------------------------------------
@pytest.mark.parametrize(
    "optimizer",
    [
        torch.optim.SGD,
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.RMSprop,
        torch_optimizer.Lamb,
        torch_optimizer.RAdam,
        torch_optimizer.Yogi,
    ],
)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_any_optimizer_trains_the_factors(optimizer, kind):
    """The factors are leaf parameters of the module; 40 steps of any torch.optim or
    torch_optimizer optimizer (lr 1e-2) towards a reachable target (twice the output) lower the
    loss by 10% at least and change every factor."""
    layer, x = recovered_layer(kind)
    names = {name for name, _ in layer.named_parameters()}
    assert names == {"down.weight", "up.weight", "up.bias"}
    assert all(p.is_leaf and p.requires_grad for p in layer.parameters())
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    with torch.no_grad():
        target = 2 * layer(x)  # reachable: scale up.weight and up.bias by 2
    opt = optimizer(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    for name, p in layer.named_parameters():
        assert not torch.equal(p, before[name]), name


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_requires_grad_and_modes_behave_as_on_a_dense_layer(kind):
    """requires_grad_(False) freezes every factor (no graph is built), requires_grad_() thaws them
    and gradients reach all three; train()/eval() reach the factor layers and change nothing in
    the output."""
    layer, x = recovered_layer(kind)
    layer.requires_grad_(False)
    assert not any(p.requires_grad for p in layer.parameters())
    assert not layer(x).requires_grad
    layer.requires_grad_()
    layer(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    layer.eval()
    assert not layer.training and not layer.down.training and not layer.up.training
    y_eval = layer(x)
    layer.train()
    assert layer.training and layer.down.training and layer.up.training
    assert torch.equal(layer(x), y_eval)


# -- finetune_ -----------------------------------------------------------------------------------
@pytest.mark.parametrize("loss, measure", [(None, mse), ("kl", kl)])
def test_distillation_lowers_held_out_loss(loss, measure):
    """100 AdamW steps of distillation (MSE by default, or KL on logits) at least halve the
    held-out distillation loss of an SVD-compressed MLP (measured: by 3-4x); one loss per step."""
    teacher, student, data, held_out = setup()
    before = measure(student, teacher, held_out)
    history = finetune_(student, data, teacher=teacher, loss=loss, steps=100, lr=3e-3)
    assert len(history) == 100
    assert measure(student, teacher, held_out) < 0.5 * before


def test_given_loss_is_minimised():
    """Without a teacher, loss(output, batch) is minimised: here cross-entropy against the
    teacher's labels carried in (x, y) batches from a DataLoader (cycled: 60 steps over 8
    batches); held-out cross-entropy falls by 20% at least, the mean of the last 10 step losses
    is below the first 10's."""
    teacher, student, data, held_out = setup(1)
    x = torch.cat(data)
    with torch.no_grad():
        y, y_held = teacher(x).argmax(1), teacher(held_out).argmax(1)
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)

    def cross_entropy(output, batch):
        return F.cross_entropy(output, batch[1])

    with torch.no_grad():
        before = F.cross_entropy(student(held_out), y_held).item()
    history = finetune_(student, loader, loss=cross_entropy, steps=60, lr=3e-3, progress=False)
    with torch.no_grad():
        after = F.cross_entropy(student(held_out), y_held).item()
    assert len(history) == 60
    assert sum(history[-10:]) < sum(history[:10])
    assert after < 0.8 * before


@pytest.mark.parametrize(
    "optimizer", ["AdamW", "sgd", "adam", "lamb", "RAdam", "lbfgs", torch.optim.SGD]
)
def test_optimizer_names_and_classes(optimizer):
    """Names from torch.optim or torch_optimizer (any case) and classes are accepted (LBFGS too:
    the optimizer gets a closure); 20 steps lower the training loss."""
    teacher, student, data, _ = setup()
    history = finetune_(
        student, data, teacher=teacher, steps=20, lr=1e-2, optimizer=optimizer, progress=False
    )
    assert len(history) == 20 and min(history[-5:]) < history[0]


def test_only_factors_leaves_other_parameters_bitwise_and_restores_flags_and_modes():
    """only_factors=True: the dense head is bitwise unchanged, every factor changes, and every
    requires_grad flag (including one the user cleared on a factor, which is then not trained)
    and the train/eval modes of model and teacher come back. only_factors=False trains the head."""
    teacher, student, data, _ = setup()
    student[2].up.bias.requires_grad_(False)
    head = {name: p.detach().clone() for name, p in student[4].named_parameters()}
    frozen_bias = student[2].up.bias.detach().clone()
    factors = {n: p.detach().clone() for n, p in student.named_parameters() if n[0] in "02"}
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    student.eval()
    student[4].train()  # mixed modes come back module by module
    teacher.train()
    finetune_(student, data, teacher=teacher, steps=10, lr=1e-2, progress=False)
    assert [m.training for m in student.modules()] == [False] * 9 + [True]
    assert all(m.training for m in teacher.modules())
    assert {name: p.requires_grad for name, p in student.named_parameters()} == flags
    for name, p in student[4].named_parameters():
        assert torch.equal(p, head[name]), name
    assert torch.equal(student[2].up.bias, frozen_bias)
    for name, p in student.named_parameters():
        assert p.grad is None, name
        if name in factors and name != "2.up.bias":
            assert not torch.equal(p, factors[name]), name
    finetune_(student, data, teacher=teacher, steps=10, lr=1e-2, only_factors=False)
    assert not torch.equal(student[4].weight, head["weight"])


def test_finetune_errors():
    """Clear ValueErrors: no loss without a teacher, a loss name without a teacher, an unknown
    loss name or optimizer name, calibrating modules, nothing to train, a spent iterator; the
    model is left as it was (flags restored) after a failure mid-run."""
    teacher, student, data, _ = setup()
    with pytest.raises(ValueError, match="loss must be a callable"):
        finetune_(student, data)
    with pytest.raises(ValueError, match="loss must be a callable"):
        finetune_(student, data, loss="kl")
    with pytest.raises(ValueError, match="'mse', 'kl' or a callable"):
        finetune_(student, data, teacher=teacher, loss="huber")
    with pytest.raises(ValueError, match="unknown optimizer name(.|\n)*lamb(.|\n)*'adamx'"):
        finetune_(student, data, teacher=teacher, optimizer="adamx")
    with pytest.raises(ValueError, match="steps must be an int"):
        finetune_(student, data, teacher=teacher, steps=-1)
    with pytest.raises(ValueError, match="separate model"):
        finetune_(student, data, teacher=student)
    with pytest.raises(ValueError, match="nothing to train"):
        finetune_(teacher, data, teacher=copy.deepcopy(teacher))
    calibrating = tl.convert(mlp(), rank=4)
    with pytest.raises(ValueError, match="still calibrating:\n0, 2"):
        finetune_(calibrating, data, teacher=teacher)
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    with pytest.raises(ValueError, match="yielded no batch after 8"):
        finetune_(student, iter(data), teacher=teacher, steps=9, progress=False)
    assert {name: p.requires_grad for name, p in student.named_parameters()} == flags


def test_non_finite_loss_raises_before_the_step():
    teacher, student, data, _ = setup()
    before = copy.deepcopy(student.state_dict())
    bad = [torch.full((4, 32), float("nan"))]
    with pytest.raises(FloatingPointError, match="at step 0"):
        finetune_(student, bad, teacher=teacher, steps=3, progress=False)
    for name, value in student.state_dict().items():
        assert torch.equal(value, before[name]), name


# -- merge_ --------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, shared: nn.Linear) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 32)
        self.a, self.b = shared, shared  # one layer under two names

    def forward(self, x):
        h = torch.relu(self.conv(x))  # (B, 8, 4, 4)
        h = self.conv1d(h.flatten(2)).flatten(1)  # (B, 128)
        return self.b(self.a(self.fc(h)))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_merge_gives_plain_dense_layers_with_equal_outputs(dtype, tol):
    """Every recovered module becomes a plain nn.Conv2d / nn.Conv1d / nn.Linear (the shared one
    the same object under both names); outputs equal the low-rank model's within a relative
    tol; dtype, device, requires_grad and the train/eval mode are kept."""
    torch.manual_seed(0)
    model = Net(nn.Linear(32, 32)).to(dtype)
    x = torch.randn(16, 4, 4, 4, dtype=dtype)
    model, _ = tl.compress(model, [x], rank=3, method="linear", corrective=False, progress=False)
    assert isinstance(model.a, tl.LowRankLinear) and model.a is model.b
    model.conv.requires_grad_(False)
    model.fc.eval()
    expected = model(x)
    merged = merge_(model)
    assert merged is model
    assert type(model.conv) is nn.Conv2d and type(model.conv1d) is nn.Conv1d
    assert type(model.fc) is nn.Linear and type(model.a) is nn.Linear and model.a is model.b
    assert not any(isinstance(m, tl.LowRankLinear) for m in model.modules())
    for p in model.parameters():
        assert p.dtype == dtype and p.device == x.device
    assert not any(p.requires_grad for p in model.conv.parameters())
    assert all(p.requires_grad for p in model.fc.parameters())
    assert not model.fc.training and model.conv.training
    got = model(x)
    assert ((got - expected).norm() / expected.norm()).item() < tol


def test_merge_of_a_single_layer_and_of_calibrating_modules():
    """A model that is itself a recovered module returns its dense layer; a model with
    calibrating modules is refused and left as it was; merging twice changes nothing."""
    layer, x = recovered_layer("linear")
    dense = merge_(layer)
    assert type(dense) is nn.Linear
    assert torch.allclose(dense(x), layer(x), atol=1e-6)
    model = tl.convert(mlp(), rank=4)
    first = model[0]
    with pytest.raises(RuntimeError, match="still calibrating:\n0, 2"):
        merge_(model)
    assert model[0] is first and first.calibrating
    plain = mlp()
    assert merge_(plain) is plain
