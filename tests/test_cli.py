"""python -m torch_lowrank compress / eval (torch_lowrank/cli.py), end to end on a tiny GPT-2
and a word-level tokenizer built offline, saved to a temporary directory."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import torch_lowrank as tl
from torch_lowrank import cli
from torch_lowrank.cli import calibration_batches, main, perplexity
from torch_lowrank.hub import INFO_FILE
from torch_lowrank.quantize import quantization_of

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the bird sang a song in the tree",
    "my cat and your dog are friends",
    "we walk to the park with the dog",
]


def word_tokenizer():
    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", *words])}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]"
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny GPT-2 with its tokenizer in one directory, and a text file."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = word_tokenizer()
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64,
        bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(1)
    order = torch.randint(0, len(SENTENCES), (60,), generator=g).tolist()
    (root / "text.txt").write_text("\n".join(SENTENCES[i] for i in order) + "\n")
    return root


def test_help_runs_as_a_module():
    run = subprocess.run(
        [sys.executable, "-m", "torch_lowrank", "--help"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "compress" in run.stdout and "eval" in run.stdout and "examples:" in run.stdout


def test_compress_then_eval_end_to_end(workspace, capsys):
    out = workspace / "out"
    argv = [
        "compress", str(workspace / "model"), "--data", str(workspace / "text.txt"),
        "--ratio", "0.4", "--out", str(out), "--seq-len", "16", "--samples", "8",
        "--batch-size", "4", "--method", "relu", "--option", "max_iter=5", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    ranked = [row for row in report["layers"] if row["rank"] is not None]
    assert len(ranked) == 8 and all(row["method"] == "relu" for row in ranked)
    assert ranked[0]["name"] in printed and f"saved to {out}" in printed
    info = json.loads((out / "torch_lowrank.json").read_text())
    assert info["report"] == report and len(info["layers"]) == 8
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    text = str(workspace / "text.txt")
    assert main(["eval", str(out), "--data", text, "--max-length", "32", "--no-progress"]) == 0
    compressed = capsys.readouterr().out
    assert main(["eval", str(workspace / "model"), "--data", text, "--no-progress"]) == 0
    dense = capsys.readouterr().out
    values = [float(line.split()[1]) for line in (compressed, dense)]
    assert all(math.isfinite(v) and v > 1 for v in values), (compressed, dense)
    assert "stride 16" in compressed and "max_length 64, stride 32" in dense


def small_run(workspace, out, *flags):
    return [
        "compress", str(workspace / "model"), "--data", str(workspace / "text.txt"),
        "--out", str(out), "--seq-len", "16", "--samples", "4", "--batch-size", "2",
        "--method", "linear", "--no-progress", *flags,
    ]  # fmt: skip


def test_fisher_weighting_and_int8_factors_end_to_end(workspace, capsys, monkeypatch):
    """--weighting fisher reaches compress (every layer weighted), --quantize int8 quantizes
    every factor before saving, and the saved directory loads and evaluates."""
    pytest.importorskip("torchao")
    infos = []

    def spy(*args, **kwargs):
        model, report = tl.compress(*args, **kwargs)
        infos.append(report.info)
        return model, report

    monkeypatch.setattr(cli, "compress", spy)
    out = workspace / "fisher-int8"
    argv = small_run(workspace, out, "--ratio", "0.4", "--weighting", "fisher")
    assert main([*argv, "--quantize", "int8"]) == 0
    printed = capsys.readouterr().out
    assert infos[0]["weighting"]["layers"] == 8
    schemes = json.loads((out / INFO_FILE).read_text())["quantization"]
    assert len(schemes) == 16 and set(schemes.values()) == {"int8"}
    assert "16 layers store their weights in int8" in printed
    loaded = tl.from_pretrained(out)
    assert quantization_of(loaded) == schemes
    text = str(workspace / "text.txt")
    assert main(["eval", str(out), "--data", text, "--max-length", "32", "--no-progress"]) == 0
    value = float(capsys.readouterr().out.split()[1])
    ids = loaded.config.vocab_size  # the perplexity of a uniform guess bounds a sane model's
    assert math.isfinite(value) and 1 < value < 2 * ids


def test_byte_budget_end_to_end(workspace, capsys):
    pytest.importorskip("torchao")
    from torch_lowrank.quantized_state import weight_bytes

    out = workspace / "bytes"
    flags = ["--ratio", "0.3", "--allocation", "global", "--budget", "bytes"]
    assert main(small_run(workspace, out, *flags, "--scheme", "int8-dynamic")) == 0
    report = json.loads((out / "report.json").read_text())
    schemes = json.loads((out / INFO_FILE).read_text())["quantization"]
    assert schemes and set(schemes.values()) == {"int8-dynamic"}
    assert "store their weights in int8-dynamic" in capsys.readouterr().out
    loaded = tl.from_pretrained(out)
    rows = [row for row in report["layers"] if row["name"] != "lm_head"]  # excluded by default
    names = [row["name"] for row in rows]
    dense = sum(4 * row["shape"][0] * row["shape"][1] for row in rows)
    kept = 0
    for name in names:
        layer = loaded.get_submodule(name)
        biases = sum(p.nbytes for n, p in layer.named_parameters() if n.endswith("bias"))
        kept += weight_bytes(layer) - biases
    assert len(names) == 8 and 0.2 * dense < kept <= 0.3 * dense


def test_perplexity_scores_every_token_once_and_matches_one_forward():
    """Overlapping windows score every token but the first once; a window as long as the text
    is one forward; non-overlapping windows (stride == max_length) are independent."""
    torch.manual_seed(2)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 20, (50,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    whole = math.exp(F.cross_entropy(logits[:-1], ids[1:]).item())
    result = perplexity(model, ids, max_length=64, stride=32)
    assert result.tokens == 49 and result.value == pytest.approx(whole, rel=1e-5)
    for max_length, stride in [(16, 15), (16, 5), (7, 1), (50, 49)]:  # overlapping windows
        assert perplexity(model, ids, max_length, stride).tokens == 49
    chunks = [ids[i : i + 10] for i in range(0, 50, 10)]  # stride == max_length: independent
    with torch.no_grad():
        nll = sum(
            F.cross_entropy(model(c[None]).logits[0, :-1], c[1:], reduction="sum").item()
            for c in chunks
        )
    expected = math.exp(nll / 45)  # each chunk's first token has no context: 5 fewer scored
    separate = perplexity(model, ids, max_length=10, stride=10)
    assert separate.tokens == 45 and separate.value == pytest.approx(expected, rel=1e-5)


def test_calibration_windows_are_seeded_and_checked():
    ids = torch.arange(100)
    first = calibration_batches(ids, seq_len=10, samples=4, batch_size=3, seed=5)
    again = calibration_batches(ids, seq_len=10, samples=4, batch_size=3, seed=5)
    assert [b["input_ids"].tolist() for b in first] == [b["input_ids"].tolist() for b in again]
    rows = torch.cat([b["input_ids"] for b in first])
    assert rows.shape == (4, 10) and all(int(r[0]) % 10 == 0 for r in rows)
    assert len(calibration_batches(ids, 10, 50, 4)) == 3  # only 10 windows: all of them
    with pytest.raises(ValueError, match="--seq-len 200: the calibration text holds only 100"):
        calibration_batches(ids, 200, 4, 4)
    with pytest.raises(ValueError, match="--samples must be at least 1\nbut got 0"):
        calibration_batches(ids, 10, 0, 4)


def test_bad_input_exits_with_a_message(workspace, capsys, tmp_path):
    model, text = str(workspace / "model"), str(workspace / "text.txt")
    cases = [
        (["eval", model, "--data", str(tmp_path / "none.txt")], "--data .*none.txt: no such file"),
        (["compress", model, "--data", text, "--out", str(tmp_path), "--seq-len", "5000"],
         "--seq-len 5000: the calibration text holds only"),
        (["compress", model, "--data", text, "--out", str(tmp_path), "--ratio", "1.5"],
         "ratio"),
        (["compress", model, "--data", text, "--out", str(tmp_path), "--option", "max_iter"],
         "expected KEY=VALUE"),
        (["compress", model, "--data", text, "--out", str(tmp_path), "--budget", "bytes",
          "--allocation", "global", "--quantize", "int8"],
         "--quantize with --budget bytes: .*\nbut got --quantize int8; use one or the other"),
        (["compress", model, "--data", text, "--out", str(tmp_path), "--scheme", "int8"],
         "--scheme int8 is the 8-bit scheme of --budget bytes\nbut got --budget params"),
        (["compress", model, "--data", text, "--out", str(tmp_path), "--quantize", "int4"],
         "--quantize int4: torchao does not run it on cpu for torch.float32 weights\n"
         "schemes that run there: int8, int8-dynamic"),
        (["compress", model, "--data", text, "--out", str(tmp_path), "--weighting", "fisher",
          "--method", "svd"], "weighting='fisher' is measured during corrective recovery"),
    ]  # fmt: skip
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2
        assert __import__("re").search(message, capsys.readouterr().err), argv
    assert not (tmp_path / "torch_lowrank.json").exists()
    compressed = tmp_path / "compressed"
    tl.save_pretrained(torch.nn.Linear(2, 2), compressed)
    with pytest.raises(SystemExit):
        main(["compress", str(compressed), "--data", text, "--out", str(tmp_path / "x")])
    assert "already compressed" in capsys.readouterr().err
