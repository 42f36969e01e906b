"""The ``openxlstm`` command: ``train``, ``generate``, ``eval``, ``plot`` and ``experiment``.

Bad input (a missing or corrupt checkpoint, empty data, a mismatched vocabulary, impossible flags) ends
with one line ``error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

import numpy as np

from .data import load_data
from .errors import UserError
from .evaluate import evaluate_contexts, format_table
from .experiments import cli as experiments_cli
from .generation import generate
from .train.checkpoint import load_model, read_meta, resolve_checkpoint
from .train.distributed import DistInfo
from .train.engine import resolve_device
from .train.loop import TrainConfig, train
from .train.metrics import plot_losses

# flags whose value is fixed by the checkpoint when resuming
_MODEL_FIELDS = ("arch", "model", "preset", "size", "data", "tokenizer", "val_fraction", "bin_dtype")
# flags that a resumed run does not take from the checkpoint: how it is launched now decides
_LAUNCH_FIELDS = ("fsdp", "stop_at")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a language model (no arguments: a small byte-level xLSTM on a "
                                     "built-in corpus, ~4 minutes on 2 CPU cores)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=["xlstm", "lstm", "transformer"], help="architecture (default xlstm)")
    g.add_argument("--config", help="model config: a JSON file or inline JSON of the architecture's config fields")
    g.add_argument("--preset", help="xLSTM paper model SIZE[:RATIO], e.g. 125m:7:1 or 350m:1:0")
    g.add_argument("--size", type=_positive_int, help="baselines: target parameter count (default: equal to the "
                                                     "default xLSTM)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="a text file or folder, or a token file (.bin uint16 / .npy); default: the "
                                  "built-in corpus (Python docs + stdlib sources)")
    g.add_argument("--tokenizer", help="'byte' (default for text), 'bpe:N' (train a BPE of vocabulary N), or a "
                                       "tokenizer.json path")
    g.add_argument("--val-fraction", type=float, help="held-out validation fraction (default 0.05)")
    g.add_argument("--bin-dtype", help="dtype of raw .bin token files (default uint16)")
    g = p.add_argument_group("training")
    g.add_argument("--out", help="run directory (default runs/default)")
    g.add_argument("--max-steps", type=_positive_int, help="optimizer steps (default 1200)")
    g.add_argument("--max-time", type=float, help="stop (with a checkpoint) after this many minutes")
    g.add_argument("--stop-at", type=_positive_int, help="stop at this step as if interrupted (resume later)")
    g.add_argument("--batch-size", type=_positive_int, help="global batch in sequences (default 16)")
    g.add_argument("--grad-accum", type=_positive_int, help="gradient accumulation steps (default 1)")
    g.add_argument("--seq-len", type=_positive_int, help="training context in tokens (default 128)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    g.add_argument("--min-lr", type=float, help="final learning rate (default lr/10)")
    g.add_argument("--warmup", type=int, help="warm-up steps (default 60)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    g.add_argument("--grad-clip", type=float, help="gradient norm clip, 0 for none (default 1.0)")
    g.add_argument("--seed", type=int, help="seed (default 0)")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], help="autocast dtype (auto: bf16 on GPU)")
    g.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the model (each block under --fsdp); the first steps are slower. BACKEND: "
                        "inductor (default), or another torch.compile backend such as aot_eager")
    g.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute each block's forward during backward instead of keeping its activations: "
                        "less memory for about one more forward pass")
    g.add_argument("--fsdp", action="store_true", default=None,
                   help="under torchrun: shard parameters, gradients and optimizer state over the processes "
                        "(FSDP2; bf16 parameters on GPU) instead of DDP; checkpoints are sharded (DCP)")
    g.add_argument("--eval-every", type=_positive_int, help="validate every N steps (default 200)")
    g.add_argument("--eval-tokens", type=_positive_int, help="validation tokens per evaluation (default 65536)")
    g.add_argument("--log-every", type=_positive_int, help="metrics CSV row every N steps (default 10)")
    g.add_argument("--save-every", type=_positive_int, help="checkpoint every N steps (default 400)")
    g.add_argument("--samples", type=int, help="samples generated at the end (default 3)")
    g.add_argument("--sample-tokens", type=int, help="tokens per sample (default 160)")
    g.add_argument("--resume", nargs="?", const="auto", help="continue from the latest checkpoint of --out, or of "
                                                             "the given run/checkpoint directory")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def _gen_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", default=None, help="stop a sample when this string appears")
    p.add_argument("--device", default="cpu")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="validation loss / perplexity at several context lengths")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--data", default=None, help="text or token data (default: the checkpoint's training data)")
    p.add_argument("--context", default="512,2048,8192", help="comma-separated context lengths")
    p.add_argument("--split", choices=["val", "all"], default="val", help="score the validation split or all data")
    p.add_argument("--max-tokens", type=_positive_int, default=65536, help="target tokens scored per context")
    p.add_argument("--device", default="cpu")


def _plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="plot the loss curves of one or more runs into a PNG")
    p.add_argument("runs", nargs="+", help="run directories (holding metrics.csv)")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--title", default="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openxlstm", description="Train xLSTM language models, generate, evaluate, and run the paper's experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _gen_parser(sub)
    _eval_parser(sub)
    _plot_parser(sub)
    experiments_cli.add_parser(sub)
    return parser


# -------------------------------------------------------------------------------------------------------
def _read_model_config(text: str) -> tuple[Optional[str], dict]:
    """(arch or None, config dict) from a JSON file or inline JSON; a checkpoint's config.json also works."""
    src = Path(text)
    try:
        raw = src.read_text() if src.is_file() else text
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        what = f"file {text!r}" if src.is_file() else "text"
        raise UserError(f"--config: invalid JSON in {what} ({e}); pass a JSON file path or inline JSON") from None
    except OSError as e:
        raise UserError(f"--config: cannot read {text!r} ({e})") from None
    if not isinstance(data, dict):
        raise UserError("--config must hold a JSON object of model config fields")
    if "model" in data and "arch" in data:
        return data["arch"], data["model"]
    return None, data


def _train_config(args) -> tuple:
    known = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in known and v is not None}
    if args.config is not None:
        arch, model = _read_model_config(args.config)
        if arch is not None and given.setdefault("arch", arch) != arch:
            raise UserError(f"--config holds a {arch} model but --arch is {given['arch']}")
        given["model"] = model
    if args.config is not None and args.preset is not None:
        raise UserError("use either --config or --preset, not both")
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
    if int(os.environ.get("RANK", "0")) == 0:
        bpb = "" if result["val_bpb"] is None else f", {result['val_bpb']:.4f} bits/byte"
        val = "" if result["val_loss"] is None else f"; validation loss {result['val_loss']:.4f}{bpb}"
        print(f"\ndone: {result['steps']} steps, {result['tokens']:,} tokens in {result['time_s'] / 60:.1f} min{val}")
        print(f"run directory: {result['checkpoint']} (checkpoint, metrics.csv, loss.png)")
        for prompt, text in result.get("samples", []):
            print(f"\n--- sample: {prompt!r}\n{prompt}{text}")
    return 0


def _load(checkpoint: str, device: str):
    return load_model(checkpoint, device=resolve_device(device, DistInfo()))


def cmd_generate(args) -> int:
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    model, tokenizer, _ = _load(args.checkpoint, args.device)
    if tokenizer is None:
        raise UserError("this checkpoint was trained on token ids without a tokenizer: it cannot read text prompts")
    kw = dict(tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop)
    if len(args.prompt) == 1:
        sys.stdout.write(args.prompt[0])
        sys.stdout.flush()
        generate(model, args.prompt[0], on_text=lambda _, text: (sys.stdout.write(text), sys.stdout.flush()), **kw)
        sys.stdout.write("\n")
        return 0
    for j, (prompt, text) in enumerate(zip(args.prompt, generate(model, list(args.prompt), **kw))):
        print(f"--- sample {j}\n{prompt}{text}")
    return 0


def cmd_eval(args) -> int:
    try:
        contexts = [int(c) for c in args.context.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--context {args.context!r}: expected comma-separated integers, e.g. 512,2048,8192") from None
    if not contexts or min(contexts) < 1:
        raise UserError("--context needs positive context lengths")
    model, tokenizer, meta = _load(args.checkpoint, args.device)
    train_cfg = meta.get("train", {})
    data_path = args.data if args.data is not None else train_cfg.get("data")
    data = load_data(data_path, tokenizer, train_cfg.get("val_fraction", 0.05), train_cfg.get("bin_dtype", "uint16"))
    tokens = data.val if args.split == "val" else np.concatenate([data.train, data.val])
    top = int(tokens.max())
    if top >= model.config.vocab_size:
        raise UserError(f"the data holds token id {top}, outside the model's vocabulary of {model.config.vocab_size}")
    longest = max(contexts)
    if len(tokens) < longest + 1:
        raise UserError(f"context {longest} is larger than the evaluation data ({len(tokens):,} tokens); "
                        f"use --split all, more data or shorter contexts")
    print(f"{meta['arch']} checkpoint {meta['path']} (step {meta.get('step')}); data: {data.description}")
    rows = evaluate_contexts(model, tokens, contexts, max_tokens=args.max_tokens,
                             device=next(model.parameters()).device, bytes_per_token=data.bytes_per_token)
    print(format_table(rows))
    return 0


def cmd_plot(args) -> int:
    runs = {}
    for run in args.runs:
        csv = Path(run) / "metrics.csv"
        if not csv.is_file():
            raise UserError(f"{run!r} has no metrics.csv")
        runs[Path(run).name] = csv
    if plot_losses(runs, Path(args.out), args.title) is None:
        raise UserError("plotting needs matplotlib: pip install matplotlib")
    print(args.out)
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "plot": cmd_plot,
            "experiment": experiments_cli.run}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


__all__ = ["main", "build_parser"]
