"""The training engine: every run trains through it.

``openxlstm train`` (``app.py``), the experiment grid cells (``experiments/runner.py``), the LM ablation rungs,
the LRA cells and the scaling runs each hand an ``Engine`` a model, a schedule and an ``EngineConfig``, so
every feature reaches every run:

    EngineConfig.device, .dtype        the model on its device; bf16 autocast on GPU ("auto")
    .activation_checkpointing,         applied from outside the model by ``parallel.parallelize``
    .compile, several processes, .fsdp
    .weight_decay, .betas, .grad_clip  AdamW on the model's ``optim_groups``, clipping; the CosineSchedule
    .grad_accum                        micro-batches per optimizer step
    train_step(inputs, labels[, cu_seqlens])  one optimizer step; the loss is the model's:
                                       model(x, labels=y[, cu_seqlens=...]).loss (packed documents)
    evaluate(batches)                  mean loss (and accuracy) over the scored labels
    fit(batch_at, until, ...)          the loop: metrics rows, evaluation, checkpoints, time limit, Ctrl-C,
                                       SIGTERM / SIGUSR1 (a checkpoint at the next step boundary, then Preempted)
    save(run_dir, ...), resume(ckpt)   ``checkpoint.Checkpointer``: safetensors or sharded DCP, interchangeable

Labels hold the target of each position: token ids with -100 where nothing is scored, or float targets with
NaN where nothing is scored. A step's loss is the mean over the scored labels of the whole global batch,
however it is split into micro-batches and processes, so 2 processes or 2 accumulation steps follow the
trajectory of one.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..data.packing import split_micro_batches
from ..device import autocast_dtype, resolve_device
from ..errors import UserError
from ..evaluate import EvalResult, autocast, eval_result, eval_sums
from ..ops.cross_entropy import IGNORE_INDEX
from .checkpoint import Checkpointer
from .distributed import DistInfo, all_reduce_max, all_reduce_sum, barrier
from .metrics import MetricsLog
from .parallel import parallelize
from .schedule import CosineSchedule


class TrainingDiverged(UserError):
    """``Engine.fit``: the training loss became nan or inf (``loss``, at ``step``). A UserError, so ``openxlstm
    train`` prints it as one line; the experiments catch it and record the cell or rung as diverged."""

    def __init__(self, loss: float, step: int):
        self.loss, self.step = loss, step
        super().__init__(f"the training loss is {loss} at step {step}: lower the learning rate or check the data")


class Preempted(Exception):
    """``Engine.fit`` stopped at a step boundary after SIGTERM or SIGUSR1, with a checkpoint saved (when the run
    saves). ``exit_status``: 143 for SIGTERM (128 + 15, as if killed by it), 0 for SIGUSR1 (SLURM sends it
    before a job's time runs out; the job is requeued and resumes)."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        self.exit_status = 0 if signum == getattr(signal, "SIGUSR1", None) else 128 + signum
        super().__init__(f"{signal.Signals(signum).name} at step {step}")


PREEMPT_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)


@dataclass
class EngineConfig:
    """How a model is trained, apart from its data and schedule."""

    weight_decay: float = 0.1  # AdamW, on the groups of model.optim_groups
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # gradient norm clip; 0: none
    grad_accum: int = 1  # micro-batches per optimizer step
    device: str = "auto"  # auto (cuda:LOCAL_RANK when available), cpu, cuda, cuda:N
    dtype: str = "auto"  # autocast: auto (bf16 on CUDA, float32 elsewhere), float32, bfloat16
    compile: Union[bool, str] = False  # torch.compile: True (inductor) or a backend name ("aot_eager", ...)
    activation_checkpointing: bool = False  # recompute each block in backward instead of keeping activations
    fsdp: bool = False  # shard with FSDP2 over torchrun's processes; otherwise DDP when there are several


@dataclass
class FitResult:
    step: int  # the step reached
    losses: list[float] = field(default_factory=list)  # training loss of each step run by this fit
    eval: Optional[dict] = None  # the last evaluate() result
    stopped_early: bool = False  # by the time limit
    seconds: float = 0.0


def scored(labels: torch.Tensor) -> torch.Tensor:
    """Which labels are scored: ids other than -100, or finite float targets."""
    return labels.isfinite() if labels.is_floating_point() else labels != IGNORE_INDEX


def _format_row(row: dict, until: int) -> str:
    parts = [f"step {row['step']}/{until}"]
    if "train_loss" in row:
        parts.append(f"loss {row['train_loss']:.4f}")
    for key, value in row.items():
        if key not in ("step", "tokens", "elapsed_s", "lr", "train_loss", "tokens_per_s", "peak_mem_gib") and \
                isinstance(value, float):
            parts.append(f"{key.replace('_', ' ')} {value:.4f}")
    if "tokens_per_s" in row:
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    if "peak_mem_gib" in row:
        parts.append(f"peak {row['peak_mem_gib']:.2f} GiB")
    parts.append(f"{row['elapsed_s']:.0f}s")
    return "  ".join(parts)


class Engine:
    """Trains ``model`` (any architecture of the registry, or any module with ``optim_groups`` and the
    ``labels=`` forward) with the optimizer, schedule and hardware of ``config``.

    Args:
        model: a bare model (on any device: the engine moves it); under FSDP it is sharded in place.
        schedule: the learning rate of each step.
        config: see EngineConfig (default: its defaults).
        dist: this process's rank and the number of processes (torchrun); default one process.
        init_state: under FSDP, for a model built on the meta device on every process: the whole-model state
            dict to start from, on the main process only (None on the others); it is broadcast into each
            process's shards, so only the main process ever holds the whole model (``train --init --fsdp``).
    """

    def __init__(self, model: nn.Module, schedule: CosineSchedule, config: Optional[EngineConfig] = None,
                 dist: Optional[DistInfo] = None, init_state: Optional[dict] = None):
        config = config or EngineConfig()
        if config.grad_accum < 1:
            raise UserError(f"--grad-accum must be a positive integer, got {config.grad_accum}")
        self.config, self.schedule = config, schedule
        self.dist = dist or DistInfo()
        self.device = resolve_device(config.device, self.dist.local_rank if self.dist.enabled else 0)
        self.dtype = autocast_dtype(config.dtype, self.device)
        self.fsdp = config.fsdp
        self.model = model  # the bare model: checkpoints hold its state (sharded in place under FSDP)
        self.forward, self.train_forward = parallelize(
            model, self.device, activation_checkpointing=config.activation_checkpointing, compile=config.compile,
            fsdp=config.fsdp, param_dtype=self.dtype, dist_info=self.dist, init_state=init_state)
        # after sharding: under FSDP the optimizer holds the local shards
        self.optimizer = torch.optim.AdamW(model.optim_groups(config.weight_decay), lr=schedule.lr,
                                           betas=tuple(config.betas), eps=config.eps)
        self.checkpointer = Checkpointer(self, config.fsdp, self.dist)
        self.step = 0  # optimizer steps taken
        self.tokens = 0  # input tokens trained on, all processes
        self._signal: Optional[int] = None  # a preemption signal received during fit

    # one step ------------------------------------------------------------------------------------------
    def _grad_sync(self, last: bool):
        """Gradients are reduced over processes only after the last micro-batch of a step."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
        elif self.dist.enabled and not last:
            return self.train_forward.no_sync()
        return nullcontext()

    def train_step(self, inputs: torch.Tensor, labels: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> float:
        """One optimizer step on this process's share of the global batch.

        inputs, labels: (b, ...) host tensors, b a multiple of ``grad_accum`` (token ids (b, S) for a language
        model); cu_seqlens: packed documents over the b*S tokens, every row start a boundary
        (``data.packing.window_batch``), passed to the model per micro-batch. Returns the step's mean loss over
        the scored labels of the global batch (all processes).
        """
        accum = self.config.grad_accum
        if inputs.shape[0] % accum:
            raise ValueError(f"a batch of {inputs.shape[0]} rows does not split into {accum} micro-batches")
        micro = inputs.shape[0] // accum
        world = self.dist.world_size
        self.schedule.apply(self.optimizer, self.step)
        counts = scored(labels).reshape(accum, -1).sum(1).tolist()  # scored labels per micro-batch
        total = max(all_reduce_sum([float(sum(counts))], self.device)[0] if self.dist.enabled else sum(counts), 1)
        loss_sum = torch.zeros((), device=self.device)
        packed = {} if cu_seqlens is None else {  # each micro-batch's own cu_seqlens
            a: {"cu_seqlens": cu.to(self.device, non_blocking=True)}
            for a, cu in enumerate(split_micro_batches(cu_seqlens, inputs.shape[0], inputs.shape[1], accum))}
        for a in range(accum):
            x = inputs[a * micro:(a + 1) * micro].to(self.device, non_blocking=True)  # (micro, ...)
            y = labels[a * micro:(a + 1) * micro].to(self.device, non_blocking=True)
            with self._grad_sync(a == accum - 1), autocast(self.device, self.dtype):
                loss = self.train_forward(x, labels=y, **packed.get(a, {})).loss  # mean over the scored labels
            # processes average their gradients, so weigh each micro-batch by its share of the global batch
            (loss * (counts[a] * world / total)).backward()
            loss_sum += loss.detach() * (counts[a] / total)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += inputs.numel() * world
        return all_reduce_sum([float(loss_sum)], self.device)[0] if self.dist.enabled else float(loss_sum)

    # evaluation ----------------------------------------------------------------------------------------
    def evaluate(self, batches: Sequence, accuracy: bool = False) -> EvalResult:
        """Mean loss over the scored tokens of (input_ids, labels) batches (this process's share; every
        process calls it), and with ``accuracy`` the fraction of scored positions predicted right."""
        batches = list(batches)
        rounds = len(batches)
        if self.fsdp and self.dist.enabled:
            rounds = int(all_reduce_max([float(rounds)], self.device)[0])
        was_training = self.model.training
        self.model.eval()
        try:
            sums = eval_sums(self.forward, batches, self.device, self.dtype, accuracy, rounds)
        finally:
            self.model.train(was_training)
        if self.dist.enabled:
            sums = all_reduce_sum(sums, self.device)
        return eval_result(sums, accuracy)

    # the loop ------------------------------------------------------------------------------------------
    def fit(self, batch_at: Callable[[int], tuple], until: int, *, max_seconds: Optional[float] = None,
            log_every: int = 10, eval_every: Optional[int] = None, evaluate: Optional[Callable[[], dict]] = None,
            save_every: Optional[int] = None, save: Optional[Callable[[], object]] = None,
            metrics: Optional[MetricsLog] = None, log: Callable[[str], None] = print,
            progress: bool = False) -> FitResult:
        """Train from ``self.step`` to step ``until``, one ``train_step(*batch_at(step))`` per step.

        Every ``log_every`` steps and at the last: a row {step, tokens, elapsed_s, lr, train_loss (mean since
        the previous row), tokens_per_s, peak_mem_gib on GPU} to ``metrics`` and as a line to ``log`` (a progress bar instead with
        ``progress``). ``evaluate()`` -> row fields runs every ``eval_every`` steps, at the last step and when
        the time is up; ``save()`` every ``save_every`` steps, at the last, when the time is up and on Ctrl-C.
        ``max_seconds`` ends the loop after the step that passes it. SIGTERM or SIGUSR1 (preemption) ends it at
        the next step boundary, every process at the same step, with ``save()``, then raises ``Preempted``.
        """
        main = self.dist.is_main
        bar = None
        if progress and main:
            from tqdm import tqdm

            bar = tqdm(total=until, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr)
        start = time.time()
        window_loss, window_steps, window_t0, window_tokens = 0.0, 0, start, self.tokens
        result = FitResult(step=self.step)
        previous = self._catch_preemption()
        try:
            while self.step < until:
                loss = self.train_step(*batch_at(self.step))
                result.losses.append(loss)
                window_loss, window_steps = window_loss + loss, window_steps + 1
                if not math.isfinite(loss):
                    raise TrainingDiverged(loss, self.step)
                now = time.time()
                tok_s = (self.tokens - window_tokens) / max(now - window_t0, 1e-9)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                row = {}
                if self.step % log_every == 0 or self.step == until:
                    row.update(train_loss=round(window_loss / window_steps, 5), tokens_per_s=round(tok_s, 1))
                    window_loss, window_steps, window_t0, window_tokens = 0.0, 0, now, self.tokens
                timed_out = max_seconds is not None and now - start > max_seconds
                evaluated = evaluate is not None and (self.step == until or timed_out or
                                                      (eval_every is not None and self.step % eval_every == 0))
                if evaluated:
                    result.eval = evaluate()
                    row.update(result.eval)
                if row:
                    row = {"step": self.step, "tokens": self.tokens, "elapsed_s": round(time.time() - start, 2),
                           "lr": self.schedule.lr_at(self.step - 1), **row}
                    if self.device.type == "cuda":  # the most GPU memory held so far
                        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
                    if metrics is not None and main:
                        metrics.log(**row)
                    if bar is not None and (self.step == until or timed_out):
                        bar.close()  # the finished bar once, the last row below it (a write would redraw it)
                        bar = None
                    if bar is None:
                        log(_format_row(row, until))
                    elif evaluated:
                        bar.write(_format_row(row, until))
                if save is not None and (self.step == until or timed_out or
                                         (save_every is not None and self.step % save_every == 0)):
                    save()
                if timed_out:
                    result.stopped_early = True
                    log(f"time limit of {max_seconds / 60:.2f} min reached at step {self.step}")
                    break
                signum = self._preemption_signal()
                if signum is not None:
                    if bar is not None:
                        bar.close()
                        bar = None
                    if save is not None:
                        save()
                    raise Preempted(signum, self.step)
        except KeyboardInterrupt:
            if save is not None:
                save()
                barrier()
            raise
        finally:
            if bar is not None:
                bar.close()
            self._restore_signals(previous)
        result.step, result.seconds = self.step, time.time() - start
        return result

    def _catch_preemption(self) -> dict:
        """Handlers that note SIGTERM / SIGUSR1 for the loop to act on at the next step boundary (only the main
        thread can install them); returns the handlers they replace."""
        self._signal = None
        if threading.current_thread() is not threading.main_thread():
            return {}

        def note(signum, frame):
            self._signal = signum

        return {s: signal.signal(s, note) for s in PREEMPT_SIGNALS}

    @staticmethod
    def _restore_signals(previous: dict) -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    def _preemption_signal(self) -> Optional[int]:
        """The preemption signal to stop at now, agreed by every process (the largest one any received)."""
        signum = self._signal or 0
        if self.dist.enabled:
            signum = int(all_reduce_max([float(signum)], self.device)[0])
        return signum or None

    # checkpoints ---------------------------------------------------------------------------------------
    def save(self, run_dir, tokenizer=None, train_config: Optional[dict] = None, extra: Optional[dict] = None,
             keep: int = 2) -> Optional[Path]:
        """Checkpoint step ``self.step`` into RUN/ckpt-NNNNNN (every process calls it); returns its directory on
        the main process."""
        return self.checkpointer.save(run_dir, tokenizer, train_config, extra, keep)

    def resume(self, ckpt: Path) -> None:
        """Continue from checkpoint ``ckpt``: weights, optimizer, step, tokens seen, RNG states."""
        self.checkpointer.resume(ckpt)

    def unsharded_model(self) -> Optional[nn.Module]:
        """The bare model for inference on the main process (None on the others; every process must call)."""
        return self.checkpointer.unsharded_model()


__all__ = ["Engine", "EngineConfig", "TrainingDiverged", "Preempted", "FitResult", "scored"]
