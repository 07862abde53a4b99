"""The whole chain after conversion on the demo's digits MLP, each step tested: compress,
fine-tune with the teacher, save, load into a fresh dense model (torch_lowrank/serialize.py),
torch.compile, torch.export, ONNX, merge back (torch_lowrank/finetune.py); then dtypes, devices."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_lowrank as tl
from torch_lowrank import demo
from torch_lowrank.finetune import finetune_, merge_
from torch_lowrank.serialize import load_state_dict

pytestmark = pytest.mark.usefixtures("single_thread")

pytest.importorskip("sklearn")


def digits_mlp() -> nn.Sequential:
    """The architecture of ``demo.train_mlp`` (64 -> 256 -> 256 -> 10, ReLU)."""
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


@pytest.fixture(scope="module")
def digits(single_thread):
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = demo.load_digits()
    teacher = demo.train_mlp(x_train, y_train, epochs=15)  # test accuracy 0.97 in ~2 s
    return teacher, x_train, x_test, y_test


@pytest.fixture(scope="module")
def compressed(digits):
    teacher, x_train, _, _ = digits
    torch.manual_seed(0)
    model, report = tl.compress(
        copy.deepcopy(teacher), list(x_train.split(256)), ratio=0.1, exclude="4", progress=False
    )
    return model.eval(), report


@pytest.fixture(scope="module")
def finetuned(digits, compressed):
    teacher, x_train, x_test, _ = digits
    model = copy.deepcopy(compressed[0])
    torch.manual_seed(0)
    history = finetune_(
        model, list(x_train.split(64)), teacher=teacher, steps=200, lr=3e-3, progress=False
    )
    return model.eval(), history


@pytest.fixture(scope="module")
def loaded(finetuned, tmp_path_factory):
    """The fine-tuned state dict saved, read back with weights_only=True and loaded into a fresh
    dense MLP built on the meta device."""
    path = tmp_path_factory.mktemp("chain") / "digits.pt"
    torch.save(finetuned[0].state_dict(), path)
    with torch.device("meta"):
        fresh = digits_mlp()
    state = torch.load(path, weights_only=True)
    return load_state_dict(fresh, state, assign=True).eval()


def test_compress(digits, compressed):
    """Both hidden layers become recovered LowRankLinear modules keeping <= 10% of their
    weights; test accuracy stays within 8 points of the dense MLP's (measured: 0.922 vs 0.969)."""
    teacher, _, x_test, y_test = digits
    model, report = compressed
    assert [type(m).__name__ for m in model] == [
        "LowRankLinear", "ReLU", "LowRankLinear", "ReLU", "Linear"
    ]  # fmt: skip
    assert not model[0].calibrating and not model[2].calibrating
    assert model[2].rank * (256 + 256) <= 0.1 * 256 * 256
    dense_acc = demo.accuracy(teacher, x_test, y_test)
    assert demo.accuracy(model, x_test, y_test) > dense_acc - 0.08


def test_finetune_with_the_teacher(digits, compressed, finetuned):
    """200 AdamW steps of distillation lower the held-out (test set) MSE to the teacher's logits
    by 20% at least (measured: 34%) and do not lower test accuracy (measured: +2.8 points)."""
    teacher, _, x_test, y_test = digits
    model, history = finetuned
    with torch.no_grad():
        target = teacher(x_test)
        before = F.mse_loss(compressed[0](x_test), target).item()
        after = F.mse_loss(model(x_test), target).item()
    assert len(history) == 200
    assert after < 0.8 * before
    assert demo.accuracy(model, x_test, y_test) >= demo.accuracy(compressed[0], x_test, y_test)
    assert torch.equal(model[4].weight, compressed[0][4].weight)  # only the factors trained


def test_save_and_load_into_a_fresh_dense_model(digits, finetuned, loaded):
    """The loaded model has the same low-rank layers and ranks, real (non-meta) tensors, and
    bitwise equal outputs."""
    _, _, x_test, _ = digits
    model = finetuned[0]
    assert [type(m) for m in loaded] == [type(m) for m in model]
    assert (loaded[0].rank, loaded[2].rank) == (model[0].rank, model[2].rank)
    assert not any(t.is_meta for t in loaded.state_dict().values())
    with torch.no_grad():
        assert torch.equal(loaded(x_test), model(x_test))


def test_torch_compile(digits, loaded):
    """torch.compile (inductor) of the loaded model matches eager within 1e-5 (absolute plus
    relative). Skipped only when
    torch.compile cannot compile even a trivial function here (no C++ compiler, ...)."""
    _, _, x_test, _ = digits
    compiled = torch.compile(loaded)
    with torch.no_grad():
        eager = loaded(x_test)
        try:
            got = compiled(x_test)
        except Exception as err:
            try:
                torch.compile(lambda t: t * 2 + 1)(torch.ones(3))
            except Exception as probe:
                pytest.skip(f"torch.compile does not work on this machine: {probe!r}")
            raise err
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


def test_torch_export(digits, loaded):
    """torch.export.export with a dynamic batch dimension: the exported program matches eager
    within 1e-6 at another batch size, and its graph holds matrix products, no decomposition."""
    _, _, x_test, _ = digits
    batch = torch.export.Dim("batch")
    program = torch.export.export(loaded, (x_test[:8],), dynamic_shapes=({0: batch},))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("linear" in op or "mm" in op for op in ops)
    assert not any("svd" in op or "eigh" in op for op in ops)
    with torch.no_grad():
        got, eager = program.module()(x_test), loaded(x_test)
    assert (got - eager).abs().max().item() < 1e-6


def test_onnx_export(digits, loaded, tmp_path):
    """ONNX export (dynamo exporter: needs onnx and onnxscript) gives a model onnx.checker
    accepts; with onnxruntime installed its outputs match eager within 1e-5 (absolute plus
    relative: the logits reach 12, and onnxruntime sums in another order)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    _, _, x_test, _ = digits
    path = tmp_path / "digits.onnx"
    torch.onnx.export(loaded, (x_test,), str(path), dynamo=True, verbose=False)
    onnx.checker.check_model(str(path), full_check=True)
    try:
        import onnxruntime
    except ImportError:
        return
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x_test.numpy()})
    with torch.no_grad():
        eager = loaded(x_test)
    torch.testing.assert_close(torch.from_numpy(got), eager, rtol=1e-5, atol=1e-5)


def test_merge_back(digits, loaded):
    """merge_ turns the low-rank layers back into plain nn.Linear layers with the dense
    parameter count; outputs equal the low-rank model's up to float32 rounding: within 1e-6 of
    the largest output (about 8 ulps; the two compute the same product in another order)."""
    _, _, x_test, _ = digits
    model = copy.deepcopy(loaded)
    with torch.no_grad():
        expected = model(x_test)
        merged = merge_(model)
        got = merged(x_test)
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in merged)
    assert sum(p.numel() for p in merged.parameters()) == sum(
        p.numel() for p in digits_mlp().parameters()
    )
    assert (got - expected).abs().max().item() < 1e-6 * expected.abs().max().item()


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_calibrated_in_float32_run_in_half(digits, compressed, dtype, tol):
    """A model calibrated and recovered in float32, then .to(dtype), runs in that dtype: every
    tensor converted, outputs within a relative (Frobenius) tol of float32's, the same test
    predictions on 98% of the images at least."""
    _, _, x_test, _ = digits
    model = compressed[0]
    half = copy.deepcopy(model).to(dtype)
    assert all(t.dtype == dtype for t in half.state_dict().values())
    with torch.no_grad():
        expected, got = model(x_test), half(x_test.to(dtype)).float()
    assert ((got - expected).norm() / expected.norm()).item() < tol
    assert (got.argmax(1) == expected.argmax(1)).float().mean().item() >= 0.98


def test_to_moves_recovered_models(digits, compressed):
    """.to(float64) converts the factors (outputs within 1e-5), .to("meta") moves every tensor;
    the modules stay recovered at the same rank."""
    _, _, x_test, _ = digits
    model = compressed[0]
    double = copy.deepcopy(model).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in double.parameters())
    with torch.no_grad():
        assert torch.allclose(double(x_test.double()).float(), model(x_test), atol=1e-5)
    meta = copy.deepcopy(model).to("meta")
    assert all(t.is_meta for t in meta.state_dict().values())
    assert not meta[2].calibrating and meta[2].rank == model[2].rank


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_recovered_path():
    """On CUDA: calibrate and recover on the GPU (every factor stays there); .to("cpu") moves the
    model and matches the GPU within 1e-3 relative (TF32 may be on); fine-tune on the GPU (the
    mean of the last 5 step losses below the first 5's); load into a CUDA dense model (bitwise
    equal) and merge back on the GPU (1e-3 relative)."""
    torch.manual_seed(0)
    dense = digits_mlp().cuda().eval()
    batches = [torch.rand(256, 64, device="cuda") for _ in range(4)]
    model, _ = tl.compress(copy.deepcopy(dense), batches, ratio=0.2, exclude="4", progress=False)
    assert isinstance(model[2], tl.LowRankLinear) and not model[2].calibrating
    assert all(p.is_cuda for p in model.parameters())
    x = torch.rand(128, 64, device="cuda")
    with torch.no_grad():
        on_gpu = model(x)
        moved = copy.deepcopy(model).to("cpu")
        assert all(p.device.type == "cpu" for p in moved.parameters())
        assert rel_err(moved(x.cpu()), on_gpu.cpu()) < 1e-3
    history = finetune_(model, batches, teacher=dense, steps=30, lr=1e-3, progress=False)
    assert sum(history[-5:]) < sum(history[:5])
    assert all(p.is_cuda for p in model.parameters())
    fresh = load_state_dict(digits_mlp().cuda(), model.state_dict()).eval()
    assert isinstance(fresh[0], tl.LowRankLinear) and fresh[0].up.weight.is_cuda
    with torch.no_grad():
        expected = model.eval()(x)
        assert torch.equal(fresh(x), expected)
        merged = merge_(fresh)
        assert type(merged[0]) is nn.Linear and merged[0].weight.is_cuda
        assert rel_err(merged(x), expected) < 1e-3
