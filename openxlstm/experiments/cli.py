"""``openxlstm experiment grid|ablation|report|lra|speed|scaling``: the paper's experiments from the command line.

    openxlstm experiment grid --tasks parity,mqar --models "xlstm[0:1],xlstm[1:0]" --seeds 0,1 --out runs/fl
    openxlstm experiment ablation --steps 500 --out runs/ablation
    openxlstm experiment report --out runs/fl
    openxlstm experiment lra [--scale smoke|cpu|paper]        # Long Range Arena -> runs/lra
    openxlstm experiment speed [--scale smoke|cpu|paper]      # generation speed -> runs/speed
    openxlstm experiment scaling [--scale smoke|cpu|paper]    # scaling laws -> runs/scaling

Also runnable as ``python -m openxlstm.experiments ...`` (``__main__.py`` hands it to the main CLI). Cells
and rungs train through the training engine (``openxlstm/train/engine.py``), so ``--device``,
``--compile`` and ``--activation-checkpointing`` work here as for ``openxlstm train``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

import torch

from ..device import autocast_dtype, resolve_device
from ..errors import UserError
from ..options import add_options, arg_type, given_options, int_range, number
from ..train.config import TrainConfig
from . import forecasting as forecasting_experiment
from . import lra, scaling, speed
from .ablation import LADDER, run_ablation
from .zoo import PAPER_MODELS, SLSTM_INITS, canonical_name
from .mqar import MQARTask
from .runner import ALL_TASKS, SCHEDULES, RunOptions, grid_specs, run_grid, write_report


def _list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


_POS_INT = arg_type(int_range(1), int)
_POS_FLOAT = arg_type(number(0, lo_open=True), float)
_NONNEG_FLOAT = arg_type(number(0), float)
_SEED = arg_type(int_range(0, 2**63 - 1), int)
HARDWARE = ("device", "dtype", "compile", "activation_checkpointing")  # the training engine's options


def _add_run_options(p) -> None:
    """How cells / rungs run, the same flags as ``openxlstm train``'s (not part of a result's key in the CSV:
    keep one --out per device and dtype)."""
    add_options(p, TrainConfig, names=HARDWARE)


def _run_options(args) -> RunOptions:
    """The engine options given on the command line, the others at TrainConfig's defaults; a bad --device or
    --dtype is an error before any cell runs."""
    values = {name: getattr(TrainConfig, name) for name in HARDWARE}
    values.update(given_options(args, TrainConfig, HARDWARE))
    autocast_dtype(values["dtype"], resolve_device(values["device"]))
    return RunOptions(**values)


def _scale_overrides(parser, scales, options) -> None:
    """--NAME options (default None) that replace one field of the chosen --scale; each help names every
    scale's value. options: (name, type, what) rows."""
    for name, kind, what in options:
        parser.add_argument(f"--{name}", type=kind, default=None,
                            help=f"{what} (default: the --scale's, {_scale_values(scales, name.replace('-', '_'))})")


def _scale_values(scales: dict, field: str) -> str:
    """A field's value at each --scale, for a help text: "smoke 16, cpu 64, paper 128"."""
    def text(v) -> str:
        return ",".join(str(x) for x in v) if isinstance(v, tuple) else f"{v:g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{name} {text(getattr(scale, field))}" for name, scale in scales.items())


_MAX_MINUTES = "stop training each {} after this many minutes (default: no limit; the steps decide)"
_LOG_EVERY = "print the training loss every this many steps (default: %(default)s)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``experiment`` (grid, ablation, report, lra, speed, scaling) on an argparse subparsers object."""
    p = subparsers.add_parser("experiment", help="the paper's experiments: formal languages, MQAR, LM ablation, "
                                                 "Long Range Arena, inference speed, scaling laws")
    sub = p.add_subparsers(dest="experiment", required=True)

    g = sub.add_parser("grid", help="train and test a grid of tasks x models x seeds (resumable CSV, table, heat-map)")
    g.add_argument("--tasks", type=_list, default=list(ALL_TASKS),
                   help=f"comma-separated, from {','.join(ALL_TASKS)} (default: all)")
    g.add_argument("--models", type=_list, default=list(PAPER_MODELS),
                   help=f"comma-separated: xlstm[a:b], lstm, reslstm, transformer (default: {','.join(PAPER_MODELS)})")
    g.add_argument("--seeds", type=_ints, default=[0], help="comma-separated seeds (default: 0)")
    g.add_argument("--width", type=_POS_INT, default=64, help="embedding width of every model (default 64)")
    g.add_argument("--num-blocks", type=_POS_INT, default=2, help="blocks / layers of every model (default 2, as the paper)")
    g.add_argument("--steps", type=_POS_INT, default=1000, help="training steps per cell (default: %(default)s)")
    g.add_argument("--batch-size", type=_POS_INT, default=64, help="training sequences per step (default: %(default)s)")
    g.add_argument("--lr", type=_POS_FLOAT, default=1e-3, help="peak learning rate, AdamW (default: %(default)s)")
    g.add_argument("--weight-decay", type=_NONNEG_FLOAT, default=0.1,
                   help="AdamW weight decay on the weight matrices (default: %(default)s)")
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="learning rate after a linear warm-up over the first 5%% of the steps: 'cosine' decays to "
                        "10%% of --lr at the last step (default), 'constant' stays at --lr")
    g.add_argument("--slstm-init", choices=SLSTM_INITS, default="reference",
                   help="sLSTM forget-gate biases: 'reference' (depth-dependent, the default) or 'block0' (every sLSTM "
                        "block starts as the first one: most units forget fast; the parity recipe)")
    g.add_argument("--train-max-len", type=_POS_INT, default=40, help="train on input lengths 1..N (default 40)")
    g.add_argument("--test-lengths", default="41-256", help="test input lengths lo-hi (default 41-256)")
    g.add_argument("--supervision", choices=("prefix", "last"), default="prefix",
                   help="train classification tasks on every prefix's label (default) or on the final label only")
    g.add_argument("--eval-batches", type=_POS_INT, default=8,
                   help="test batches per cell, one input length each (default: %(default)s)")
    g.add_argument("--eval-batch-size", type=_POS_INT, default=64, help="sequences per test batch (default: %(default)s)")
    g.add_argument("--mqar-context", type=_POS_INT, default=64, help="MQAR: sequence length T (default: %(default)s)")
    g.add_argument("--mqar-pairs", type=_POS_INT, default=8, help="MQAR: key-value pairs N (default: %(default)s)")
    g.add_argument("--mqar-vocab", type=_POS_INT, default=64, help="MQAR: vocabulary size V (default: %(default)s)")
    g.add_argument("--max-minutes", type=_POS_FLOAT, default=None, help=_MAX_MINUTES.format("cell"))
    g.add_argument("--threads", type=_POS_INT, default=1, help="torch CPU threads (default: %(default)s)")
    g.add_argument("--log-every", type=_POS_INT, default=100, help=_LOG_EVERY)
    g.add_argument("--out", required=True, help="output folder (required, no default): results.csv (appended), "
                                                "results.md, heatmap.png")
    _add_run_options(g)

    a = sub.add_parser("ablation", help="the LM ablation ladder at equal budgets, in validation bits per byte")
    a.add_argument("--models", type=_list, default=list(LADDER),
                   help=f"comma-separated rungs, each a model name (default: {','.join(LADDER)})")
    a.add_argument("--width", type=_POS_INT, default=128, help="embedding width of every rung (default: %(default)s)")
    a.add_argument("--num-blocks", type=_POS_INT, default=8, help="blocks / layers of every rung (default: %(default)s)")
    a.add_argument("--seq-len", type=_POS_INT, default=128, help="training context in bytes (default: %(default)s)")
    a.add_argument("--batch-size", type=_POS_INT, default=16, help="training sequences per step (default: %(default)s)")
    a.add_argument("--steps", type=_POS_INT, default=500, help="training steps per rung (default: %(default)s)")
    a.add_argument("--lr", type=_POS_FLOAT, default=2e-3, help="peak learning rate, AdamW (default: %(default)s)")
    a.add_argument("--eval-tokens", type=_POS_INT, default=65536, help="validation bytes scored (default: %(default)s)")
    a.add_argument("--seed", type=_SEED, default=0, help="seed of the initialization and the batches (default: %(default)s)")
    a.add_argument("--max-minutes", type=_POS_FLOAT, default=None, help=_MAX_MINUTES.format("rung"))
    a.add_argument("--threads", type=_POS_INT, default=1, help="torch CPU threads (default: %(default)s)")
    a.add_argument("--log-every", type=_POS_INT, default=50, help=_LOG_EVERY)
    a.add_argument("--out", required=True, help="output folder (required, no default): ablation.csv (appended), "
                                                "ablation.md")
    _add_run_options(a)

    _add_lra_speed_scaling(sub)
    forecasting_experiment.add_parser(sub)

    r = sub.add_parser("report", help="rewrite results.md and heatmap.png from a grid's results.csv")
    r.add_argument("--out", required=True, help="the grid's output folder (required, no default)")
    r.add_argument("--aggregate", choices=("mean", "max"), default="mean",
                   help="heat-map: mean or max over seeds (default: %(default)s)")
    return p


def _scale_arg(p, default: str = "cpu") -> None:
    p.add_argument("--scale", choices=("smoke", "cpu", "paper"), default=default,
                   help="smoke: seconds (CI); cpu: the default, about an hour on 2 cores; paper: the paper's sizes, "
                        "for a GPU")


def _add_lra_speed_scaling(sub) -> None:
    p = sub.add_parser("lra", help="Long Range Arena: Retrieval, ListOps, Pathfinder, G-Image, RGB-Image (generated or "
                                   "shipped data; table with mean rank, PNG)")
    _scale_arg(p)
    p.add_argument("--tasks", type=_list, default=list(lra.TASK_NAMES),
                   help=f"comma-separated, from {','.join(lra.TASK_NAMES)} (default: all)")
    p.add_argument("--models", type=_list, default=list(lra.DEFAULT_MODELS),
                   help=f"comma-separated model zoo names (default: {','.join(lra.DEFAULT_MODELS)})")
    p.add_argument("--seeds", type=_ints, default=[0], help="comma-separated seeds (default: 0)")
    _scale_overrides(p, lra.SCALES, (("width", _POS_INT, "embedding width of every model"),
                                     ("num-blocks", _POS_INT, "blocks / layers of every model"),
                                     ("steps", _POS_INT, "training steps per cell"),
                                     ("batch-size", _POS_INT, "training examples per step"),
                                     ("lr", _POS_FLOAT, "peak learning rate, AdamW"),
                                     ("test-examples", _POS_INT, "test examples per cell")))
    p.add_argument("--max-minutes", type=_POS_FLOAT, default=None, help=_MAX_MINUTES.format("cell"))
    p.add_argument("--threads", type=_POS_INT, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--log-every", type=_POS_INT, default=50, help=_LOG_EVERY)
    p.add_argument("--out", default="runs/lra", help="output folder: lra.csv (appended), lra.md, lra.png "
                                                     "(default: %(default)s)")
    _add_run_options(p)

    v = sub.add_parser("speed", help="generation time against length (batch 1) and tokens/s against batch size, "
                                     "xLSTM[1:0], xLSTM[7:1], Transformer with KV cache")
    _scale_arg(v)
    v.add_argument("--models", type=_list, default=list(speed.MODELS),
                   help=f"comma-separated, from {','.join(speed.MODELS)} (default: all)")
    v.add_argument("--device", default="auto", help="where to measure: auto (the default: a GPU when present, else "
                                                    "the CPU), cpu, cuda, cuda:N")
    v.add_argument("--threads", type=_POS_INT, default=None, help="torch CPU threads (default: torch's)")
    v.add_argument("--out", default="runs/speed", help="output folder: speed.csv (appended), speed.md, speed.png "
                                                       "(default: %(default)s)")

    c = sub.add_parser("scaling", help="validation loss against parameters, training FLOPs and inference cost, "
                                       "xLSTM[1:0], xLSTM[7:1], Transformer; fitted power laws")
    _scale_arg(c)
    c.add_argument("--models", type=_list, default=list(scaling.ARCHS),
                   help=f"comma-separated architectures (default: {','.join(scaling.ARCHS)})")
    c.add_argument("--widths", type=_ints, default=None,
                   help=f"comma-separated embedding widths, one run each (default: the --scale's, "
                        f"{_scale_values(scaling.SCALES, 'widths')})")
    _scale_overrides(c, scaling.SCALES, (("num-blocks", _POS_INT, "blocks / layers of every run"),
                                         ("seq-len", _POS_INT, "training context in bytes"),
                                         ("batch-size", _POS_INT, "training sequences per step"),
                                         ("steps", _POS_INT, "training steps per run (the same for every size)"),
                                         ("lr", _POS_FLOAT, "peak learning rate, AdamW"),
                                         ("eval-tokens", _POS_INT, "validation bytes scored")))
    c.add_argument("--max-minutes", type=_POS_FLOAT, default=None, help=_MAX_MINUTES.format("run"))
    c.add_argument("--threads", type=_POS_INT, default=None, help="torch CPU threads (default: torch's)")
    c.add_argument("--log-every", type=_POS_INT, default=50, help=_LOG_EVERY)
    c.add_argument("--out", default="runs/scaling", help="output folder: scaling.csv (appended), scaling.md, "
                                                         "scaling.png (default: %(default)s)")
    _add_run_options(c)


def _run_lra_speed_scaling(args) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.experiment == "speed":
        for m in args.models:
            if canonical_name(m) not in speed.MODELS:
                raise UserError(f"speed compares {', '.join(speed.MODELS)}; got {m!r}")
        speed.run_speed(speed.SCALES[args.scale], args.out, device=_run_options(args).device,
                        models=[canonical_name(m) for m in args.models])
        return 0
    options = _run_options(args)
    max_seconds = None if args.max_minutes is None else 60 * args.max_minutes
    if args.experiment == "lra":
        specs = lra.lra_specs(args.tasks, args.models, args.seeds, lra.SCALES[args.scale], width=args.width,
                              num_blocks=args.num_blocks, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              test_examples=args.test_examples)
        lra.run_lra(specs, args.out, max_seconds=max_seconds, log_every=args.log_every, options=options)
        return 0
    scale = scaling.SCALES[args.scale]
    if args.widths is not None:
        if any(w <= 0 for w in args.widths):
            raise UserError(f"--widths must be positive, got {args.widths}")
        scale = replace(scale, widths=tuple(args.widths))
    specs = scaling.scaling_specs(args.models, scale, num_blocks=args.num_blocks, seq_len=args.seq_len,
                                  batch_size=args.batch_size, steps=args.steps, lr=args.lr, eval_tokens=args.eval_tokens)
    scaling.run_scaling(specs, args.out, max_seconds=max_seconds, log_every=args.log_every, options=options,
                        max_bytes=500_000 if args.scale == "smoke" else 8_000_000)
    return 0


def run(args) -> int:
    """Run the parsed ``experiment`` command; bad input raises UserError."""
    try:
        if args.experiment == "forecasting":
            return forecasting_experiment.run(args)
        if args.experiment == "report":
            return 0 if write_report(args.out, aggregate=args.aggregate) is not None else 1
        if args.experiment in ("lra", "speed", "scaling"):
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise UserError("experiments run in one process; use torchrun only with 'openxlstm train'")
            return _run_lra_speed_scaling(args)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("experiments run in one process (cells one after another); use torchrun only with "
                            "'openxlstm train'")
        options = _run_options(args)
        torch.set_num_threads(args.threads)
        max_seconds = None if args.max_minutes is None else 60 * args.max_minutes
        if args.experiment == "ablation":
            for m in args.models:
                canonical_name(m)
            run_ablation(args.models, args.out, max_seconds=max_seconds, log_every=args.log_every, options=options,
                         width=args.width, num_blocks=args.num_blocks, seq_len=args.seq_len,
                         batch_size=args.batch_size, steps=args.steps, lr=args.lr, eval_tokens=args.eval_tokens,
                         seed=args.seed)
            return 0
        try:
            lo, hi = (int(v) for v in args.test_lengths.split("-"))
        except ValueError:
            raise UserError(f"--test-lengths {args.test_lengths!r}: expected lo-hi, e.g. 41-256") from None
        if not 1 <= lo <= hi:
            raise UserError(f"--test-lengths {args.test_lengths!r}: need 1 <= lo <= hi")
        specs = grid_specs(args.tasks, args.models, args.seeds, width=args.width, num_blocks=args.num_blocks,
                           steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                           schedule=args.schedule, slstm_init=args.slstm_init,
                           train_max_len=args.train_max_len, test_min_len=lo, test_max_len=hi,
                           supervision=args.supervision, eval_batches=args.eval_batches, eval_batch_size=args.eval_batch_size,
                           mqar_context=args.mqar_context, mqar_pairs=args.mqar_pairs, mqar_vocab=args.mqar_vocab)
        for spec in {(s.task, s.mqar_context, s.mqar_pairs, s.mqar_vocab) for s in specs}:
            if spec[0] == "mqar":
                MQARTask(context=spec[1], num_pairs=spec[2], vocab_size=spec[3])
        run_grid(specs, args.out, max_seconds=max_seconds, log_every=args.log_every, options=options)
        return 0
    except ValueError as e:
        raise UserError(str(e)) from None


__all__ = ["add_parser", "run"]
