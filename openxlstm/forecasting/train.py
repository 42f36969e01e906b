"""Fine-tuning and training forecasters through the training engine (``openxlstm.train.engine.Engine``).

What a step trains on (the batch of step t depends only on the seed and t, so a resumed run repeats the
uninterrupted one):

* windows cut from the series at random ends: the input is up to ``context`` values (whole patches; values
  before the series starts are missing), the labels are the same values one patch later, so output n is
  scored against patch n + 1 (the quantile, or pinball, loss, in the series' scaled units);
* contiguous patch masking (the TiRex paper's training of multi-patch forecasts): with probability
  ``mask_prob`` a run of 1 .. ``max_mask_patches`` input patches (ending at the last input patch half of the
  time, anywhere else otherwise) is set missing while its targets stay scored, which is what a rollout
  beyond one patch feeds the model;
* windows of different lengths packed end to end into rows with ``cu_seqlens`` (each window scaled by its
  own statistics and run from a zero state), unless the model pads its context (``pad_context``, TiRex's
  convention), in which case every window is left-padded with missing values to ``context`` as a forecast
  is.

The last ``horizon`` values of every series are held out: they are never in a training window, and the
validation loss is the pinball loss of forecasting them from the values before (the stateful multi-patch
forecast: missing patches appended, one pass).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import UserError
from .data import Window, pack_windows
from ..models.tirex import TiRex


@dataclass
class FitConfig:
    """The optimization of one training or fine-tuning run (the data and the model come separately)."""

    steps: int = 200
    batch_size: int = 32  # windows per step
    context: Optional[int] = None  # values of input per window (None: the model's train_ctx_len)
    horizon: Optional[int] = None  # held-out values per series (None: one patch)
    lr: float = 1e-4
    min_lr: Optional[float] = None  # end of the cosine decay (None: lr / 10)
    warmup_steps: Optional[int] = None  # None: 5% of the steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mask_prob: float = 0.5
    max_mask_patches: int = 4
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    eval_every: Optional[int] = None  # None: at the end only
    save_every: Optional[int] = None  # None: at the end only (with a run directory)
    max_minutes: Optional[float] = None

    def check(self) -> "FitConfig":
        ints = {"steps": 1, "batch_size": 1, "max_mask_patches": 1, "log_every": 1}
        for name, lo in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise UserError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
        for name in ("context", "horizon", "warmup_steps", "eval_every", "save_every"):
            v = getattr(self, name)
            lo = 0 if name == "warmup_steps" else 1
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
                raise UserError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.mask_prob <= 1:
            raise UserError(f"--mask-prob must lie in [0, 1], got {self.mask_prob!r}")
        return self


# -- the model in the registry -----------------------------------------------------------------------------
def split_heldout(series: Sequence[np.ndarray], horizon: int, min_context: int) -> tuple[list, list]:
    """(training parts, held-out (context, target) pairs): the last ``horizon`` values of each series held
    out; series with fewer than ``min_context`` values before them are kept for training only."""
    train, held = [], []
    for v in series:
        v = np.asarray(v, dtype=np.float64)
        if len(v) >= horizon + min_context and np.isfinite(v[-horizon:]).any():
            train.append(v[:-horizon])
            held.append((v[:-horizon], v[-horizon:]))
        else:
            train.append(v)
    return train, held


def _slice(v: np.ndarray, start: int, end: int) -> np.ndarray:
    """v[start:end] with NaN for positions before 0 or past the end."""
    out = np.full(end - start, np.nan)
    lo, hi = max(start, 0), min(end, len(v))
    if hi > lo:
        out[lo - start:hi - start] = v[lo:hi]
    return out


def sample_window(v: np.ndarray, rng: np.random.Generator, context: int, P: int, pad: bool, mask_prob: float,
                  max_mask: int) -> Window:
    """A training window ending at a random point of series v (see the module docstring)."""
    end = int(rng.integers(min(len(v), 2 * P), len(v) + 1)) if len(v) > 2 * P else len(v)  # labels end here
    n = max(1, min(context // P, -(-(end - P) // P)))  # input patches
    start = end - P - n * P
    x = _slice(v, start, end - P)
    y = _slice(v, start + P, end)
    if rng.random() < mask_prob and n > 1:
        k = int(rng.integers(1, min(max_mask, n - 1) + 1))
        at = n - k if rng.random() < 0.5 else int(rng.integers(0, n - k + 1))
        x[at * P:(at + k) * P] = np.nan
    if pad and n * P < context:
        fill = np.full(context - n * P, np.nan)
        x, y = np.concatenate([fill, x]), np.concatenate([fill, y])
    return Window(x.astype(np.float32), y.astype(np.float32))


def heldout_window(context_values: np.ndarray, target: np.ndarray, context: int, P: int, pad: bool) -> Window:
    """The held-out forecast as one window: the last ``context`` values (whole patches), then a missing patch
    for each further patch of the target; the labels score the target only."""
    H = len(target)
    K = -(-H // P)
    n = max(1, min(context // P, -(-len(context_values) // P)))
    if pad:
        n = context // P
    x = np.concatenate([_slice(context_values, len(context_values) - n * P, len(context_values)),
                        np.full((K - 1) * P, np.nan)])
    y = np.full(len(x), np.nan)
    y[(n - 1) * P:(n - 1) * P + H] = target
    return Window(x.astype(np.float32), y.astype(np.float32))


def training_batch(series: Sequence[np.ndarray], step: int, seed: int, batch_size: int, context: int, P: int,
                   pad: bool, mask_prob: float, max_mask: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch of step ``step``: (input (b, context), labels (b, context), cu_seqlens), b rows as packing
    needs; windows drawn from the series in proportion to their lengths."""
    rng = np.random.default_rng([seed, step])
    lengths = np.array([len(v) for v in series], dtype=np.float64)
    picks = rng.choice(len(series), size=batch_size, p=lengths / lengths.sum())
    windows = [sample_window(series[j], rng, context, P, pad, mask_prob, max_mask) for j in picks]
    return pack_windows(windows, context, P)


def heldout_batches(held: Sequence[tuple], context: int, P: int, pad: bool, rows: int = 64) -> list[tuple]:
    """Evaluation batches (input, labels, cu_seqlens) of the held-out windows, ``rows`` windows at a time."""
    windows = [heldout_window(c, t, context, P, pad) for c, t in held]
    width = max(len(w.input) for w in windows)
    out = []
    for i in range(0, len(windows), rows):
        out.append(pack_windows(windows[i:i + rows], width, P))
    return out


# -- the run -----------------------------------------------------------------------------------------------
@dataclass
class FitReport:
    step: int
    heldout_before: Optional[float]
    heldout_after: Optional[float]
    losses: list = field(default_factory=list)
    seconds: float = 0.0
    checkpoint: Optional[str] = None


def fit(model: TiRex, series: Sequence[np.ndarray], cfg: FitConfig, run_dir=None, resume=None,
        log: Callable[[str], None] = print, progress: bool = False) -> FitReport:
    """Train ``model`` on ``series`` (1-D arrays, NaN = missing) with the engine; checkpoints (resumable with
    ``resume``, a checkpoint directory) go to ``run_dir`` when given. Returns the held-out pinball loss before
    and after, the per-step losses and the last checkpoint."""
    from ..train.engine import Engine, EngineConfig
    from ..train.metrics import MetricsLog
    from ..train.schedule import CosineSchedule

    cfg.check()
    P = model.config.patch_size
    context = cfg.context or model.config.train_ctx_len
    if context % P:
        raise UserError(f"--context {context} is not a multiple of the model's patch size {P}")
    horizon = cfg.horizon or P
    pad = model.config.pad_context
    train, held = split_heldout(series, horizon, min_context=P)
    train = [v for v in train if np.isfinite(v).sum() >= 2]
    if not train:
        raise UserError("no series has two observed values to train on (after holding out the last --horizon "
                        "values of each)")
    eval_batches = heldout_batches(held, model.config.train_ctx_len, P, pad) if held else []
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    warmup = max(1, cfg.steps // 20) if cfg.warmup_steps is None else cfg.warmup_steps
    schedule = CosineSchedule(lr=cfg.lr, min_lr=min_lr, warmup_steps=warmup, max_steps=cfg.steps)
    torch.manual_seed(cfg.seed)
    engine = Engine(model, schedule, EngineConfig(weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                                                  device=cfg.device, dtype="float32"))
    if resume is not None:
        engine.resume(Path(resume))

    def evaluate() -> dict:
        return {"val_loss": round(engine.evaluate(eval_batches).loss, 6)} if eval_batches else {}

    before = evaluate().get("val_loss") if engine.step == 0 else None
    if before is not None:
        log(f"held-out pinball loss before training: {before:.4f} ({len(held)} series, horizon {horizon})")
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(Path(run_dir), resume_step=engine.step if resume is not None else None,
                         tensorboard=False) if run_dir is not None else None
    saved = []
    train_config = {k: v for k, v in asdict(cfg).items()}

    def save():
        saved.append(engine.save(run_dir, train_config=train_config))

    def batch_at(step: int):
        return training_batch(train, step, cfg.seed, cfg.batch_size, context, P, pad, cfg.mask_prob,
                              cfg.max_mask_patches)

    try:
        result = engine.fit(batch_at, cfg.steps, max_seconds=None if cfg.max_minutes is None else cfg.max_minutes * 60,
                            log_every=cfg.log_every, eval_every=cfg.eval_every,
                            evaluate=evaluate if eval_batches else None, save_every=cfg.save_every,
                            save=save if run_dir is not None else None, metrics=metrics, log=log, progress=progress)
    finally:
        if metrics is not None:
            metrics.close()
    after = (result.eval or {}).get("val_loss") if eval_batches else None
    model.eval()
    return FitReport(step=result.step, heldout_before=before, heldout_after=after, losses=result.losses,
                     seconds=result.seconds, checkpoint=str(saved[-1]) if saved and saved[-1] else None)


def heldout_loss(model: TiRex, series: Sequence[np.ndarray], horizon: int) -> float:
    """The mean pinball loss (scaled units) of forecasting the last ``horizon`` values of each series."""
    P = model.config.patch_size
    _, held = split_heldout(series, horizon, min_context=P)
    if not held:
        raise UserError(f"no series is longer than the held-out horizon {horizon} plus one patch")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was = model.training
    model.eval()
    with torch.no_grad():
        for x, y, cu in heldout_batches(held, model.config.train_ctx_len, P, model.config.pad_context):
            out = model(x.to(device), labels=y.to(device), cu_seqlens=cu.to(device))
            total += float(out.loss) * int(out.num_tokens)
            count += int(out.num_tokens)
    model.train(was)
    return total / max(count, 1)


__all__ = ["FitConfig", "FitReport", "fit", "heldout_loss", "split_heldout", "sample_window", "heldout_window",
           "training_batch", "heldout_batches"]
