"""The ``openxlstm`` command: ``train``, ``generate``, ``eval`` (also lm-evaluation-harness tasks), ``plot``,
``experiment``, ``export onnx``, ``forecast`` / ``forecast-train`` (time series) and ``serve`` (an
OpenAI-compatible server).

Every mistake in the input (an option out of range, a missing or corrupt checkpoint, empty data, a
mismatched vocabulary, a run directory in use) ends with one line ``error: ...`` on stderr and exit status 2,
never a traceback; the line names the option or file and what is allowed. Genuine bugs keep their traceback.
Every option's ``--help`` line says what it does and its default.

``generate`` and ``eval`` read a model with ``--checkpoint`` (an ``openxlstm train`` run) or ``--model`` (a
pretrained model: transformers' ``xLSTMForCausalLM`` directory such as xLSTM-7B's, the authors'
``xlstm_large`` layout, or a run too), both through ``openxlstm.io.load_pretrained``; ``train --init DIR``
fine-tunes such a model.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

import numpy as np

from .data import load_data
from .data.dataset import TOKEN_FILE_SUFFIXES
from .errors import UserError
from .evaluate import evaluate_contexts, format_table
from .experiments import cli as experiments_cli
from .forecasting import cli as forecasting_cli
from .serving import cli as serving_cli
from .generation import generate
from .models import LanguageModel
from .device import DEVICE_RE, resolve_device
from .integrations.lm_eval_cli import add_harness_arguments, run_harness
from .io import load_pretrained
from .io.run import read_meta, resolve_checkpoint
from .train import Preempted, TrainConfig, train
from .options import add_options, arg_type, given_options, int_range, number
from .train.config import BIN_DTYPES
from .train.metrics import plot_losses

# flags whose value is fixed by the checkpoint when resuming
_MODEL_FIELDS = ("arch", "model", "preset", "size", "init", "data", "tokenizer", "val_fraction", "bin_dtype",
                 "pack_documents")
# generate / eval --dtype: the dtype the weights are loaded in (auto: the checkpoint's)
LOAD_DTYPES = ("auto", "float32", "bfloat16", "float16")
# flags that a resumed run does not take from the checkpoint: how it is launched now decides
_LAUNCH_FIELDS = ("fsdp", "stop_at", "overwrite")
PLOT_FORMATS = (".png", ".pdf", ".svg")


class _HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help when the text does not state its default already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and action.option_strings and action.nargs != 0 and not action.required
                and action.default not in (None, argparse.SUPPRESS, False)):
            text += " (default: %(default)s)"
        return text.strip()

    def _format_action(self, action):
        if action.help is None and action.option_strings and action.default not in (None, argparse.SUPPRESS):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: openxlstm train: argument --lr: ...``, exit status 2 via
    ``main``), whose float options refuse nan and inf, and whose help shows every default. Subcommand parsers
    (the experiments' included) are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("type", float, _finite_float)

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


_DEVICE = ((lambda v: DEVICE_RE.match(v) is not None), "auto, cpu, cuda or cuda:N")
_positive_int = arg_type(int_range(1), int)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a language model (no arguments: a small byte-level xLSTM on a "
                                     "built-in corpus, ~6 minutes on 2 idle CPU cores)")
    add_options(p, TrainConfig)
    p.add_argument("--resume", nargs="?", const="auto",
                   help="continue from the latest checkpoint of --out, or of the given run/checkpoint directory "
                        "(default: a fresh run)")


def _model_args(p) -> None:
    """--checkpoint or --model (exactly one), and --dtype, of generate and eval."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", metavar="DIR",
                   help="run directory or checkpoint directory of openxlstm train (no default: give --checkpoint "
                        "or --model)")
    g.add_argument("--model", metavar="DIR",
                   help="pretrained model directory: transformers' xLSTMForCausalLM (e.g. xLSTM-7B, downloaded "
                        "with huggingface-cli download NX-AI/xLSTM-7b --local-dir DIR), the authors' xlstm_large "
                        "layout, or an openxlstm run (no default: give --model or --checkpoint)")
    p.add_argument("--dtype", choices=LOAD_DTYPES, default="auto",
                   help="dtype the weights are loaded in (default: auto, the dtype stored in the checkpoint; float32 "
                        "for openxlstm runs)")


def _gen_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text (or token ids) from a checkpoint or pretrained model")
    _model_args(p)
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text (repeat for a batch); for a model of token ids (trained on a token file "
                        "without a tokenizer), ids separated by spaces or commas, e.g. '17 4 99'")
    p.add_argument("--max-new-tokens", type=arg_type(int_range(0), int), default=200, help="tokens generated per prompt")
    p.add_argument("--temperature", type=arg_type(number(0), float), default=0.8, help="sampling temperature, 0 for greedy")
    p.add_argument("--top-k", type=_positive_int, default=None,
                   help="sample from the K likeliest tokens only (default: all)")
    p.add_argument("--top-p", type=arg_type(number(0, True, 1), float), default=None,
                   help="nucleus sampling: the smallest set of tokens whose probability reaches P, in (0, 1] "
                        "(default: all)")
    p.add_argument("--seed", type=arg_type(int_range(0, 2**63 - 1), int), default=None,
                   help="seed: the same seed gives the same text (default: a random one)")
    p.add_argument("--stop", default=None,
                   help="stop a sample when this text appears; backslash escapes are read, e.g. \\n\\n for a "
                        "blank line (default: none)")
    p.add_argument("--device", type=arg_type(_DEVICE), default="cpu", help="cpu, cuda, cuda:N or auto")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="validation loss / perplexity at several context lengths, or "
                                    "lm-evaluation-harness tasks with --tasks")
    _model_args(p)
    p.add_argument("--data", default=None,
                   help="text or token data (default: the checkpoint's training data; for a pretrained model "
                        "without a training record, the built-in corpus through the model's tokenizer.json)")
    p.add_argument("--context", default="512,2048,8192", help="comma-separated context lengths in tokens")
    p.add_argument("--split", choices=["val", "all"], default="val", help="score the validation split or all data")
    p.add_argument("--bin-dtype", choices=BIN_DTYPES, default=None,
                   help="dtype of a raw .bin token file (default: the run's, else uint16 for vocabularies up to "
                        "65,536 and uint32 above)")
    p.add_argument("--max-tokens", type=_positive_int, default=65536,
                   help="tokens scored per context, spread evenly over the split")
    p.add_argument("--device", type=arg_type(_DEVICE), default="cpu", help="cpu, cuda, cuda:N or auto")


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a model for other runtimes (onnx: prefill.onnx and step.onnx)")
    fmt = p.add_subparsers(dest="format", required=True)
    o = fmt.add_parser("onnx", help="prefill.onnx (input_ids (B, S) -> logits, state) and step.onnx (a token and the "
                                    "state -> logits, state), batch and length dynamic; needs "
                                    "pip install 'openxlstm[onnx]'")
    _model_args(o)
    o.add_argument("--out", required=True, help="output directory, new or empty (no default)")
    o.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (default: refuse)")


def _plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="plot the loss curves of one or more runs into an image")
    p.add_argument("runs", nargs="+", help="run directories (holding metrics.csv)")
    p.add_argument("--out", required=True, help=f"image path ({', '.join(PLOT_FORMATS)})")
    p.add_argument("--title", default="", help="plot title (default: none)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="openxlstm", description="Train xLSTM language models, generate, evaluate, and run the paper's experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _gen_parser(sub)
    _eval_parser(sub)
    add_harness_arguments(sub.choices["eval"])
    _export_parser(sub)
    _plot_parser(sub)
    experiments_cli.add_parser(sub)
    forecasting_cli.add_parser(sub)
    serving_cli.add_parser(sub)
    return parser


# -------------------------------------------------------------------------------------------------------
def _read_model_config(text: str) -> tuple[Optional[str], dict]:
    """(arch or None, config dict) from a JSON file or inline JSON; a checkpoint's config.json also works."""
    src = Path(text)
    inline = text.lstrip().startswith(("{", "["))
    try:
        raw = text if inline or not src.is_file() else src.read_text()
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        what = "text" if inline or not src.is_file() else f"file {text!r}"
        raise UserError(f"--config: invalid JSON in {what} ({e}); pass a JSON file path or inline JSON") from None
    except OSError as e:
        raise UserError(f"--config: cannot read {text!r} ({e})") from None
    if not isinstance(data, dict):
        raise UserError("--config must hold a JSON object of model config fields")
    if "model" in data and "arch" in data:
        return data["arch"], data["model"]
    return None, data


def _train_config(args) -> tuple:
    given = given_options(args, TrainConfig)
    if args.model is not None:
        arch, model = _read_model_config(args.model)
        if arch is not None and given.setdefault("arch", arch) != arch:
            raise UserError(f"--config holds a {arch} model but --arch is {given['arch']}")
        given["model"] = model
    if args.model is not None and args.preset is not None:
        raise UserError("use either --config or --preset, not both")
    if args.init is not None and args.arch is not None:  # the other model choices: train.app.check_init
        raise UserError(f"--init takes the architecture and model config from {args.init!r}: leave out --arch")
    if args.resume is None:
        return TrainConfig(**given), None
    source = args.resume if args.resume != "auto" else given.get("out", TrainConfig.out)
    ckpt = resolve_checkpoint(source)
    saved = TrainConfig.from_dict(read_meta(ckpt).get("train", {}))
    for name in _MODEL_FIELDS:
        if name in given and given[name] != getattr(saved, name):
            raise UserError(f"--{name.replace('_', '-')} differs from the checkpoint's; a resumed run keeps its "
                            f"model and data")
    if "out" not in given and args.resume != "auto":
        given["out"] = str(ckpt.parent if (ckpt.parent / "latest").is_file() else ckpt)
    inherited = {f.name: getattr(saved, f.name) for f in fields(TrainConfig) if f.name not in _LAUNCH_FIELDS}
    merged = {**inherited, **given}
    return TrainConfig(**merged), str(ckpt)


def cmd_train(args) -> int:
    cfg, resume = _train_config(args)
    result = train(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if "already_finished" in result:
        print(f"run {cfg.out} is finished: {result['already_finished']}")
        return 0
    bpb = "" if result["val_bpb"] is None else f", {result['val_bpb']:.4f} bits/byte"
    val = "" if result["val_loss"] is None else f"; validation loss {result['val_loss']:.4f}{bpb}"
    print(f"\ndone: {result['steps']} steps, {result['tokens']:,} tokens in {result['time_s'] / 60:.1f} min{val}")
    print(f"run directory: {result['checkpoint']} (checkpoint, metrics.csv, loss.png)")
    for prompt, text in result.get("samples", []):
        print(f"\n--- sample: {prompt!r}\n{prompt}{text}")
    return 0


def _load(args):
    """(model, tokenizer or None, info) of --checkpoint or --model in --dtype on --device (load_pretrained's
    info: "source", "arch", "path", "step", "train")."""
    path = args.checkpoint if args.checkpoint is not None else args.model
    if args.checkpoint is not None and not Path(path).expanduser().exists():
        raise UserError(f"checkpoint {path!r} does not exist")
    dtype = None if args.dtype == "auto" else args.dtype
    model, tokenizer, info = load_pretrained(path, dtype=dtype, device=resolve_device(args.device))
    if not isinstance(model, LanguageModel):
        raise UserError(f"{path!r} holds a {info.get('arch', type(model).__name__)} forecaster, not a language "
                        f"model: use openxlstm forecast --model {path}")
    return model, tokenizer, info


def _no_tokenizer(info: dict) -> str:
    """Why a loaded model reads token ids: it has no tokenizer."""
    if info.get("source", "openxlstm") == "openxlstm":
        return "it was trained on a token file without a tokenizer"
    return f"{info['path']!r} has no tokenizer.json"


def unescape(text: str, option: str) -> str:
    """``\\n``, ``\\t``, ``\\\\``, ``\\xNN``, ``\\uNNNN`` in a command-line string turned into the characters they
    name (shells pass them through as two characters); other characters, non-ASCII included, stay."""
    try:
        return re.sub(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[\\'\"abfnrtv0])",
                      lambda m: m.group(0).encode("ascii").decode("unicode_escape"), text)
    except UnicodeDecodeError as e:
        raise UserError(f"{option} {text!r}: invalid escape ({e.reason})") from None


def _check_utf8(text: str, option: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{option} holds bytes that are not UTF-8 text (set a UTF-8 locale, or pass the text "
                        f"as UTF-8)") from None
    return text


def _id_prompt(text: str, vocab_size: int, why: str) -> list[int]:
    """A model of token ids (without a tokenizer, ``why``) reads its prompt as ids: '17 4 99' or '17,4,99'."""
    parts = [t for t in re.split(r"[\s,]+", text.strip()) if t]
    if not parts or not all(re.fullmatch(r"\d+", t) for t in parts):
        raise UserError(f"--prompt {text!r}: this model reads token ids ({why}), so a prompt must be ids separated "
                        f"by spaces or commas, e.g. --prompt '17 4 99'")
    ids = [int(t) for t in parts]
    if max(ids) >= vocab_size:
        raise UserError(f"--prompt holds token id {max(ids)}, outside the model's vocabulary of {vocab_size} "
                        f"(ids 0 to {vocab_size - 1})")
    return ids


def cmd_generate(args) -> int:
    prompts = [_check_utf8(p, "--prompt") for p in args.prompt]
    stop = None if args.stop is None else unescape(_check_utf8(args.stop, "--stop"), "--stop")
    if stop == "":
        raise UserError("--stop is empty: give the text that ends a sample, e.g. --stop '\\n\\n'")
    model, tokenizer, info = _load(args)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              seed=args.seed)
    if tokenizer is None:  # a model of token ids: ids in, ids out
        if stop is not None:
            raise UserError(f"--stop needs a tokenizer, and this model reads token ids ({_no_tokenizer(info)})")
        rows = [_id_prompt(p, model.config.vocab_size, _no_tokenizer(info)) for p in prompts]
        outs = generate(model, rows, **kw)
        for j, (row, new) in enumerate(zip(rows, outs)):
            if len(rows) > 1:
                print(f"--- sample {j}")
            print(" ".join(str(t) for t in row + new))
        return 0
    kw.update(tokenizer=tokenizer, stop=stop)
    if len(prompts) == 1:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
        generate(model, prompts[0], on_text=lambda _, text: (sys.stdout.write(text), sys.stdout.flush()), **kw)
        sys.stdout.write("\n")
        return 0
    for j, (prompt, text) in enumerate(zip(prompts, generate(model, prompts, **kw))):
        print(f"--- sample {j}\n{prompt}{text}")
    return 0


def cmd_eval(args) -> int:
    if args.tasks is not None:
        return run_harness(args)
    try:
        contexts = [int(c) for c in args.context.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--context {args.context!r}: expected comma-separated integers, e.g. 512,2048,8192") from None
    if not contexts or min(contexts) < 1:
        raise UserError(f"--context {args.context!r}: expected positive context lengths, e.g. 512,2048,8192")
    model, tokenizer, meta = _load(args)
    train_cfg = meta.get("train") or {}
    data_path = args.data if args.data is not None else train_cfg.get("data")
    if tokenizer is None and (data_path is None or Path(data_path).suffix not in TOKEN_FILE_SUFFIXES):
        given = data_path or ("none (the built-in corpus is text)" if args.data is None else "none")
        raise UserError(f"this model reads token ids ({_no_tokenizer(meta)}): --data must be a token file "
                        f"({' or '.join(TOKEN_FILE_SUFFIXES)}) of its ids, got {given}")
    bin_dtype = args.bin_dtype or train_cfg.get("bin_dtype") or ("uint16" if model.config.vocab_size <= 2**16 else "uint32")
    # the run's packing choice; a run from before packing was trained (and is resumed) unpacked, as train does
    pack = train_cfg.get("pack_documents", False if train_cfg and meta.get("source") == "openxlstm" else None)
    data = load_data(data_path, tokenizer, train_cfg.get("val_fraction", 0.05), bin_dtype, pack)
    tokens = data.val if args.split == "val" else np.concatenate([data.train, data.val])
    starts = data.val_starts if args.split == "val" or data.val_starts is None else np.concatenate(
        [data.train_starts, data.val_starts + len(data.train)])
    top = int(tokens.max())
    if top >= model.config.vocab_size:
        raise UserError(f"the data holds token id {top}, outside the model's vocabulary of {model.config.vocab_size}")
    longest = max(contexts)
    if len(tokens) < longest + 1:
        raise UserError(f"context {longest} is larger than the evaluation data ({len(tokens):,} tokens); "
                        f"use --split all, more data or shorter contexts")
    source = meta.get("source", "openxlstm")
    where = (f"step {meta['step']}" if meta.get("step") is not None else
             f"{source} format" if source != "openxlstm" else "step unknown")
    print(f"{meta.get('arch', 'model')} checkpoint {meta.get('path', '?')} ({where}); data: {data.description}")
    rows = evaluate_contexts(model, tokens, contexts, max_tokens=args.max_tokens,
                             device=next(model.parameters()).device, bytes_per_token=data.bytes_per_token,
                             doc_starts=starts)
    print(format_table(rows))
    return 0


def cmd_export(args) -> int:
    from .integrations.onnx import export_onnx

    path = args.checkpoint if args.checkpoint is not None else args.model
    model, _, _ = _load(argparse.Namespace(checkpoint=args.checkpoint, model=args.model, dtype="float32", device="cpu"))
    out = export_onnx(model, args.out, overwrite=args.overwrite)
    print(f"{out}: prefill.onnx, step.onnx, onnx.json (from {path})")
    return 0


def cmd_plot(args) -> int:
    out = Path(args.out)
    if out.suffix.lower() not in PLOT_FORMATS:
        raise UserError(f"--out {args.out!r}: the image must end in {', '.join(PLOT_FORMATS)}")
    if out.is_dir():
        raise UserError(f"--out {args.out!r} is a directory; name the image file")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {args.out!r} exists; add --overwrite to replace it, or choose another name")
    if not out.parent.is_dir():
        raise UserError(f"--out {args.out!r}: the folder {str(out.parent)!r} does not exist")
    runs = {}
    for run in args.runs:
        csv = Path(run) / "metrics.csv"
        if not csv.is_file():
            raise UserError(f"{run!r} has no metrics.csv (pass run directories written by openxlstm train)")
        label = Path(run).name if Path(run).name not in runs else run
        runs[label] = csv
    if plot_losses(runs, out, args.title) is None:
        raise UserError("plotting needs matplotlib: pip install matplotlib")
    print(args.out)
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "export": cmd_export, "plot": cmd_plot,
            "experiment": experiments_cli.run, "forecast": forecasting_cli.run, "forecast-train": forecasting_cli.run,
            "serve": serving_cli.run}


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Preempted as e:
        return e.exit_status
    except BrokenPipeError:  # the reader of our output went away (`... | head`): stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not raise again
        return 0


__all__ = ["main", "build_parser"]
