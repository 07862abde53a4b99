"""Hugging Face model families (tiny random models built from configs, no downloads) and the
registry in torch_lowrank/families.py."""

import copy

import pytest
import torch
from torch import nn

import torch_lowrank as tl
from torch_lowrank.families import adapt, forward_kwargs, tied_weights

transformers = pytest.importorskip("transformers")

VOCAB = 64


def gpt2():
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def bert():
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.BertModel(config)


def llama():
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


FAMILIES = {"gpt2": gpt2, "bert": bert, "llama": llama}


def batches(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (4, 16), generator=gen)} for _ in range(n)]


def output(model, batch):
    with torch.no_grad():
        out = model(**batch, use_cache=False) if hasattr(model, "lm_head") else model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def build(family):
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


def test_conv1d_is_adapted_as_the_linear_it_is():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs; weight (16, 24)
    nn.init.normal_(layer.bias)
    linear = adapt(layer)
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (24, 16)
    assert linear.weight.data_ptr() == layer.weight.data_ptr()  # a view, not a copy
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(linear(x), layer(x))


def test_tied_head_and_default_exclusions():
    model = build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert tied_weights(model)[model.lm_head] == "transformer.wte"
    assert forward_kwargs(model) == {"use_cache": False} and forward_kwargs(nn.Linear(2, 2)) == {}
    # even when lm_head is not excluded by name, its tie keeps it dense
    tl.convert(model, ratio=0.5, exclude=[])
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("family", FAMILIES)
def test_converts_in_one_line_and_recovers_with_every_method(family):
    """Every block projection (GPT-2's Conv1D included) is compressed, lm_head and embeddings
    are left alone, and every method gives a working model with fewer parameters; the
    data-driven methods beat weight SVD on held-out tokens, and corrective recovery runs
    block by block."""
    dense = build(family)
    data, held_out = batches(6, seed=1), batches(1, seed=2)[0]
    expected = output(dense, held_out)
    n_before = sum(p.numel() for p in dense.parameters())
    errors = {}
    for method in tl.METHODS:
        model = copy.deepcopy(dense)
        options = {"max_iter": 30} if method in ("relu", "nuclear") else {}
        _, report = tl.compress(
            model, data, ratio=0.5, method=method, options=options, progress=False
        )
        low_rank = [m for m in model.modules() if isinstance(m, tl.LowRankLinear)]
        names = [row.name for row in report.layers if row.method != "dense"]
        assert len(low_rank) == len(names) == {"gpt2": 8, "bert": 13, "llama": 14}[family]
        assert not any("lm_head" in name or "embed" in name or "wte" in name for name in names)
        if family == "gpt2":
            assert model.lm_head.weight is model.transformer.wte.weight
        assert sum(p.numel() for p in model.parameters()) < n_before
        got = output(model, held_out)
        assert torch.isfinite(got).all()
        errors[method] = ((got - expected).norm() / expected.norm()).item()
        if method != "svd":
            assert report.info["mode"] == "corrective" and report.info["block_passes"] > 0
    assert errors["linear"] < errors["svd"] and errors["relu"] < errors["svd"], errors


# == bias-free stays bias-free; merge_ gives back the architecture's own layer types ============
def test_hugging_face_models_add_no_bias_by_default_and_plain_models_do():
    from torch_lowrank.families import default_add_bias

    llama_model = build("llama")
    assert not default_add_bias(llama_model) and not default_add_bias(llama_model.model.layers[0])
    assert default_add_bias(nn.Sequential(nn.Linear(4, 4)))
    data = batches(2, seed=3)
    model, _ = tl.compress(llama_model, data, ratio=0.5, method="linear", progress=False)
    low_rank = [m for m in model.modules() if isinstance(m, tl.LowRankLinear)]
    assert low_rank and all(m.up.bias is None for m in low_rank)  # Llama has no biases
    plain = nn.Sequential(nn.Linear(16, 16, bias=False), nn.ReLU())
    x = [torch.randn(32, 16) for _ in range(2)]
    plain, _ = tl.compress(plain, x, rank=2, method="linear", progress=False)
    assert plain[0].up.bias is not None  # plain PyTorch keeps today's default
    added, _ = tl.compress(build("llama"), data, ratio=0.5, add_bias=True, progress=False)
    assert all(m.up.bias is not None for m in added.modules() if isinstance(m, tl.LowRankLinear))
    with pytest.raises(ValueError, match="add_bias must be True, False or None"):
        tl.convert(build("llama"), ratio=0.5, add_bias="no")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_then_transformers_save_and_load_round_trips_exactly(family, tmp_path):
    """After compress (default options) and merge_, the model is its own architecture again:
    GPT-2's layers are Conv1D and Llama's layers have no bias, so transformers' own
    save_pretrained / from_pretrained give back exactly the same outputs."""
    from transformers.pytorch_utils import Conv1D

    model = build(family)
    kinds = {name: type(m) for name, m in model.named_modules()}
    model, _ = tl.compress(model, batches(2, seed=4), ratio=0.4, progress=False)
    held_out = batches(1, seed=5)[0]
    expected = output(model, held_out)
    model = tl.merge_(model)
    assert {name: type(m) for name, m in model.named_modules()} == kinds
    if family == "gpt2":
        assert isinstance(model.transformer.h[0].mlp.c_fc, Conv1D)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(output(loaded, held_out), expected, atol=1e-5, rtol=1e-5)


def test_merged_conv1d_keeps_flags_and_the_restored_type_is_registered():
    from transformers.pytorch_utils import Conv1D

    from torch_lowrank.families import restore

    torch.manual_seed(6)
    layer = Conv1D(12, 8)
    low = tl.LowRankLinear.from_dense(adapt(layer), rank=2, original=layer)
    low(torch.randn(64, 8))
    low.recover_("linear")
    assert low.source_type is Conv1D and "source" not in low.__dict__  # the original is freed
    low.up.bias.requires_grad_(False)
    low.eval()
    merged = tl.merge_(nn.Sequential(low))[0]
    assert type(merged) is Conv1D and merged.weight.shape == (8, 12) and not merged.training
    assert not merged.bias.requires_grad and merged.weight.requires_grad
    x = torch.randn(5, 8)
    torch.testing.assert_close(merged(x), low(x), atol=1e-6, rtol=1e-6)
    bias_free = restore(nn.Linear(8, 12, bias=False), Conv1D)  # Conv1D always adds a bias: 0
    assert type(bias_free) is Conv1D and torch.equal(bias_free.bias, torch.zeros(12))


def test_t5_compresses_correctively_though_it_reads_a_layer_weight():
    """T5's feed-forward reads ``wo.weight.dtype``: the solved layers standing in during
    corrective recovery expose the product of their factors as ``weight``."""
    config = transformers.T5Config(
        d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=VOCAB,
        decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(7)
    model = transformers.T5ForConditionalGeneration(config).eval()
    data = [{**b, "decoder_input_ids": b["input_ids"]} for b in batches(2, seed=8)]
    model, report = tl.compress(model, data, ratio=0.5, method="linear", progress=False)
    assert report.info["mode"] == "corrective"
    assert isinstance(model.encoder.block[0].layer[1].DenseReluDense.wo, tl.LowRankLinear)
