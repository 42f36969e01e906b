"""The paper's language-model ablation ladder in miniature, at equal budgets, in validation bits per byte.

Rungs (each adds one ingredient to the one before; all at the same width, depth, data, steps, batch,
context and learning rate):
  1. "lstm"        classic multi-layer LSTM
  2. "reslstm"     the same LSTM cells in residual pre-LayerNorm blocks with the gated FFN (xLSTM block structure)
  3. "xlstm[0:1]"  + exponential gating, heads and the stabilizer: sLSTM blocks
  4. "xlstm[7:1]"  + matrix memory: mLSTM blocks with one sLSTM block in eight (needs num_blocks >= 8 to
                   be a true 7:1; fewer blocks still place one sLSTM block)
Data: the training issue's default corpus (pydoc topics + stdlib sources), byte-level, its train/val split.
Each rung is one row of ``ablation.csv`` (resumable like the grids: finished rungs are skipped; a rung whose
training diverges is a row with ``status`` "diverged", shown as such, and the ladder goes on). Rungs train
through the training engine (``openxlstm/train/engine.py``): AdamW (0.9, 0.95), 5% warm-up then cosine to
10% of the lr, clipping 1.0, the model's own loss ``model(x, labels=y).loss``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from ..data import ByteTokenizer, default_corpus, split_documents
from ..train.engine import Engine
from ..train.schedule import CosineSchedule
from .zoo import build_model, canonical_name
from .results import DIVERGED, OK, STATUS, append_row, is_diverged, pending, read_results
from .runner import RunOptions, fit_or_diverge

LADDER = ("lstm", "reslstm", "xlstm[0:1]", "xlstm[7:1]")
LADDER_LABELS = {
    "lstm": "LSTM",
    "reslstm": "+ residual pre-LN blocks",
    "xlstm[0:1]": "+ exponential gating (sLSTM)",
    "xlstm[7:1]": "+ matrix memory (xLSTM[7:1])",
}


@dataclass(frozen=True)
class AblationSpec:
    """One rung: model and the shared budget."""

    model: str
    width: int = 128
    num_blocks: int = 8
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 500
    lr: float = 2e-3
    weight_decay: float = 0.1
    eval_tokens: int = 65536
    seed: int = 0
    max_bytes: int = 8_000_000


SPEC_FIELDS = [f.name for f in fields(AblationSpec)]
CSV_FIELDS = SPEC_FIELDS + ["params", "tokens_seen", "steps_done", "train_loss", "val_bpb", "seconds", "finished_at",
                            STATUS]


def load_bytes(max_bytes: int = 8_000_000) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) byte arrays of the default corpus, with the training issue's document split (5% val)."""
    train_text, val_text = split_documents(default_corpus(max_bytes), 0.05)
    tok = ByteTokenizer()
    return np.asarray(tok.encode(train_text)), np.asarray(tok.encode(val_text))


def val_batches(val: np.ndarray, seq_len: int, max_tokens: int, batch_size: int = 16) -> list[tuple]:
    """(input_ids, labels) batches of non-overlapping windows of ``seq_len`` covering at most ``max_tokens``
    targets, evenly spread over the validation bytes."""
    available = (len(val) - 1) // seq_len
    count = max(1, min(available, max_tokens // seq_len))
    starts = np.unique(np.linspace(0, available - 1, count).round().astype(np.int64)) * seq_len
    batches = []
    for j in range(0, len(starts), batch_size):
        w = torch.from_numpy(np.stack([val[s : s + seq_len + 1].astype(np.int64) for s in starts[j : j + batch_size]]))
        batches.append((w[:, :-1], w[:, 1:]))  # w: (B, S + 1)
    return batches


def run_rung(spec: AblationSpec, train: np.ndarray, val: np.ndarray, max_seconds: Optional[float] = None,
             log: Callable[[str], None] = print, log_every: int = 50, options: RunOptions = RunOptions()) -> dict:
    """Train one rung from scratch on random windows of ``train``; returns its CSV row (``status`` "diverged",
    val_bpb nan, when the training loss or a weight became nan or inf)."""
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, 256, spec.width, spec.num_blocks, context_length=spec.seq_len)
    schedule = CosineSchedule(lr=spec.lr, min_lr=0.1 * spec.lr, warmup_steps=max(1, spec.steps // 20),
                              max_steps=spec.steps)
    engine = Engine(model, schedule, options.engine_config(weight_decay=spec.weight_decay, betas=(0.9, 0.95),
                                                           grad_clip=1.0))
    rng = np.random.default_rng(spec.seed)

    def batch(step: int):
        starts = rng.integers(0, len(train) - spec.seq_len - 1, size=spec.batch_size)
        w = torch.from_numpy(np.stack([train[s : s + spec.seq_len + 1].astype(np.int64) for s in starts]))  # (B, S+1)
        return w[:, :-1], w[:, 1:]

    def validate() -> dict:
        return {"val_bpb": engine.evaluate(val_batches(val, spec.seq_len, spec.eval_tokens)).loss / math.log(2)}

    start = time.time()
    run = fit_or_diverge(engine, batch, spec.steps, max_seconds=max_seconds, log_every=log_every, evaluate=validate,
                         log=lambda msg: log(f"    {msg}"))
    row = asdict(spec)
    if run is None or not math.isfinite(run.eval["val_bpb"]):
        row.update(params=model.num_params(), tokens_seen=engine.step * spec.batch_size * spec.seq_len,
                   steps_done=engine.step, val_bpb="nan", seconds=round(time.time() - start, 1),
                   finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), status=DIVERGED)
        log(f"    {spec.model}: diverged")
        return row
    ema = None
    for loss in run.losses:  # the reported training loss: an exponential moving average over the steps
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
    bpb = run.eval["val_bpb"]
    row.update(params=model.num_params(), tokens_seen=run.step * spec.batch_size * spec.seq_len, steps_done=run.step,
               train_loss=round(ema / math.log(2), 4), val_bpb=round(bpb, 4), seconds=round(time.time() - start, 1),
               finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), status=OK)
    log(f"    {spec.model}: validation {bpb:.4f} bits/byte ({model.num_params():,} parameters)")
    return row


def ablation_table(rows: list[dict]) -> str:
    """The ladder as a markdown table, rungs in ladder order ("diverged" for a rung whose training diverged)."""
    order = {m: j for j, m in enumerate(LADDER)}
    rows = sorted(rows, key=lambda r: (order.get(r["model"], len(order)), r["model"], int(r["seed"])))
    lines = ["| rung | model | width x blocks | params | steps | tokens | val bits/byte |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        label = LADDER_LABELS.get(r["model"], r["model"])
        bpb = DIVERGED if is_diverged(r) else f"{float(r['val_bpb']):.4f}"
        lines.append(f"| {label} | {r['model']} | {r['width']} x {r['num_blocks']} | {int(r['params']):,} | {r['steps_done']} | "
                     f"{int(r['tokens_seen']):,} | {bpb} |")
    return "\n".join(lines)


def run_ablation(models: list[str], out_dir: Union[str, Path], max_seconds: Optional[float] = None,
                 log: Callable[[str], None] = print, log_every: int = 50, options: RunOptions = RunOptions(),
                 **settings) -> list[dict]:
    """Run the rungs not yet in ``out_dir/ablation.csv``; writes ``ablation.md``. Returns the new rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "ablation.csv"
    specs = [AblationSpec(model=canonical_name(m), **settings) for m in models]
    todo = pending(specs, csv_path, CSV_FIELDS, SPEC_FIELDS)
    log(f"{len(specs)} rungs, {len(specs) - len(todo)} already in {csv_path}, {len(todo)} to run")
    new_rows = []
    if todo:
        train, val = load_bytes(specs[0].max_bytes)
        log(f"default corpus: {len(train):,} train / {len(val):,} val bytes")
    for j, spec in enumerate(todo):
        log(f"[{j + 1}/{len(todo)}] {LADDER_LABELS.get(spec.model, spec.model)}: {spec.model}")
        row = run_rung(spec, train, val, max_seconds=max_seconds, log=log, log_every=log_every, options=options)
        append_row(csv_path, row, CSV_FIELDS)  # after a line cut short by a crash: on a new line
        new_rows.append(row)
    table = ablation_table(read_results(csv_path))
    (out_dir / "ablation.md").write_text("# LM ablation ladder (validation bits per byte)\n\n" + table + "\n")
    log(table)
    return new_rows


__all__ = ["LADDER", "LADDER_LABELS", "AblationSpec", "run_rung", "run_ablation", "ablation_table",
           "val_batches", "load_bytes"]
