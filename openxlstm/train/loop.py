"""One training loop for every architecture: AdamW with weight-decay groups, warm-up + cosine schedule,
gradient clipping and accumulation, bf16 autocast on GPU, optional torch.compile, DDP under torchrun,
periodic validation, metrics CSV + plot, atomic checkpoints and exact resume.

The batch of step t depends only on (seed, t) and every process takes its slice of the global batch, so
a resumed run, and a run on W processes, follow the same trajectory as one uninterrupted process.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch

from ..config import preset as xlstm_preset
from ..config import xLSTMConfig
from ..data import BatchSampler, eval_windows, load_data
from ..data.tokenizer import HFTokenizer
from ..errors import UserError
from ..models import ARCHS, build_model, config_from_dict
from .checkpoint import load_model, load_trainer_state, read_meta, resolve_checkpoint, save_checkpoint
from .distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from .metrics import MetricsLog, plot_losses
from .schedule import CosineSchedule

SAMPLE_PROMPTS = ("The ", "def ", "import ")


@dataclass
class TrainConfig:
    """Everything a run needs; saved in each checkpoint. Defaults are the README's default run: a ~0.5M
    parameter byte-level xLSTM (4 blocks, sLSTM at block 1) trained for ~4 minutes on 2 CPU cores."""

    arch: str = "xlstm"
    model: Optional[dict] = None  # the architecture's config fields; None: the default model of `arch`
    preset: Optional[str] = None  # xLSTM paper preset "SIZE[:RATIO]", e.g. "125m:7:1"
    size: Optional[int] = None  # baselines: target parameter count (default: the default xLSTM's)
    data: Optional[str] = None  # None: the embedded default corpus
    tokenizer: Optional[str] = None  # "byte" (text default), "bpe:N", or a tokenizer.json path
    val_fraction: float = 0.05
    bin_dtype: str = "uint16"
    out: str = "runs/default"
    max_steps: int = 1200
    max_time: Optional[float] = None  # minutes; stop early (with a checkpoint) when exceeded
    stop_at: Optional[int] = None  # stop at this step as if interrupted (the schedule still uses max_steps)
    batch_size: int = 16  # global: sequences per optimizer step over all processes and micro-batches
    grad_accum: int = 1
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: Optional[float] = None  # default lr / 10
    warmup: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    beta2: float = 0.95
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # "auto" (bf16 autocast on CUDA, float32 elsewhere), "float32", "bfloat16"
    compile: bool = False
    eval_every: int = 200
    eval_tokens: int = 65536
    log_every: int = 10
    save_every: int = 400
    samples: int = 3
    sample_tokens: int = 160
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def default_model_config(arch: str, vocab_size: int, seq_len: int, size: Optional[int] = None) -> dict:
    """The default model of each architecture; the baselines are sized to the default xLSTM's parameters."""
    from ..baselines import sized_lstm_config, sized_transformer_config

    xl = xLSTMConfig(vocab_size=vocab_size, embedding_dim=128, num_blocks=4, slstm_at=[1], mlstm_num_heads=4,
                     slstm_num_heads=4, context_length=seq_len)
    if arch == "xlstm":
        return xl.to_dict()
    target = size or ARCHS["xlstm"][1](xl).num_params()
    if arch == "lstm":
        return sized_lstm_config(target, vocab_size, num_layers=2, context_length=seq_len).to_dict()
    return sized_transformer_config(target, vocab_size, num_layers=4, head_dim=32, context_length=seq_len).to_dict()


def resolve_model_config(cfg: TrainConfig, vocab_size: int) -> dict:
    """The model config dict of a fresh run from --config / --preset / defaults, checked against the data."""
    if cfg.arch not in ARCHS:
        raise UserError(f"unknown --arch {cfg.arch!r}; choose one of {sorted(ARCHS)}")
    if cfg.preset is not None:
        if cfg.arch != "xlstm":
            raise UserError("--preset names an xLSTM paper model; size baselines with --size instead")
        size, _, ratio = cfg.preset.partition(":")
        try:
            model = xlstm_preset(size, ratio or "7:1", vocab_size=vocab_size, context_length=cfg.seq_len).to_dict()
        except ValueError as e:
            raise UserError(f"--preset {cfg.preset!r}: {e}") from None
    elif cfg.model is not None:
        model = dict(cfg.model)
        if model.get("vocab_size", vocab_size) != vocab_size:
            raise UserError(f"the model config's vocab_size {model['vocab_size']} does not match the tokenizer's "
                            f"vocabulary of {vocab_size}")
        model["vocab_size"] = vocab_size
    else:
        model = default_model_config(cfg.arch, vocab_size, cfg.seq_len, cfg.size)
    return config_from_dict(cfg.arch, model).to_dict()


def resolve_device(device: str, dist_info: DistInfo) -> torch.device:
    if device == "auto":
        device = f"cuda:{dist_info.local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and dist_info.enabled:
        device = f"cuda:{dist_info.local_rank}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a valid device (cpu, cuda, cuda:N, auto)") from None


def autocast_context(dtype: str, device: torch.device):
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return nullcontext()
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise UserError(f"--dtype {dtype!r}: choose auto, float32 or bfloat16")


@torch.no_grad()
def evaluate_loss(model, tokens, seq_len: int, max_tokens: int, batch_size: int, device, autocast=None,
                  dist_info: DistInfo = DistInfo()) -> tuple[float, int]:
    """(mean next-token loss in nats, number of target tokens) over non-overlapping windows of ``tokens``,
    sharded over processes."""
    starts = eval_windows(len(tokens), seq_len, max_tokens)[dist_info.rank::dist_info.world_size]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        w = torch.stack([torch.from_numpy(tokens[s:s + seq_len + 1].astype("int64")) for s in starts[i:i + batch_size]])
        w = w.to(device)  # (b, S + 1)
        with autocast or nullcontext():
            out = model(w[:, :-1], labels=w[:, 1:])
        total += float(out.loss) * w[:, 1:].numel()
        count += w[:, 1:].numel()
    model.train(was_training)
    total, count = all_reduce_sum([total, float(count)], device)
    return total / max(count, 1.0), int(count)


def bits_per_byte(loss: float, bytes_per_token: Optional[float]) -> Optional[float]:
    return None if not bytes_per_token else loss / math.log(2) / bytes_per_token


class Trainer:
    """Set up from a TrainConfig (fresh, or resumed from a checkpoint) and run with ``fit()``."""

    def __init__(self, cfg: TrainConfig, resume: Optional[str] = None, log=None):
        self.dist = init_distributed("cuda" if cfg.device.startswith("cuda") or
                                     (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.log = log if log is not None else (lambda msg: print(msg, flush=True))
        if not self.dist.is_main:
            self.log = lambda msg: None
        self.device = resolve_device(cfg.device, self.dist)
        self.out = Path(cfg.out)
        ckpt, trainer_state = None, None
        if resume is not None:
            ckpt = resolve_checkpoint(self.out if resume == "auto" else resume)
            trainer_state = load_trainer_state(ckpt)
        self.cfg = cfg
        self.autocast = autocast_context(cfg.dtype, self.device)
        torch.manual_seed(cfg.seed)

        tokenizer_spec = cfg.tokenizer
        if ckpt is not None:
            spec = read_meta(ckpt).get("tokenizer")
            if spec is not None and spec.get("type") == "hf":
                tokenizer_spec = str(ckpt / HFTokenizer.FILE)
        self.data = self._load_data(tokenizer_spec)
        self.log(f"data: {self.data.description}")

        if ckpt is not None:
            model, _, meta = load_model(ckpt, device=self.device)
            if meta["arch"] != cfg.arch:
                raise UserError(f"the checkpoint holds a {meta['arch']} model, but --arch is {cfg.arch}")
            self.model_config = meta["model"]
            model.train()
        else:
            self.model_config = resolve_model_config(cfg, self.data.vocab_size)
            model = build_model(cfg.arch, self.model_config).to(self.device)
        if model.config.vocab_size != self.data.vocab_size:
            raise UserError(f"the model's vocabulary ({model.config.vocab_size}) does not match the data's "
                            f"tokenizer ({self.data.vocab_size})")
        self.model = model
        self.step = 0
        self.optimizer = torch.optim.AdamW(model.optim_groups(cfg.weight_decay), lr=cfg.lr, betas=(0.9, cfg.beta2),
                                           eps=1e-8)
        self.schedule = CosineSchedule(cfg.lr, cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10,
                                       cfg.warmup, cfg.max_steps)
        if trainer_state is not None:
            self.optimizer.load_state_dict(trainer_state["optimizer"])
            self.step = int(trainer_state["step"])
            torch.set_rng_state(trainer_state["rng"]["torch"])
            if torch.cuda.is_available() and trainer_state["rng"].get("cuda"):
                torch.cuda.set_rng_state_all(trainer_state["rng"]["cuda"])
            self.log(f"resumed from {ckpt} at step {self.step}")

        per_rank = cfg.batch_size // self.dist.world_size if cfg.batch_size % self.dist.world_size == 0 else 0
        if per_rank == 0 or per_rank % cfg.grad_accum:
            raise UserError(f"--batch-size {cfg.batch_size} must be divisible by processes x accumulation steps "
                            f"({self.dist.world_size} x {cfg.grad_accum})")
        self.micro_batch = per_rank // cfg.grad_accum
        self.sampler = BatchSampler(len(self.data.train), cfg.seq_len, cfg.batch_size, cfg.seed,
                                    self.dist.rank, self.dist.world_size)
        if len(self.data.val) < cfg.seq_len + 1:
            raise UserError(f"sequence length {cfg.seq_len} is larger than the validation split "
                            f"({len(self.data.val):,} tokens); use a smaller --seq-len or more data")

        self.forward_model = torch.compile(model) if cfg.compile else model
        self.train_model = self.forward_model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DDP(self.forward_model, device_ids=ids)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.metrics = MetricsLog(self.out, resume_step=self.step if ckpt is not None else None)

    def _load_data(self, tokenizer_spec):
        cfg = self.cfg
        trains_bpe = isinstance(tokenizer_spec, str) and tokenizer_spec.startswith("bpe:")
        if trains_bpe and self.dist.enabled:  # one process trains the BPE, the others read its file
            shared = self.out / "tokenizer.json"
            if self.dist.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                data = load_data(cfg.data, tokenizer_spec, cfg.val_fraction, cfg.bin_dtype)
                data.tokenizer.save(self.out)
            barrier()
            if not self.dist.is_main:
                data = load_data(cfg.data, str(shared), cfg.val_fraction, cfg.bin_dtype)
            return data
        return load_data(cfg.data, tokenizer_spec, cfg.val_fraction, cfg.bin_dtype)

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> tuple[float, Optional[float]]:
        loss, _ = evaluate_loss(self.forward_model, self.data.val, self.cfg.seq_len, self.cfg.eval_tokens,
                                max(16, self.micro_batch), self.device, self.autocast, self.dist)
        return loss, bits_per_byte(loss, self.data.bytes_per_token)

    def save(self) -> Optional[Path]:
        if not self.dist.is_main:
            return None
        state = {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(), "step": self.step,
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
        return save_checkpoint(self.out, self.step, self.model, self.data.tokenizer, asdict(self.cfg), state,
                               extra={"bytes_per_token": self.data.bytes_per_token})

    def train_step(self) -> float:
        """One optimizer step over the global batch; returns this step's mean training loss (all processes)."""
        cfg = self.cfg
        self.schedule.apply(self.optimizer, self.step)
        x, y = self.sampler.batch(self.data.train, self.step)  # (per_rank, S) each
        total = 0.0
        for a in range(cfg.grad_accum):
            xs = x[a * self.micro_batch:(a + 1) * self.micro_batch].to(self.device)
            ys = y[a * self.micro_batch:(a + 1) * self.micro_batch].to(self.device)
            sync = a == cfg.grad_accum - 1 or not self.dist.enabled
            with (nullcontext() if sync else self.train_model.no_sync()), self.autocast:
                loss = self.train_model(xs, labels=ys).loss  # fused head + loss: no (b*S, V) float32 logits
            (loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return all_reduce_sum([total], self.device)[0] / self.dist.world_size

    def fit(self) -> dict:
        """Train to ``max_steps`` (or ``stop_at`` / ``max_time``), validating, logging and checkpointing."""
        cfg = self.cfg
        last_step = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at is not None else cfg.max_steps
        tokens_per_step = cfg.batch_size * cfg.seq_len
        self.log(f"model: {cfg.arch}, {self.model.num_params():,} parameters; {last_step - self.step} steps of "
                 f"{cfg.batch_size} x {cfg.seq_len} tokens on {self.device} x {self.dist.world_size}")
        bar = None
        if self.dist.is_main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=last_step, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr)
        start, window, window_t0, window_steps = time.time(), 0.0, time.time(), 0
        val_loss, val_bpb, stopped_early = None, None, False
        try:
            while self.step < last_step:
                loss = self.train_step()
                window += loss
                window_steps += 1
                if not math.isfinite(loss):
                    raise UserError(f"the training loss is {loss} at step {self.step}: lower --lr or check the data")
                now = time.time()
                tok_s = window_steps * tokens_per_step / max(now - window_t0, 1e-9)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                row = {}
                if self.step % cfg.log_every == 0 or self.step == last_step:
                    row.update(train_loss=round(window / window_steps, 5), tokens_per_s=round(tok_s, 1))
                    window, window_t0, window_steps = 0.0, now, 0
                timed_out = cfg.max_time is not None and now - start > cfg.max_time * 60
                if self.step % cfg.eval_every == 0 or self.step == last_step or timed_out:
                    val_loss, val_bpb = self.validate()
                    row.update(val_loss=round(val_loss, 5), val_bpb="" if val_bpb is None else round(val_bpb, 5))
                    if bar is not None:
                        bar.write(f"step {self.step}: val loss {val_loss:.4f}"
                                  + ("" if val_bpb is None else f", {val_bpb:.4f} bits/byte"))
                if row and self.dist.is_main:
                    self.metrics.log(step=self.step, tokens=self.step * tokens_per_step,
                                     elapsed_s=round(now - start, 2), lr=self.schedule.lr_at(self.step - 1), **row)
                if self.step % cfg.save_every == 0 or self.step == last_step or timed_out:
                    self.save()
                if timed_out:
                    stopped_early = True
                    self.log(f"time limit of {cfg.max_time} min reached at step {self.step}")
                    break
        except KeyboardInterrupt:
            self.save()
            barrier()
            self.log(f"\ninterrupted at step {self.step}; checkpoint saved in {self.out} (continue with --resume)")
            raise
        finally:
            if bar is not None:
                bar.close()
        elapsed = time.time() - start
        barrier()
        result = {"arch": cfg.arch, "params": self.model.num_params(), "steps": self.step,
                  "tokens": self.step * tokens_per_step, "time_s": round(elapsed, 1),
                  "val_loss": val_loss, "val_bpb": val_bpb, "stopped_early": stopped_early,
                  "checkpoint": str(self.out)}
        if self.dist.is_main:
            self.metrics.close()
            png = plot_losses({cfg.arch: self.out / "metrics.csv"}, self.out / "loss.png",
                              title=f"{cfg.arch}, {self.model.num_params() / 1e6:.2f}M parameters")
            result["plot"] = None if png is None else str(png)
            (self.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        return result

    def samples(self, count: int, max_new_tokens: int) -> list[tuple[str, str]]:
        """(prompt, continuation) pairs from the trained model (empty without a tokenizer)."""
        from ..generation import generate

        if self.data.tokenizer is None or count <= 0 or not self.dist.is_main:
            return []
        prompts = [SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)] for i in range(count)]
        texts = generate(self.model, prompts, self.data.tokenizer, max_new_tokens=max_new_tokens, temperature=0.8,
                         top_k=50, seed=self.cfg.seed)
        return list(zip(prompts, texts))


def train(cfg: TrainConfig, resume: Optional[str] = None, log=None) -> dict:
    """Run a whole training (see TrainConfig); returns the summary dict (also written to OUT/summary.json)."""
    trainer = Trainer(cfg, resume=resume, log=log)
    try:
        result = trainer.fit()
        result["samples"] = trainer.samples(cfg.samples, cfg.sample_tokens)
    finally:
        shutdown()
    return result


__all__ = ["TrainConfig", "Trainer", "train", "evaluate_loss", "bits_per_byte", "default_model_config",
           "resolve_model_config"]
