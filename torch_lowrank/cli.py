"""The command line: ``python -m torch_lowrank compress`` and ``python -m torch_lowrank eval``.

``compress`` loads a Hugging Face causal language model and its tokenizer from a local
directory, cuts a text file into calibration windows, runs :func:`~torch_lowrank.compress`,
prints the report and saves the model (:func:`~torch_lowrank.save_pretrained`), the tokenizer
and the report. ``eval`` prints the perplexity of a model directory, dense or compressed, on a
text file with the sliding-window protocol of the Hugging Face perplexity guide. Needs the ``hf``
extra (``pip install 'torch_lowrank[hf]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .hub import INFO_FILE, from_pretrained, require, save_pretrained
from .options import METHODS
from .pipeline import compress
from .quantize import SCHEMES, available_schemes, quantization_of, quantize_factors_
from .settings import BUDGETS, BYTE_SCHEMES
from .text import Perplexity, calibration_batches, perplexity

__all__ = ["Perplexity", "build_parser", "calibration_batches", "main", "perplexity"]

EPILOG = """\
examples:
  python -m torch_lowrank compress ./my-llm --data calib.txt --ratio 0.4 --out ./my-llm-0.4
  python -m torch_lowrank compress ./my-llm --data calib.txt --ratio 0.3 --method linear \\
      --allocation global --allocate-by kl --out ./my-llm-0.3
  python -m torch_lowrank compress ./my-llm --data calib.txt --ratio 0.4 --weighting fisher \\
      --quantize int8 --out ./my-llm-0.4-int8
  python -m torch_lowrank eval ./my-llm-0.4 --data test.txt
"""


def _text(path: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    return Path(path).read_text(encoding="utf-8")


def _tokens(tokenizer: Any, text: str, path: str) -> Tensor:
    """Every token of ``text`` (read from ``path``), as one 1-D tensor."""
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
    if ids.numel() < 2:
        raise ValueError(f"--data {path}: the text holds {ids.numel()} tokens; at least 2 needed")
    return ids


def _load(directory: Path, device: str) -> nn.Module:
    """A dense Hugging Face causal LM, or a compressed directory by :func:`from_pretrained`."""
    if (directory / INFO_FILE).is_file():
        model = from_pretrained(directory)
    else:
        transformers = require("transformers", "python -m torch_lowrank")
        model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    return model.to(device).eval()


def _tokenizer(directory: Path) -> Any:
    return require("transformers", "python -m torch_lowrank").AutoTokenizer.from_pretrained(
        directory
    )


def _option(text: str) -> dict[str, Any]:
    """``KEY=VALUE`` as ``{KEY: VALUE}``, VALUE read as JSON when it is (numbers, true/false),
    else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. max_iter=50\nbut got {text!r}")
    try:
        return {key: json.loads(value)}
    except json.JSONDecodeError:
        return {key: value}


def _run_compress(args: argparse.Namespace) -> int:
    source, out = Path(args.model_dir), Path(args.out)
    if (source / INFO_FILE).is_file():
        raise ValueError(f"MODEL_DIR {source} is already compressed; give the dense model")
    if args.quantize is not None and args.budget == "bytes":
        raise ValueError(
            "--quantize with --budget bytes: the byte budget already quantizes the layers it "
            f"chooses (in --scheme)\nbut got --quantize {args.quantize}; use one or the other"
        )
    if args.scheme is not None and args.budget != "bytes":
        raise ValueError(
            f"--scheme {args.scheme} is the 8-bit scheme of --budget bytes\n"
            f"but got --budget {args.budget}"
        )
    text = _text(args.data)
    tokenizer = _tokenizer(source)
    ids = _tokens(tokenizer, text, args.data)
    data = calibration_batches(ids, args.seq_len, args.samples, args.batch_size, args.seed)
    windows = sum(len(batch["input_ids"]) for batch in data)
    sys.stderr.write(f"calibration: {windows} windows of {args.seq_len} tokens\n")
    model = _load(source, args.device)
    if args.quantize is not None:
        _check_quantize(args.quantize, model)
    spec = {
        k: getattr(args, k) for k in ("ratio", "rank", "energy") if getattr(args, k) is not None
    }
    options = {key: value for option in args.option for key, value in option.items()}
    torch.manual_seed(args.seed)
    model, report = compress(
        model,
        data,
        method=args.method,
        corrective=not args.no_corrective,
        options=options,
        progress=not args.no_progress,
        refine=args.refine or None,
        include=args.include,
        exclude=args.exclude,
        add_bias=args.add_bias,
        samples=args.reservoir,
        allocation=args.allocation,
        allocate_by=args.allocate_by,
        budget=args.budget,
        scheme=args.scheme,
        weighting=args.weighting,
        round_to=args.round_to,
        min_rank=args.min_rank,
        max_rank=args.max_rank,
        **(spec or {"ratio": 0.4}),
    )
    sys.stdout.write(f"{report}\n")
    if args.quantize is not None:
        quantize_factors_(model, args.quantize)
    quantized = quantization_of(model)
    if quantized:
        schemes = ", ".join(sorted(set(quantized.values())))
        sys.stdout.write(f"{len(quantized)} layers store their weights in {schemes}\n")
    save_pretrained(model, out, report=report)
    tokenizer.save_pretrained(out)
    (out / "report.json").write_text(report.to_json(indent=2) + "\n")
    sys.stdout.write(
        f"{report.params_after:,} of {report.params_before:,} parameters kept in the compressed "
        f"layers; saved to {out}\n"
    )
    return 0


def _check_quantize(scheme: str, model: nn.Module) -> None:
    """Refuse ``--quantize scheme`` before compressing when torchao cannot run it where the
    model is (an ``ImportError`` with the install command when torchao is missing)."""
    weight = next(model.parameters())
    runs = available_schemes(weight.device, weight.dtype)
    if scheme not in runs:
        raise ValueError(
            f"--quantize {scheme}: torchao does not run it on {weight.device} for {weight.dtype} "
            f"weights\nschemes that run there: {', '.join(runs) or 'none'}"
        )


def _run_eval(args: argparse.Namespace) -> int:
    directory = Path(args.model_dir)
    text = _text(args.data)
    tokenizer = _tokenizer(directory)
    ids = _tokens(tokenizer, text, args.data)
    model = _load(directory, args.device)
    config = getattr(model, "config", None)
    positions = getattr(config, "n_positions", None) or getattr(
        config, "max_position_embeddings", None
    )
    max_length = args.max_length or min(positions or 1024, 1024)
    stride = args.stride or max(max_length // 2, 1)
    result = perplexity(model, ids, max_length, stride, progress=not args.no_progress)
    sys.stdout.write(
        f"perplexity {result.value:.4f} on {result.tokens} tokens of {args.data} "
        f"(max_length {max_length}, stride {stride})\n"
    )
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a local model directory")
    parser.add_argument("--data", required=True, metavar="FILE", help="a UTF-8 text file")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument(
        "--device", default=device, help="where the model runs (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _subparser(commands: Any, name: str, summary: str, description: str) -> Any:
    return commands.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, 88),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _compress_arguments(c: argparse.ArgumentParser) -> None:
    _common(c)
    c.add_argument("--out", required=True, metavar="OUT_DIR", help="where to save")
    keep = c.add_argument_group("how much to keep (one of; default: --ratio 0.4)")
    one = keep.add_mutually_exclusive_group()
    one.add_argument(
        "--ratio", type=float, metavar="R", help="fraction of each layer's weights kept"
    )
    one.add_argument("--rank", type=int, metavar="N", help="the same rank for every layer")
    one.add_argument("--energy", type=float, metavar="E", help="fraction of output variance kept")
    how = c.add_argument_group("recovery")
    how.add_argument("--method", choices=METHODS, default="relu", help="default: %(default)s")
    how.add_argument(
        "--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
        help="a solver option of the method, e.g. max_iter=50 (repeatable)",
    )  # fmt: skip
    how.add_argument(
        "--no-corrective", action="store_true",
        help="recover each layer from its own input, in one pass (faster, less accurate)",
    )  # fmt: skip
    how.add_argument("--refine", action="store_true", help="refine each block after its solve")
    how.add_argument(
        "--add-bias", choices=("yes", "no"),
        help="give bias-free layers a bias (default: no, the architecture decides)",
    )  # fmt: skip
    how.add_argument(
        "--weighting", choices=("fisher",),
        help="weigh each layer's output errors by their effect on the loss (one backward pass "
        "per batch; needs corrective recovery and a method other than svd)",
    )  # fmt: skip
    how.add_argument(
        "--reservoir", type=int, default=4096, metavar="N",
        help="input rows kept per layer for the activation-aware methods (default: %(default)s)",
    )  # fmt: skip
    alloc = c.add_argument_group("allocation")
    alloc.add_argument(
        "--allocation", choices=("uniform", "global"), default="uniform",
        help="global: all ranks chosen together under the --ratio budget (default: %(default)s)",
    )  # fmt: skip
    alloc.add_argument(
        "--allocate-by", choices=("spectra", "kl", "mse"), default="spectra",
        help="what global allocation weighs each layer's error by (default: %(default)s)",
    )  # fmt: skip
    alloc.add_argument(
        "--budget", choices=BUDGETS, default="params",
        help="what global allocation counts; bytes: weights at their precision, so it also "
        "chooses which layers to store in 8 bits (needs torchao; default: %(default)s)",
    )  # fmt: skip
    alloc.add_argument(
        "--scheme", choices=BYTE_SCHEMES,
        help="the 8-bit scheme --budget bytes may choose (default: int8)",
    )  # fmt: skip
    alloc.add_argument("--round-to", type=int, default=1, metavar="N", help="ranks multiple of N")
    alloc.add_argument("--min-rank", type=int, default=1, metavar="N", help="default: 1")
    alloc.add_argument("--max-rank", type=int, metavar="N", help="default: none")
    alloc.add_argument(
        "--include", action="append", metavar="PATTERN",
        help="only the layers matching this fnmatch pattern (repeatable)",
    )  # fmt: skip
    alloc.add_argument(
        "--exclude", action="append", metavar="PATTERN",
        help="leave matching layers dense (repeatable; default: lm_head)",
    )  # fmt: skip
    quant = c.add_argument_group("quantization (needs torchao)")
    quant.add_argument(
        "--quantize", choices=tuple(SCHEMES), metavar="SCHEME",
        help="after compression, store the factor layers' weights in SCHEME: "
        f"{', '.join(SCHEMES)} (those torchao runs on --device)",
    )  # fmt: skip
    data = c.add_argument_group("calibration")
    data.add_argument(
        "--seq-len",
        type=int,
        default=128,
        metavar="N",
        help="tokens per window (default: %(default)s)",
    )
    data.add_argument(
        "--samples", type=int, default=64, metavar="N", help="windows drawn (default: %(default)s)"
    )
    data.add_argument(
        "--batch-size",
        type=int,
        default=4,
        metavar="N",
        help="windows per forward (default: %(default)s)",
    )
    data.add_argument(
        "--seed", type=int, default=0, help="which windows are drawn (default: %(default)s)"
    )
    c.set_defaults(run=_run_compress)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m torch_lowrank``.

    Example:
        >>> args = build_parser().parse_args(["eval", "model", "--data", "test.txt"])
        >>> args.command, args.stride
        ('eval', None)
    """
    parser = argparse.ArgumentParser(
        prog="python -m torch_lowrank",
        description=textwrap.fill(
            "Compress a Hugging Face causal language model by data-driven low-rank recovery "
            "from calibration text, and measure perplexity. Run a command with --help for its "
            "options.",
            88,
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _compress_arguments(
        _subparser(
            commands,
            "compress",
            "compress MODEL_DIR and save it to --out",
            "Compress the causal language model in MODEL_DIR (loaded with its tokenizer by "
            "transformers) on windows of the text in --data, print the report, and save the "
            "model, the tokenizer and report.json to --out. Load the result with "
            "torch_lowrank.from_pretrained(OUT_DIR) or evaluate it with the eval command.",
        )  # fmt: skip
    )
    e = _subparser(
        commands, "eval", "print the perplexity of MODEL_DIR on --data",
        "Print the perplexity of the causal language model in MODEL_DIR (dense, or compressed "
        "by the compress command) on the text in --data: windows of --max-length tokens start "
        "every --stride tokens, and the tokens a window shares with the previous one are only "
        "context, so every token is scored once (the protocol of the Hugging Face perplexity "
        "guide).",
    )  # fmt: skip
    _common(e)
    e.add_argument(
        "--max-length", type=int, metavar="N",
        help="tokens per window (default: the model's context, at most 1024)",
    )  # fmt: skip
    e.add_argument("--stride", type=int, metavar="N", help="tokens between windows (default: half)")
    e.set_defaults(run=_run_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m torch_lowrank`` with ``argv`` (default: the process arguments); a bad
    argument or input exits with status 2 and a message naming it.

    Example:
        >>> try:
        ...     main(["eval", "no-such-model", "--data", "no-such-file.txt"])
        ... except SystemExit as exit:
        ...     print(exit.code)
        2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "add_bias", None) is not None:
        args.add_bias = args.add_bias == "yes"
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError, ImportError) as err:
        parser.exit(2, f"python -m torch_lowrank {args.command}: error: {err}\n")
