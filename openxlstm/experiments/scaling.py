"""Scaling laws in miniature: validation loss against model size, training FLOPs and inference cost per
token for xLSTM[1:0], xLSTM[7:1] and the Transformer baseline, with a power law fitted per architecture.

Every run trains one architecture at one width (all with ``num_blocks`` blocks or layers) on the same
fixed token budget (the paper trains every size on the same 15B tokens) of the built-in corpus,
byte-level, with the training issue's document split (``ablation.load_bytes``), through the training
engine (AdamW (0.9, 0.95), weight decay 0.1, 5% warm-up then cosine to 10%, clipping 1.0), and is scored
on validation bytes.

Costs (``flops_per_token``), counted, not profiled; one multiply-add = 2 FLOPs:
  dense    2 x the parameters of every weight matrix, conv and recurrent kernel except the embedding table
           (a lookup); the output head included;
  mixing   Transformer: attention scores and weighted sum, 4 x layers x width x the number of keys (a
           training position t sees t + 1 keys: (S + 1) / 2 on average; a decoded token at context T, T);
           mLSTM: the matrix memory's update and read, 4 x inner width x head width per block and token (the
           recurrent form; the chunkwise training form costs the same order);
  training 3 x forward (backward = 2 x forward) x tokens trained.
Inference cost per token is also measured: the median time of 64 decode steps (4 at the smoke scale) at batch 1 after a prompt of
``seq_len`` tokens (the model's step loop, on this run's device).

Rows go to ``scaling.csv`` as each run finishes (a rerun skips them); ``scaling.md`` and ``scaling.png``
(loss against parameters, training FLOPs, inference FLOPs per token and measured ms per token, with the
fitted power laws) are rewritten from it.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from ..models.transformer import TransformerLM
from ..models.xlstm import xLSTMLM
from ..train.engine import Engine
from ..train.schedule import CosineSchedule
from .ablation import load_bytes, val_batches
from .zoo import build_model, canonical_name
from .results import DIVERGED, OK, STATUS, append_row, is_diverged, markdown, pending, pyplot, read_results
from .runner import RunOptions, fit_or_diverge

ARCHS = ("xlstm[1:0]", "xlstm[7:1]", "transformer")


@dataclass(frozen=True)
class ScalingScale:
    name: str
    widths: tuple[int, ...]
    num_blocks: int
    seq_len: int
    batch_size: int
    steps: int  # the same for every size: steps x batch x seq_len tokens
    lr: float
    eval_tokens: int
    decode_steps: int = 64  # decode steps timed for the measured inference cost


SCALES = {
    "smoke": ScalingScale("smoke", (16, 24, 32, 48), 2, 16, 4, 2, 3e-3, 256, decode_steps=4),
    "cpu": ScalingScale("cpu", (32, 48, 64, 96), 8, 128, 16, 300, 3e-3, 32768),
    "paper": ScalingScale("paper", (256, 384, 512, 768, 1024), 24, 2048, 32, 20000, 1e-3, 4_000_000),
}


@dataclass(frozen=True)
class ScalingSpec:
    arch: str
    width: int
    scale: str
    num_blocks: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    eval_tokens: int
    seed: int = 0
    decode_steps: int = 64


KEY_FIELDS = [f.name for f in fields(ScalingSpec)]
CSV_FIELDS = KEY_FIELDS + ["params", "tokens", "train_flops", "forward_flops_per_token", "decode_flops_per_token",
                           "decode_ms_per_token", "steps_done", "train_loss", "val_loss", "val_bpb", "seconds",
                           "finished_at", STATUS]


# ---------------------------------------------------------------------------------------------------------
# costs
# ---------------------------------------------------------------------------------------------------------
def dense_flops_per_token(model: nn.Module) -> int:
    """2 x the weights that multiply activations (every parameter of 2 or more dims except the embedding)."""
    emb = model.embedding.weight
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or p is emb and not getattr(model.config, "tie_weights", False):
            continue
        seen.add(id(p))
        if p.dim() >= 2:
            total += p.numel()
    return 2 * total


def mixing_flops_per_token(model: nn.Module, keys: float) -> float:
    """Sequence-mixing FLOPs of one token that sees ``keys`` earlier tokens (attention) or a fixed-size
    memory (mLSTM, independent of ``keys``); sLSTM and LSTM mixing is in their recurrent kernels (dense)."""
    if isinstance(model, TransformerLM):
        c = model.config
        return 4.0 * c.num_layers * c.embedding_dim * keys
    if isinstance(model, xLSTMLM):
        c = model.config
        mlstm_blocks = c.num_blocks - len(c.slstm_at)
        return 4.0 * mlstm_blocks * c.mlstm_inner_dim * (c.mlstm_inner_dim // c.mlstm_num_heads)
    return 0.0


def flops_per_token(model: nn.Module, seq_len: int) -> tuple[float, float]:
    """(forward FLOPs per token trained at context ``seq_len``, FLOPs per decoded token at context ``seq_len``)."""
    dense = dense_flops_per_token(model)
    return dense + mixing_flops_per_token(model, (seq_len + 1) / 2), dense + mixing_flops_per_token(model, seq_len)


@torch.no_grad()
def decode_ms_per_token(model: nn.Module, seq_len: int, vocab: int, device, steps: int = 64) -> float:
    """Median wall time of one decode step (batch 1) after a prompt of ``seq_len`` tokens, in ms."""
    was = model.training
    model.eval()
    try:
        ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
        logits, state = model(ids, return_state=True)
        times = []
        for j in range(steps + 4):
            tok = logits[:, -1:].argmax(-1)  # (1, 1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            logits, state = model(tok, state, return_state=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if j >= 4:
                times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)
    finally:
        model.train(was)


# ---------------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------------
def scaling_specs(archs, scale: ScalingScale, seed: int = 0, **overrides) -> list[ScalingSpec]:
    """One run per (architecture, width), smallest widths first; ``overrides`` replace the scale's
    num_blocks, seq_len, batch_size, steps, lr, eval_tokens (None: keep)."""
    s = {k: getattr(scale, k) for k in ("num_blocks", "seq_len", "batch_size", "steps", "lr", "eval_tokens")}
    s.update({k: v for k, v in overrides.items() if v is not None})
    return [ScalingSpec(canonical_name(a), w, scale.name, seed=seed, decode_steps=scale.decode_steps, **s)
            for w in scale.widths for a in archs]


def run_scaling_run(spec: ScalingSpec, train: np.ndarray, val: np.ndarray, max_seconds: Optional[float] = None,
                    log: Callable[[str], None] = print, log_every: int = 50,
                    options: RunOptions = RunOptions()) -> dict:
    """Train one size from scratch; returns its CSV row (``status`` "diverged", validation loss nan and no decode
    timing, when the training loss or a weight became nan or inf)."""
    torch.manual_seed(spec.seed)
    model = build_model(spec.arch, 256, spec.width, spec.num_blocks, context_length=spec.seq_len)
    schedule = CosineSchedule(lr=spec.lr, min_lr=0.1 * spec.lr, warmup_steps=max(1, spec.steps // 20),
                              max_steps=spec.steps)
    engine = Engine(model, schedule, options.engine_config(weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0))
    rng = np.random.default_rng(spec.seed)

    def batch(step: int):
        starts = rng.integers(0, len(train) - spec.seq_len - 1, size=spec.batch_size)
        w = torch.from_numpy(np.stack([train[s:s + spec.seq_len + 1].astype(np.int64) for s in starts]))  # (B, S+1)
        return w[:, :-1], w[:, 1:]

    start = time.time()
    run = fit_or_diverge(engine, batch, spec.steps, max_seconds=max_seconds, log_every=log_every,
                         log=lambda m: log(f"    {m}"))
    val_loss = math.nan if run is None else engine.evaluate(val_batches(val, spec.seq_len, spec.eval_tokens)).loss
    fwd, dec = flops_per_token(model, spec.seq_len)
    tokens = engine.step * spec.batch_size * spec.seq_len
    row = asdict(spec)
    row.update(params=model.num_params(), tokens=tokens, train_flops=f"{3 * fwd * tokens:.4g}",
               forward_flops_per_token=f"{fwd:.4g}", decode_flops_per_token=f"{dec:.4g}", steps_done=engine.step)
    if not math.isfinite(val_loss):
        row.update(val_loss="nan", val_bpb="nan", seconds=round(time.time() - start, 1),
                   finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), status=DIVERGED)
        log(f"    {spec.arch} width {spec.width}: diverged")
        return row
    ms = decode_ms_per_token(engine.model, spec.seq_len, 256, engine.device, spec.decode_steps)
    tail = run.losses[-max(1, len(run.losses) // 10):]
    row.update(decode_ms_per_token=round(ms, 4), train_loss=round(sum(tail) / len(tail), 4),
               val_loss=round(val_loss, 4), val_bpb=round(val_loss / math.log(2), 4),
               seconds=round(time.time() - start, 1), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), status=OK)
    log(f"    {spec.arch} width {spec.width}: {row['params']:,} parameters, validation {row['val_bpb']} bits/byte, "
        f"decode {ms:.2f} ms/token")
    return row


def run_scaling(specs: list[ScalingSpec], out_dir: Union[str, Path], max_seconds: Optional[float] = None,
                log: Callable[[str], None] = print, log_every: int = 50, options: RunOptions = RunOptions(),
                max_bytes: int = 8_000_000) -> list[dict]:
    """Run the specs not yet in ``out_dir/scaling.csv`` (each appended when it finishes, a diverged one too), then
    the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "scaling.csv"
    todo = pending(specs, csv_path, CSV_FIELDS, KEY_FIELDS)
    log(f"scaling: {len(specs)} runs, {len(specs) - len(todo)} already in {csv_path}, {len(todo)} to run")
    rows, start = [], time.time()
    if todo:
        train, val = load_bytes(max_bytes)
    for j, spec in enumerate(todo):
        eta = "" if j == 0 else f", ~{(time.time() - start) / j * (len(todo) - j) / 60:.0f} min left"
        log(f"[{j + 1}/{len(todo)}] {spec.arch} width {spec.width} x {spec.num_blocks} blocks{eta}")
        row = run_scaling_run(spec, train, val, max_seconds, log, log_every, options)
        append_row(csv_path, row, CSV_FIELDS)
        rows.append(row)
        write_scaling_report(out_dir, log=lambda _: None, plot=False)  # the PNG at the end
    write_scaling_report(out_dir, log=log)
    return rows


# ---------------------------------------------------------------------------------------------------------
# fits and report
# ---------------------------------------------------------------------------------------------------------
def fit_power_law(x, y) -> tuple[float, float]:
    """Least squares of log y = log a + b log x -> (a, b): y = a x^b (b < 0 when y falls with x)."""
    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    b, log_a = np.polyfit(lx, ly, 1)
    return float(math.exp(log_a)), float(b)


AXES = (("params", "parameters"), ("train_flops", "training FLOPs"),
        ("decode_flops_per_token", "inference FLOPs per token"), ("decode_ms_per_token", "inference ms per token"))


def _by_arch(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r["arch"], []).append(r)
    for v in out.values():
        v.sort(key=lambda r: float(r["params"]))
    return out


def fits(rows: list[dict]) -> dict:
    """{(arch, axis): (a, b)} for every architecture with at least 2 sizes that did not diverge (loss = validation
    nats/byte)."""
    out = {}
    for arch, rs in _by_arch([r for r in rows if not is_diverged(r)]).items():
        if len({r["width"] for r in rs}) < 2:
            continue
        for key, _ in AXES:
            out[(arch, key)] = fit_power_law([float(r[key]) for r in rs], [float(r["val_loss"]) for r in rs])
    return out


def write_scaling_report(out_dir: Union[str, Path], log: Callable[[str], None] = print, plot: bool = True) -> Optional[str]:
    out_dir = Path(out_dir)
    rows = read_results(out_dir / "scaling.csv")
    if not rows:
        log(f"no results in {out_dir / 'scaling.csv'}")
        return None
    runs = markdown(["arch", "width x blocks", "params", "tokens", "train FLOPs", "inference FLOPs/token",
                     "inference ms/token", "val loss (nats/byte)", "val bits/byte"],
                    [[r["arch"], f"{r['width']} x {r['num_blocks']}", f"{int(r['params']):,}", f"{int(r['tokens']):,}",
                      f"{float(r['train_flops']):.3g}", f"{float(r['decode_flops_per_token']):.3g}",
                      *(["", DIVERGED, DIVERGED] if is_diverged(r) else
                        [f"{float(r['decode_ms_per_token']):.2f}", r["val_loss"], r["val_bpb"]])]
                     for rs in _by_arch(rows).values() for r in rs])
    f = fits(rows)
    archs = list(dict.fromkeys(a for a, _ in f))
    fit_table = markdown(["arch", *[f"exponent vs {label}" for _, label in AXES]],
                         [[a, *[f"{f[(a, k)][1]:.3f}" for k, _ in AXES]] for a in archs]) if f else "(fits need 2+ sizes)"
    settings = sorted({f"scale {r['scale']}: {r['steps']} steps x {r['batch_size']} x {r['seq_len']} bytes, lr {r['lr']}, "
                       f"{r['eval_tokens']} validation bytes" for r in rows})
    text = ("# Scaling (validation loss on the built-in corpus, bytes)\n\n" + runs +
            "\n\nFitted power laws, loss = a x^b (least squares in log-log; b per axis):\n\n" + fit_table +
            "\n\nSettings: " + "; ".join(settings) + "." +
            ("\n\"diverged\": the training loss became nan or inf; left out of the fits and the plot.\n"
             if any(is_diverged(r) for r in rows) else "\n"))
    (out_dir / "scaling.md").write_text(text)
    if plot:
        scaling_plot([r for r in rows if not is_diverged(r)], f, out_dir / "scaling.png")
    log(text)
    log(f"wrote {out_dir / 'scaling.md'} and {out_dir / 'scaling.png'}")
    return text


def scaling_plot(rows: list[dict], fitted: dict, path: Union[str, Path]) -> None:
    plt = pyplot()
    from matplotlib.ticker import NullFormatter
    fig, axes = plt.subplots(1, len(AXES), figsize=(4.2 * len(AXES), 3.6))
    for arch, rs in _by_arch(rows).items():
        color = None
        for ax, (key, label) in zip(axes, AXES):
            x = [float(r[key]) for r in rs]
            y = [float(r["val_loss"]) for r in rs]
            pts, = ax.plot(x, y, "o", color=color, label=arch)
            color = pts.get_color()
            if (arch, key) in fitted:
                a, b = fitted[(arch, key)]
                xs = np.geomspace(min(x), max(x), 50)
                ax.plot(xs, a * xs ** b, "-", color=color, alpha=0.7, label=f"{arch}: x^{b:.3f}")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # the 2x, 3x, ... labels of a short log axis overlap
            ax.set_xlabel(label)
            ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("validation loss (nats/byte; fits: a x^b)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


__all__ = ["SCALES", "ScalingScale", "ScalingSpec", "ARCHS", "scaling_specs", "run_scaling", "run_scaling_run",
           "flops_per_token", "dense_flops_per_token", "mixing_flops_per_token", "fit_power_law", "fits",
           "write_scaling_report", "decode_ms_per_token"]
