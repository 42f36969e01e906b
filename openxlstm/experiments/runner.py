"""Train-and-test grids (tasks x models x seeds) with a resumable CSV, a markdown table and a heat-map.

One cell = one model trained from scratch on one task with one seed, then tested:
  formal languages: train on input lengths drawn uniformly from [1, train_max_len] (one length per batch;
                    classification tasks are supervised at every prefix by default, ``supervision="prefix"``),
                    test on lengths drawn uniformly from [test_min_len, test_max_len]; the score is the
                    accuracy scaled so that 0 is chance and 1 perfect (per output token for sequence tasks);
  MQAR:             train and test on fresh sequences of the configured context; the score is the accuracy
                    on the queried values.
A cell trains through the training engine (``openxlstm/train/engine.py``): the loss is the model's own,
``model(tokens, labels=targets).loss``, over the scored positions (targets IGNORE elsewhere); the model's output
head is cut to the task's classes (ids 0..C-1), so the loss is the cross-entropy over the C classes only.
Every finished cell is appended to ``results.csv`` at once; a rerun with the same settings skips the cells
already there, so an interrupted grid resumes and new models or seeds append. A cell whose training diverges
(the loss or a weight becomes nan or inf) is recorded with ``status`` "diverged" (score nan) and the grid goes
on; the table shows it as "diverged" and a rerun does not repeat it. ``write_report`` turns the
whole CSV into ``results.md`` and ``heatmap.png`` (models x tasks, mean over seeds).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..train.engine import Engine, EngineConfig, FitResult, TrainingDiverged
from ..train.schedule import CosineSchedule
from .formal import TASKS, FormalTask, get_task
from .zoo import SLSTM_INITS, build_model, canonical_name
from .mqar import MQARTask
from .results import DIVERGED, OK, STATUS, append_row, read_results, upgrade_csv

Task = Union[FormalTask, MQARTask]
ALL_TASKS = tuple(TASKS) + ("mqar",)
SCHEDULES = ("cosine", "constant")


def lr_schedule(lr: float, steps: int, schedule: str = "cosine") -> CosineSchedule:
    """The training loop's schedule for a cell: a linear warm-up over the first 5% of ``steps``, then
    ``schedule``: "cosine" decays to 10% of ``lr`` at the last step, "constant" stays at ``lr``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    min_lr = lr if schedule == "constant" else 0.1 * lr
    return CosineSchedule(lr=lr, min_lr=min_lr, warmup_steps=max(1, steps // 20), max_steps=steps)


@dataclass(frozen=True)
class CellSpec:
    """Everything that determines one cell's result (also the CSV's key for resuming)."""

    task: str
    model: str
    seed: int = 0
    width: int = 64
    num_blocks: int = 2
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    train_max_len: int = 40
    test_min_len: int = 41
    test_max_len: int = 256
    eval_batches: int = 8
    eval_batch_size: int = 64
    mqar_context: int = 64
    mqar_pairs: int = 8
    mqar_vocab: int = 64
    supervision: str = "prefix"  # training targets of classification tasks: "prefix" (every position) or "last"
    schedule: str = "cosine"  # learning rate after the 5% warm-up: "cosine" (to 10% of lr) or "constant"
    slstm_init: str = "reference"  # sLSTM forget-gate biases: "reference" (depth-dependent) or "block0" (see models)

    def __post_init__(self):
        if self.supervision not in ("prefix", "last"):
            raise ValueError(f"supervision must be 'prefix' or 'last', got {self.supervision!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.slstm_init not in SLSTM_INITS:
            raise ValueError(f"slstm_init must be one of {', '.join(SLSTM_INITS)}, got {self.slstm_init!r}")

    def key(self) -> tuple:
        return tuple(str(v) for v in asdict(self).values())

    @property
    def task_label(self) -> str:
        """The task's column name: the formal task's name, or mqar with its knobs."""
        if self.task == "mqar":
            return f"mqar(T={self.mqar_context},N={self.mqar_pairs},V={self.mqar_vocab})"
        return self.task


SPEC_FIELDS = [f.name for f in fields(CellSpec)]
RESULT_FIELDS = ["params", "steps_done", "final_loss", "train_accuracy", "accuracy", "chance", "scaled_accuracy",
                 "score", "seconds", "finished_at", STATUS]
CSV_FIELDS = SPEC_FIELDS + RESULT_FIELDS


def make_task(spec: CellSpec) -> Task:
    if spec.task == "mqar":
        return MQARTask(context=spec.mqar_context, num_pairs=spec.mqar_pairs, vocab_size=spec.mqar_vocab)
    return get_task(spec.task)


def _batch(task: Task, spec: CellSpec, gen: torch.Generator, lo: int, hi: int, batch: int, train: bool = False):
    """(tokens, targets), each (B, S): a formal-task batch with one input length drawn from [lo, hi]
    (prefix labels when training with ``supervision="prefix"``; at test only the answer is scored)."""
    if isinstance(task, MQARTask):
        return task.sample(batch, gen)
    n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    return task.sample(batch, n, gen, prefix_labels=train and spec.supervision == "prefix")


@dataclass(frozen=True)
class RunOptions:
    """How cells run, not what they compute (not part of the CSV key): the training engine's hardware options."""

    device: str = "auto"  # as ``openxlstm train``: a GPU when there is one
    dtype: str = "auto"  # autocast: auto (bf16 on GPU), float32, bfloat16
    compile: Union[bool, str] = False  # torch.compile: True (inductor) or a backend name
    activation_checkpointing: bool = False

    def engine_config(self, **optimizer) -> EngineConfig:
        return EngineConfig(device=self.device, dtype=self.dtype, compile=self.compile,
                            activation_checkpointing=self.activation_checkpointing, **optimizer)


def classifier_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Cut the output head (V, E) to its first ``num_classes`` rows in place: the model reads the task's
    ``vocab_size`` symbols and scores its C classes (ids 0..C-1), so its loss and arg-max are over the classes.
    The rows kept are the ones the full head was initialized with."""
    head = model.lm_head
    if head.weight.shape[0] != num_classes:
        narrow = nn.utils.skip_init(nn.Linear, head.in_features, num_classes, bias=False)  # no RNG drawn
        with torch.no_grad():
            narrow.weight.copy_(head.weight[:num_classes])
        model.lm_head = narrow
    return model


def fit_or_diverge(engine: Engine, batch_at: Callable[[int], tuple], until: int, *,
                   log: Callable[[str], None] = print, **fit_options) -> Optional[FitResult]:
    """``engine.fit(batch_at, until, log=log, **fit_options)``, or None when training diverged: the engine
    raised ``TrainingDiverged`` (a nan or inf loss) or a weight is nan or inf afterwards. Said in ``log``; the
    caller records the cell, rung or run as diverged and its experiment goes on with the next one."""
    try:
        run = engine.fit(batch_at, until, log=log, **fit_options)
    except TrainingDiverged as e:
        log(f"diverged: {e}; recorded as diverged")
        return None
    if not all(bool(torch.isfinite(p).all()) for p in engine.model.parameters()):
        log(f"diverged: a weight is nan or inf at step {engine.step}; recorded as diverged")
        return None
    return run


def evaluate(engine: Engine, task: Task, spec: CellSpec, gen: torch.Generator, lo: int, hi: int, batches: int) -> float:
    """Accuracy on ``batches`` fresh batches (formal tasks: one length in [lo, hi] per batch)."""
    data = [_batch(task, spec, gen, lo, hi, spec.eval_batch_size) for _ in range(batches)]
    return engine.evaluate(data, accuracy=True).accuracy


def run_cell(spec: CellSpec, max_seconds: Optional[float] = None, log: Callable[[str], None] = print,
             log_every: int = 100, options: RunOptions = RunOptions()) -> dict:
    """Train and test one cell; returns the CSV row (spec fields + results).

    ``max_seconds`` stops training early (the row records ``steps_done``); the learning-rate schedule
    (5% linear warm-up, then ``spec.schedule``: cosine to 10% or constant) is laid out over ``spec.steps``.
    Recipe: AdamW (0.9, 0.98) with weight decay on matrices, gradient clipping 1.0. A cell whose training
    diverges (``fit_or_diverge``) returns a row with ``status`` "diverged", score nan and no accuracies.
    """
    task = make_task(spec)
    torch.manual_seed(spec.seed)
    context = spec.mqar_context if spec.task == "mqar" else 2 * spec.test_max_len + 1
    model = build_model(spec.model, task.vocab_size, spec.width, spec.num_blocks, context_length=context,
                        slstm_init=spec.slstm_init)
    classifier_head(model, task.num_classes)
    engine = Engine(model, lr_schedule(spec.lr, spec.steps, spec.schedule),
                    options.engine_config(weight_decay=spec.weight_decay, betas=(0.9, 0.98), grad_clip=1.0))

    gen = torch.Generator().manual_seed(spec.seed)

    def batch(step: int):
        return _batch(task, spec, gen, 1, spec.train_max_len, spec.batch_size, train=True)

    start = time.time()
    run = fit_or_diverge(engine, batch, spec.steps, max_seconds=max_seconds, log_every=log_every,
                         log=lambda msg: log(f"    {msg}"))
    row = asdict(spec)
    if run is None:  # diverged: no accuracy to measure
        row.update(params=model.num_params(), steps_done=engine.step, chance=round(task.chance, 4), score="nan",
                   seconds=round(time.time() - start, 1), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                   status=DIVERGED)
        return row
    ema = None
    for loss in run.losses:  # the reported loss: an exponential moving average over the steps
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
    train_seconds = time.time() - start

    eval_gen = torch.Generator().manual_seed(10_000 + spec.seed)
    train_acc = evaluate(engine, task, spec, eval_gen, 1, spec.train_max_len, spec.eval_batches)
    acc = evaluate(engine, task, spec, eval_gen, spec.test_min_len, spec.test_max_len, spec.eval_batches)
    scaled = (acc - task.chance) / (1.0 - task.chance)
    row.update(params=model.num_params(), steps_done=run.step, final_loss=round(ema, 5),
               train_accuracy=round(train_acc, 4), accuracy=round(acc, 4), chance=round(task.chance, 4),
               scaled_accuracy=round(scaled, 4), score=round(acc if spec.task == "mqar" else scaled, 4),
               seconds=round(time.time() - start, 1), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), status=OK)
    log(f"    trained {train_seconds:.0f}s; accuracy {acc:.4f} (scaled {scaled:.4f}), lengths <= "
        f"{spec.train_max_len}: {train_acc:.4f}")
    return row


# ---------------------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------------------
def append_result(path: Union[str, Path], row: dict) -> None:
    """Append one grid row (``results.append_row``: the header first for a new file; after a line cut short, on a
    new line)."""
    append_row(path, row, CSV_FIELDS)


def upgrade_results(path: Union[str, Path]) -> list[dict]:
    """The rows of ``path``, rewritten in this version's columns if an older version wrote it.

    A column added since (such as ``schedule``) is filled with its CellSpec default, which is what the older
    version ran, so the folder can still be resumed and appended to; ``status`` is "ok" (the older version
    counted only finite scores). The original is kept as ``results.csv.bak`` (``.bak.N`` if that exists). A
    CSV with columns this version does not know is an error (nothing is rewritten).
    """
    return upgrade_csv(path, CSV_FIELDS, {**{f.name: f.default for f in fields(CellSpec)}, STATUS: OK})


def row_key(row: dict) -> tuple:
    return tuple(str(row[k]) for k in SPEC_FIELDS)


def run_grid(specs: list[CellSpec], out_dir: Union[str, Path], max_seconds: Optional[float] = None,
             log: Callable[[str], None] = print, log_every: int = 100, options: RunOptions = RunOptions()) -> list[dict]:
    """Run every cell not already in ``out_dir/results.csv``, appending each as it finishes; then write
    ``results.md`` and ``heatmap.png`` from the whole CSV. Returns the new rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "results.csv"
    existing = upgrade_results(csv_path)
    done = {row_key(r) for r in existing}
    todo = [s for s in specs if s.key() not in done]
    log(f"{len(specs)} cells, {len(specs) - len(todo)} already in {csv_path}, {len(todo)} to run")
    new_rows = []
    start = time.time()
    for j, spec in enumerate(todo):
        eta = "" if j == 0 else f", ~{(time.time() - start) / j * (len(todo) - j) / 60:.0f} min left"
        log(f"[{j + 1}/{len(todo)}] {spec.task_label} {spec.model} seed {spec.seed}{eta}")
        row = run_cell(spec, max_seconds=max_seconds, log=log, log_every=log_every, options=options)
        append_result(csv_path, row)
        new_rows.append(row)
        write_report(out_dir, log=lambda _: None)
    write_report(out_dir, log=log)
    return new_rows


# ---------------------------------------------------------------------------------------------------------
# report: markdown table and heat-map
# ---------------------------------------------------------------------------------------------------------
_SETTING_FIELDS = ("width", "num_blocks", "steps", "batch_size", "lr", "weight_decay", "schedule", "slstm_init",
                   "train_max_len", "test_min_len", "test_max_len")


def summarize(rows: list[dict]) -> tuple[list[str], list[str], dict]:
    """-> (model labels, task labels, {(model, task): [scores over seeds]}), a diverged cell's score nan.

    Model labels carry their settings (width, steps, ...) only when the CSV holds more than one setting."""
    settings = {tuple(r.get(k, "") for k in _SETTING_FIELDS) for r in rows}
    cells: dict = {}
    models, tasks = [], []
    for r in rows:
        task = (f"mqar(T={r['mqar_context']},N={r['mqar_pairs']},V={r['mqar_vocab']})" if r["task"] == "mqar"
                else r["task"])
        model = r["model"]
        if len(settings) > 1:
            model += " (" + ",".join(f"{k}={r.get(k, '')}" for k in ("width", "steps", "batch_size", "lr", "weight_decay", "schedule", "slstm_init")
                                  if not (k == "slstm_init" and r.get(k, "reference") == "reference")) + ")"
        if model not in models:
            models.append(model)
        if task not in tasks:
            tasks.append(task)
        cells.setdefault((model, task), []).append(math.nan if r.get(STATUS) == DIVERGED else float(r["score"]))
    order = {t: j for j, t in enumerate(ALL_TASKS)}
    tasks.sort(key=lambda t: order.get(t.split("(")[0], len(order)))
    return models, tasks, cells


def _cell_text(scores: list[float]) -> str:
    """One table cell: the score, or with several seeds "mean ± std, max M (n=k)"; diverged seeds (nan) are
    left out of the numbers and counted: "diverged", "0.52 (1 diverged)", "... (n=2, 1 diverged)"."""
    v = [x for x in scores if not math.isnan(x)]
    diverged = len(scores) - len(v)
    if not v:
        return "" if not scores else DIVERGED if diverged == 1 else f"{DIVERGED} (n={diverged})"
    note = f"{diverged} {DIVERGED}" if diverged else ""
    if len(v) == 1:
        return f"{v[0]:.2f}" + (f" ({note})" if note else "")
    mean = sum(v) / len(v)
    std = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5
    return f"{mean:.2f} ± {std:.2f}, max {max(v):.2f} (n={len(v)}" + (f", {note})" if note else ")")


def markdown_table(rows: list[dict]) -> str:
    """Models x tasks: the score, or with several seeds "mean ± std, max M (n=k)"; "diverged" where training
    diverged (see ``_cell_text``)."""
    models, tasks, cells = summarize(rows)
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(_cell_text(cells.get((m, t), [])) for t in tasks) + " |")
    return "\n".join(lines)


def heatmap(rows: list[dict], path: Union[str, Path], title: str = "", aggregate: str = "mean") -> None:
    """A models x tasks heat-map of the score over seeds (``aggregate`` "mean" or "max"; 0 = chance,
    1 = perfect), like the paper's figure; diverged seeds are left out, a cell with no other seed says "diverged"."""
    if aggregate not in ("mean", "max"):
        raise ValueError(f"aggregate must be 'mean' or 'max', got {aggregate!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models, tasks, cells = summarize(rows)
    grid = np.full((len(models), len(tasks)), np.nan)
    for i, m in enumerate(models):
        for j, t in enumerate(tasks):
            v = [x for x in cells.get((m, t), []) if not math.isnan(x)]
            if v:
                grid[i, j] = max(v) if aggregate == "max" else sum(v) / len(v)
    label_width = 0.07 * max(len(m) for m in models)  # inches for the model names (they may carry settings)
    fig, ax = plt.subplots(figsize=(1.1 * len(tasks) + 1.5 + label_width, 0.55 * len(models) + 1.8))
    ax.imshow(np.clip(grid, 0, 1), cmap="RdYlBu", vmin=0, vmax=1, aspect="auto")
    for i in range(len(models)):
        for j in range(len(tasks)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=9)
            elif cells.get((models[i], tasks[j])):  # every seed diverged
                ax.text(j, i, DIVERGED, ha="center", va="center", fontsize=7, color="dimgray")
    ax.set_xticks(range(len(tasks)), [t.replace("(", "\n(") for t in tasks], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(models)), models, fontsize=9)
    ax.set_title(title or f"scaled accuracy (formal languages) / accuracy (MQAR), {aggregate} over seeds", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_report(out_dir: Union[str, Path], log: Callable[[str], None] = print, aggregate: str = "mean") -> Optional[str]:
    """``results.md`` and ``heatmap.png`` (``aggregate`` over seeds: "mean" or "max") from
    ``out_dir/results.csv``; returns the table (None if empty)."""
    out_dir = Path(out_dir)
    rows = read_results(out_dir / "results.csv")
    if not rows:
        log(f"no results in {out_dir / 'results.csv'}")
        return None
    table = markdown_table(rows)
    settings = sorted({", ".join(f"{k}={r.get(k, '')}" for k in _SETTING_FIELDS) for r in rows})
    text = ("# Results\n\nScore: formal languages, accuracy on test lengths scaled so that 0 is chance and 1 "
            "perfect; MQAR, accuracy on the queried values. Several seeds: mean ± std, max (n). \"diverged\": the "
            "training loss became nan or inf (left out of the numbers).\n\n" + table + "\n\nSettings: "
            + "; ".join(settings) + "\n")
    (out_dir / "results.md").write_text(text)
    heatmap(rows, out_dir / "heatmap.png", aggregate=aggregate)
    log(table)
    log(f"wrote {out_dir / 'results.md'} and {out_dir / 'heatmap.png'}")
    return table


def grid_specs(tasks: list[str], models: list[str], seeds: list[int], **settings) -> list[CellSpec]:
    """The cells of a grid, task-major (all models of a task, then the next task)."""
    for t in tasks:
        if t not in ALL_TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {list(ALL_TASKS)}")
    models = [canonical_name(m) for m in models]
    return [CellSpec(task=t, model=m, seed=s, **settings) for t in tasks for m in models for s in seeds]


__all__ = ["ALL_TASKS", "SCHEDULES", "CellSpec", "RunOptions", "classifier_head", "lr_schedule", "run_cell", "run_grid",
           "grid_specs", "read_results", "append_result", "fit_or_diverge", "upgrade_results",
           "markdown_table", "heatmap", "write_report", "evaluate"]
