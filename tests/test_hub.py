"""tl.save_pretrained / tl.from_pretrained (torch_lowrank/hub.py): tiny Hugging Face models of
seven families built from configs (no downloads), and plain PyTorch models with a builder."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import torch_lowrank as tl
from torch_lowrank.hub import INFO_FILE, WEIGHTS_FILE, parameters_on_meta

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

VOCAB = 64
SMALL = {"vocab_size": VOCAB, "max_position_embeddings": 32}
DECODER = {**SMALL, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
ROPE = {**DECODER, "num_attention_heads": 4, "num_key_value_heads": 2}
GPT2 = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0)
OPT = dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, **SMALL)
T5 = dict(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=VOCAB)
FAMILIES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2, eos_token_id=0)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**ROPE)),
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**ROPE, sliding_window=8)
    ),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**ROPE)),
    "bert": lambda: transformers.BertForMaskedLM(
        transformers.BertConfig(**DECODER, num_attention_heads=2)
    ),
    "opt": lambda: transformers.OPTForCausalLM(
        transformers.OPTConfig(**OPT, word_embed_proj_dim=32)
    ),
    "t5": lambda: transformers.T5ForConditionalGeneration(
        transformers.T5Config(**T5, decoder_start_token_id=0)
    ),
}


def token_batches(family: str, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 12), generator=g)
        out.append({"input_ids": ids, **({"decoder_input_ids": ids} if family == "t5" else {})})
    return out


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def tie_names(model: nn.Module) -> list[set[str]]:
    groups: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    return sorted((g for g in groups.values() if len(g) > 1), key=sorted)


@pytest.fixture(scope="module")
def compressed():
    """Every family compressed once (linear, parallel: the round trip is what is tested)."""
    out = {}
    for family, build in FAMILIES.items():
        torch.manual_seed(0)
        model, report = tl.compress(
            build().eval(), token_batches(family, 2, seed=1), ratio=0.4, method="linear",
            corrective=False, progress=False,
        )  # fmt: skip
        out[family] = (model, report)
    return out


def recording_builder():
    """A builder of :class:`Rotary` and the list it fills, per call, with whether every
    parameter was on the ``meta`` device when built."""
    meta_at_build: list[bool] = []

    def build() -> nn.Module:
        dense = Rotary()
        meta_at_build.append(all(p.is_meta for p in dense.parameters()))
        return dense

    return build, meta_at_build


@pytest.mark.parametrize("family", FAMILIES)
def test_hugging_face_round_trip_gives_the_same_outputs(family, compressed, tmp_path):
    model, report = compressed[family]
    tl.save_pretrained(model, tmp_path, report=report)
    info = json.loads((tmp_path / INFO_FILE).read_text())
    assert info["torch_lowrank"] == tl.__version__ and info["report"] == report.to_dict()
    ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, tl.LowRankLinear)}
    assert ranks and {name: layer["rank"] for name, layer in info["layers"].items()} == ranks
    loaded = tl.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    got = {n: m.rank for n, m in loaded.named_modules() if isinstance(m, tl.LowRankLinear)}
    assert got == ranks
    assert tie_names(loaded) == tie_names(model)  # GPT-2's lm_head is wte again, T5's shared
    for name, buffer in model.named_buffers():  # rotary inv_freq, position ids: recomputed
        torch.testing.assert_close(dict(loaded.named_buffers())[name], buffer, atol=0, rtol=0)
    batch = token_batches(family, 1, seed=2)[0]
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-6, rtol=0)


def test_gpt2_loaded_then_merged_is_gpt2_again(compressed, tmp_path):
    from transformers.pytorch_utils import Conv1D

    model, _ = compressed["gpt2"]
    tl.save_pretrained(model, tmp_path / "low")
    loaded = tl.merge_(tl.from_pretrained(tmp_path / "low"))
    assert isinstance(loaded.transformer.h[1].attn.c_proj, Conv1D)
    loaded.save_pretrained(tmp_path / "dense")
    dense = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "dense").eval()
    batch = token_batches("gpt2", 1, seed=3)[0]
    torch.testing.assert_close(logits(dense, batch), logits(model, batch), atol=1e-5, rtol=1e-5)


class Rotary(nn.Module):
    """A plain model with what makes loading hard: a non-persistent buffer computed in the
    constructor, a tied weight and a BatchNorm that folds away."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 16), persistent=False)
        self.body = nn.Sequential(nn.Linear(16, 48), nn.BatchNorm1d(48), nn.ReLU())
        self.proj = nn.Linear(48, 16)
        self.head = nn.Linear(16, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.body(self.embed(ids) * self.scale)))


def test_plain_model_with_a_builder(tmp_path):
    torch.manual_seed(4)
    model = Rotary().eval()
    data = [torch.randint(0, VOCAB, (64,)) for _ in range(3)]
    model, _ = tl.compress(model, data, rank=4, method="linear", progress=False)
    assert type(model.body[1]).__name__ == "FoldedBatchNorm"
    tl.save_pretrained(model, tmp_path)
    assert not (tmp_path / "config.json").exists()
    build, meta_at_build = recording_builder()
    loaded = tl.from_pretrained(tmp_path, build=build)
    assert meta_at_build == [True]  # nothing dense was allocated
    assert loaded.head.weight is loaded.embed.weight and torch.equal(loaded.scale, model.scale)
    ids = torch.randint(0, VOCAB, (32,))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_quantized_hugging_face_round_trip_is_bit_identical(family, compressed, tmp_path):
    """int8 factors come back as the torchao tensors they were saved as. GPT-2's head is
    quantized too (dense="lm_head"), which unties it from wte: it must stay untied."""
    pytest.importorskip("torchao")
    from torch_lowrank.quantize import quantization_of

    model = copy.deepcopy(compressed[family][0])
    tl.quantize_factors_(model, "int8", dense="lm_head" if family == "gpt2" else False)
    schemes = quantization_of(model)
    assert len(schemes) == 2 * len(tl.model.low_rank_modules(model)) + (family == "gpt2")
    tl.save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / INFO_FILE).read_text())["quantization"] == schemes
    loaded = tl.from_pretrained(tmp_path)
    assert quantization_of(loaded) == schemes
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert tie_names(loaded) == tie_names(model)
    if family == "gpt2":
        assert loaded.lm_head.weight is not loaded.transformer.wte.weight
    batch = token_batches(family, 1, seed=5)[0]
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_quantized_plain_model_with_a_builder_keeps_ties(tmp_path):
    pytest.importorskip("torchao")
    from safetensors import safe_open

    torch.manual_seed(6)
    model = Rotary().eval()
    data = [torch.randint(0, VOCAB, (64,)) for _ in range(3)]
    model, _ = tl.compress(model, data, rank=4, method="linear", progress=False)
    tl.quantize_factors_(model, "int8-dynamic")
    tl.save_pretrained(model, tmp_path)
    with safe_open(tmp_path / WEIGHTS_FILE, "pt") as handle:
        names, metadata = set(handle.keys()), handle.metadata()
    assert "body.0.down._weight_qdata" in names and "body.0.down.weight" not in names
    assert json.loads(metadata["tensor_names"]) and metadata["format"] == "pt"
    build, meta_at_build = recording_builder()
    loaded = tl.from_pretrained(tmp_path, build=build)
    assert meta_at_build == [True]
    assert loaded.head.weight is loaded.embed.weight and not tl.quantize.is_quantized(
        loaded.head.weight
    )
    schemes = tl.quantize.quantization_of(model)
    assert set(schemes) == {"body.0.down", "body.0.up", "proj.down", "proj.up"}
    assert tl.quantize.quantization_of(loaded) == schemes
    ids = torch.randint(0, VOCAB, (32,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    support = "torchao.prototype.safetensors.safetensors_support"
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, support, None)  # as if torchao were missing
        with pytest.raises(ImportError, match=r"pip install 'torch_lowrank\[quant\]'"):
            tl.from_pretrained(tmp_path, build=Rotary)


def test_float_model_saves_no_quantization_and_loads_without_torchao(tmp_path):
    model = tl.convert(nn.Sequential(nn.Linear(16, 16), nn.ReLU()), rank=2)
    model(torch.randn(32, 16))
    tl.recover_(model, method="linear")
    tl.save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / INFO_FILE).read_text())["quantization"] == {}
    code = (
        "import sys, torch, torch_lowrank as tl\n"
        f"m = tl.from_pretrained({str(tmp_path)!r}, build=lambda: torch.nn.Sequential("
        "torch.nn.Linear(16, 16), torch.nn.ReLU()))\n"
        "assert m[0].rank == 2 and 'torchao' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_parameters_on_meta_keeps_buffers_and_ties():
    with parameters_on_meta():
        model = Rotary()
    assert all(p.is_meta for p in model.parameters()) and model.head.weight is model.embed.weight
    assert not model.scale.is_meta and not model.body[1].running_var.is_meta
    assert not nn.Linear(2, 2).weight.is_meta  # the hook is gone afterwards


def test_bad_calls_name_what_is_wrong_and_change_nothing(tmp_path):
    model = tl.convert(nn.Sequential(nn.Linear(16, 16), nn.ReLU()), rank=2)
    with pytest.raises(ValueError, match="still calibrating:\n0"):
        tl.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(TypeError, match="directory must be a path"):
        tl.save_pretrained(model, 3)
    with pytest.raises(FileNotFoundError, match="holds no torch_lowrank.json"):
        tl.from_pretrained(tmp_path)
    model(torch.randn(32, 16))
    tl.recover_(model, method="linear")
    tl.save_pretrained(model, tmp_path / "out")
    with pytest.raises(ValueError, match="pass build="):
        tl.from_pretrained(tmp_path / "out")
    with pytest.raises(TypeError, match="build\\(\\) must return an nn.Module"):
        tl.from_pretrained(tmp_path / "out", build=lambda: None)
    info = json.loads((tmp_path / "out" / INFO_FILE).read_text())
    info["layers"]["0"]["rank"] = 3
    (tmp_path / "out" / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(ValueError, match="layer '0': .* lists rank 3\nbut the loaded model has"):
        tl.from_pretrained(tmp_path / "out", build=lambda: nn.Sequential(nn.Linear(16, 16)))


def test_missing_safetensors_names_the_extra(monkeypatch, tmp_path):
    model = nn.Sequential(tl.LowRankLinear(8, 8, rank=2))
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'torch_lowrank\[hf\]'"):
        tl.save_pretrained(model, tmp_path)
    assert not (tmp_path / WEIGHTS_FILE).exists()


def test_importing_the_library_imports_no_optional_package():
    code = (
        "import sys, torch_lowrank\n"
        "assert not {'transformers', 'safetensors'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
