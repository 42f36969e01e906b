"""The training engine: every run trains through it.

``openxlstm train`` (``loop.py``), the experiment grid cells (``experiments/runner.py``) and the LM ablation
rungs (``experiments/ablation.py``) each hand an ``Engine`` a model, a schedule and an ``EngineConfig``, so
every feature reaches every run:

    EngineConfig.device, .dtype        the model on its device; bf16 autocast on GPU ("auto")
    .activation_checkpointing          model.set_activation_checkpointing(True): blocks recomputed in backward
    .compile                           torch.compile (True or a backend name; each block in place under FSDP)
    several torchrun processes         DDP, or FSDP2 with .fsdp (``parallel.py``)
    .weight_decay, .betas, .grad_clip  AdamW on the model's ``optim_groups``, clipping; the CosineSchedule
    .grad_accum                        micro-batches per optimizer step
    train_step(input_ids, labels[, cu_seqlens])  one optimizer step; the loss is the model's:
                                       model(x, labels=y[, cu_seqlens=...]).loss (packed documents)
    evaluate(batches)                  mean loss (and accuracy) over the scored tokens
    fit(batch_at, until, ...)          the loop: metrics rows, evaluation, checkpoints, time limit, Ctrl-C
    save(run_dir, ...), resume(ckpt)   safetensors (one process, DDP) or sharded DCP (FSDP), interchangeable

Labels hold the target of each position (for a language model the next token), -100 where nothing is scored.
A step's loss is the mean over the scored tokens of the whole global batch, however it is split into
micro-batches and processes, so 2 processes or 2 accumulation steps follow the trajectory of one.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict, set_state_dict)

from ..data.packing import split_micro_batches
from ..device import autocast_dtype, resolve_device
from ..errors import UserError
from ..models import arch_of, build_model
from ..ops.cross_entropy import IGNORE_INDEX
from ..io.run import (DCP_DIR, WEIGHTS_FILE, begin_checkpoint, finish_checkpoint, load_trainer_state, load_weights,
                         save_checkpoint)
from .distributed import DistInfo, all_reduce_max, all_reduce_sum, barrier, is_initialized
from .metrics import MetricsLog
from .parallel import apply_ddp, apply_fsdp
from .schedule import CosineSchedule


class TrainingDiverged(UserError):
    """``Engine.fit``: the training loss became nan or inf (``loss``, at ``step``). A UserError, so ``openxlstm
    train`` prints it as one line; the experiments catch it and record the cell or rung as diverged."""

    def __init__(self, loss: float, step: int):
        self.loss, self.step = loss, step
        super().__init__(f"the training loss is {loss} at step {step}: lower the learning rate or check the data")


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
class EvalResult:
    loss: float  # mean over the scored tokens (nats)
    tokens: int  # scored tokens, all processes
    accuracy: Optional[float] = None  # fraction of scored positions whose arg-max logit is the label


@dataclass
class FitResult:
    step: int  # the step reached
    losses: list[float] = field(default_factory=list)  # training loss of each step run by this fit
    eval: Optional[dict] = None  # the last evaluate() result
    stopped_early: bool = False  # by the time limit
    seconds: float = 0.0


def compile_backend(value: Union[bool, str, None]) -> Optional[str]:
    """torch.compile's backend for a ``compile`` setting (None: no compilation)."""
    if value is True:
        return "inductor"
    if not value:
        return None
    known = torch.compiler.list_backends(exclude_tags=())
    if value not in known:
        raise UserError(f"--compile {value!r}: not a torch.compile backend; use inductor (the default), aot_eager, "
                        f"eager, cudagraphs (all: torch.compiler.list_backends(exclude_tags=()))")
    return value


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def _eval_sums(forward, batches: Sequence, device, dtype, accuracy: bool, rounds: int) -> list[float]:
    """[loss summed over scored tokens, scored tokens, correct] over ``batches``; ``rounds`` > len(batches)
    adds forward passes whose results are dropped (FSDP: every process must gather parameters as often)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for j in range(rounds):
        if j >= len(batches):
            ids = batches[0][0] if batches else torch.zeros(1, 1, dtype=torch.int64)
            with _autocast(device, dtype):
                forward(ids[:1].to(device))
            continue
        x, y, *cu = (t.to(device, non_blocking=True) for t in batches[j])  # (b, S) each, packed: cu_seqlens
        with _autocast(device, dtype):
            out = forward(x, labels=y, return_logits=accuracy, **({"cu_seqlens": cu[0]} if cu else {}))
        loss_sum += out.loss.double() * out.num_tokens
        count += out.num_tokens
        if accuracy:
            correct += ((out.logits.argmax(-1) == y) & (y != IGNORE_INDEX)).sum()
    return [float(loss_sum), float(count), float(correct)]


def _result(sums: list[float], accuracy: bool) -> EvalResult:
    loss_sum, count, correct = sums
    return EvalResult(loss=loss_sum / max(count, 1.0), tokens=int(count),
                      accuracy=correct / max(count, 1.0) if accuracy else None)


def evaluate_model(model: nn.Module, batches: Sequence, device="cpu", dtype: Optional[torch.dtype] = None,
                   accuracy: bool = False) -> EvalResult:
    """One process, no engine: the mean loss of a model over (input_ids, labels) batches (see Engine.evaluate)."""
    batches = list(batches)
    was_training = model.training
    model.eval()
    try:
        sums = _eval_sums(model, batches, torch.device(device), dtype, accuracy, len(batches))
    finally:
        model.train(was_training)
    return _result(sums, accuracy)


def _full_state_from_safetensors(model: nn.Module, path: Path) -> dict:
    """A whole-model state dict from a safetensors file, with tied parameters (saved once) under each name."""
    saved = load_file(str(path))
    by_tensor: dict = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(t), []).append(name)
    for names in by_tensor.values():
        present = [n for n in names if n in saved]
        for n in names:
            if n not in saved and present:
                saved[n] = saved[present[0]]
    return saved


def _optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """``optimizer.state_dict()`` (parameters numbered in group order) keyed by parameter names instead, the
    form ``set_optimizer_state_dict`` shards."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[int(i)]: s for i, s in saved["state"].items()},
            "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in saved["param_groups"]]}


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
        if self.fsdp and not is_initialized():
            raise UserError("--fsdp shards the model over the processes that torchrun starts: run "
                            "torchrun --nproc_per_node=N -m openxlstm train --fsdp ...")
        if config.activation_checkpointing:
            if not hasattr(model, "set_activation_checkpointing"):
                raise UserError(f"{type(model).__name__} has no activation checkpointing")
            model.set_activation_checkpointing(True)
        on_meta = any(p.is_meta for p in model.parameters())
        if on_meta and not self.fsdp:
            raise ValueError("Engine: a model on the meta device is filled from init_state under FSDP only")
        self.model = model if on_meta else model.to(self.device)  # the bare model: checkpoints hold its state
        backend = compile_backend(config.compile)
        if self.fsdp:
            apply_fsdp(model, self.device, param_dtype=self.dtype, compile_backend=backend)
            if on_meta:  # every process allocates its shards, the main process's whole state fills them
                model.to_empty(device=self.device)
                set_model_state_dict(model, init_state if self.dist.is_main else {},
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
            self.forward = self.train_forward = model
        else:  # compiled through a wrapper: self.model stays the bare module, its state dict keys unprefixed
            self.forward = torch.compile(model, backend=backend) if backend else model  # evaluation and training
            self.train_forward = apply_ddp(self.forward, self.device) if self.dist.enabled else self.forward
        # after sharding: under FSDP the optimizer holds the local shards
        self.optimizer = torch.optim.AdamW(model.optim_groups(config.weight_decay), lr=schedule.lr,
                                           betas=tuple(config.betas), eps=config.eps)
        self.step = 0  # optimizer steps taken
        self.tokens = 0  # input tokens trained on, all processes

    # one step ------------------------------------------------------------------------------------------
    def _grad_sync(self, last: bool):
        """Gradients are reduced over processes only after the last micro-batch of a step."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
        elif self.dist.enabled and not last:
            return self.train_forward.no_sync()
        return nullcontext()

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor,
                   cu_seqlens: Optional[torch.Tensor] = None) -> float:
        """One optimizer step on this process's share of the global batch.

        input_ids, labels: (b, S) host tensors, b a multiple of ``grad_accum``; cu_seqlens: packed documents
        over the b*S tokens, every row start a boundary (``data.packing.window_batch``), passed to the model
        per micro-batch. Returns the step's mean loss over the scored tokens of the global batch (all processes).
        """
        accum = self.config.grad_accum
        if input_ids.shape[0] % accum:
            raise ValueError(f"a batch of {input_ids.shape[0]} rows does not split into {accum} micro-batches")
        micro = input_ids.shape[0] // accum
        world = self.dist.world_size
        self.schedule.apply(self.optimizer, self.step)
        counts = (labels != IGNORE_INDEX).reshape(accum, -1).sum(1).tolist()  # scored tokens per micro-batch
        total = max(all_reduce_sum([float(sum(counts))], self.device)[0] if self.dist.enabled else sum(counts), 1)
        loss_sum = torch.zeros((), device=self.device)
        packed = {} if cu_seqlens is None else {  # each micro-batch's own cu_seqlens
            a: {"cu_seqlens": cu.to(self.device, non_blocking=True)}
            for a, cu in enumerate(split_micro_batches(cu_seqlens, input_ids.shape[0], input_ids.shape[1], accum))}
        for a in range(accum):
            x = input_ids[a * micro:(a + 1) * micro].to(self.device, non_blocking=True)  # (micro, S)
            y = labels[a * micro:(a + 1) * micro].to(self.device, non_blocking=True)  # (micro, S)
            with self._grad_sync(a == accum - 1), _autocast(self.device, self.dtype):
                loss = self.train_forward(x, labels=y, **packed.get(a, {})).loss  # mean over the scored tokens
            # processes average their gradients, so weigh each micro-batch by its share of the global batch
            (loss * (counts[a] * world / total)).backward()
            loss_sum += loss.detach() * (counts[a] / total)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += input_ids.numel() * world
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
            sums = _eval_sums(self.forward, batches, self.device, self.dtype, accuracy, rounds)
        finally:
            self.model.train(was_training)
        if self.dist.enabled:
            sums = all_reduce_sum(sums, self.device)
        return _result(sums, accuracy)

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
        ``max_seconds`` ends the loop after the step that passes it.
        """
        main = self.dist.is_main
        bar = None
        if progress and main:
            from tqdm import tqdm

            bar = tqdm(total=until, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr)
        start = time.time()
        window_loss, window_steps, window_t0, window_tokens = 0.0, 0, start, self.tokens
        result = FitResult(step=self.step)
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
        except KeyboardInterrupt:
            if save is not None:
                save()
                barrier()
            raise
        finally:
            if bar is not None:
                bar.close()
        result.step, result.seconds = self.step, time.time() - start
        return result

    # checkpoints ---------------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        """The step, tokens seen, schedule and RNG states (the optimizer is saved with the weights)."""
        return {"schedule": self.schedule.state_dict(), "step": self.step, "tokens": self.tokens,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def save(self, run_dir, tokenizer=None, train_config: Optional[dict] = None, extra: Optional[dict] = None,
             keep: int = 2) -> Optional[Path]:
        """Checkpoint step ``self.step`` into RUN/ckpt-NNNNNN; returns its directory on the main process.

        One process or DDP: the main process writes model.safetensors and the optimizer into trainer.pt.
        FSDP: every process (all must call) writes its shards of the model and optimizer with DCP.
        """
        state = self.trainer_state()
        if not self.fsdp:
            if not self.dist.is_main:
                return None
            state["optimizer"] = self.optimizer.state_dict()
            return save_checkpoint(run_dir, self.step, self.model, tokenizer, train_config, state, extra, keep)
        tmp = begin_checkpoint(run_dir, self.step, create=self.dist.is_main)
        barrier()
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / DCP_DIR))
        path = None
        if self.dist.is_main:
            path = finish_checkpoint(run_dir, self.step, tmp, self.model, tokenizer, train_config, state, extra,
                                     keep, weights="dcp")
        barrier()
        return path

    def resume(self, ckpt: Path) -> None:
        """Continue from checkpoint ``ckpt``: weights, optimizer, step, tokens seen, RNG states. Any checkpoint
        resumes in any set-up: sharded ones on another number of processes or unsharded, whole-model ones
        into FSDP."""
        ckpt = Path(ckpt)
        state = load_trainer_state(ckpt)
        if (ckpt / DCP_DIR).is_dir():
            # the state dicts to fill, in this run's layout (get_state_dict first creates the optimizer state)
            model_state, optim_state = get_state_dict(self.model, self.optimizer)
            blob = {"model": model_state, "optimizer": optim_state}
            with warnings.catch_warnings():  # one process without a group: "assuming ... a single process"
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(blob, checkpoint_id=str(ckpt / DCP_DIR), no_dist=not is_initialized())
            set_state_dict(self.model, self.optimizer, model_state_dict=blob["model"],
                           optim_state_dict=blob["optimizer"])
        elif not self.fsdp:
            load_weights(self.model, ckpt)
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (KeyError, ValueError) as e:
                raise UserError(f"checkpoint {str(ckpt)!r} is corrupt: the optimizer state in trainer.pt does not fit "
                                f"the model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        else:  # whole-model checkpoint into shards: every process reads it and keeps its own shards
            full = StateDictOptions(full_state_dict=True)
            weights = _full_state_from_safetensors(self.model, ckpt / WEIGHTS_FILE)
            optim = _optimizer_state_by_name(self.model, self.optimizer, state["optimizer"])
            set_model_state_dict(self.model, weights, options=full)
            set_optimizer_state_dict(self.model, self.optimizer, optim, options=full)
        self.step = int(state["step"])
        self.tokens = int(state.get("tokens", 0))
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def unsharded_model(self) -> Optional[nn.Module]:
        """The bare model for inference on the main process (None on the others): the model itself, or under
        FSDP a whole copy gathered from the shards (every process must call)."""
        if not self.fsdp:
            return self.model if self.dist.is_main else None
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.dist.is_main:
            return None
        copy = build_model(arch_of(self.model), self.model.config.to_dict())
        copy.load_state_dict(full)
        return copy.to(self.device).eval()


__all__ = ["Engine", "EngineConfig", "TrainingDiverged", "EvalResult", "FitResult", "evaluate_model", "compile_backend",
           "IGNORE_INDEX"]
