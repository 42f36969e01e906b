"""The ``openxlstm train`` application: a language model on a token stream, through the training engine.

A TrainConfig names the data, the model and the budget; ``Trainer`` loads the data, builds the model of
``--arch`` / ``--config`` / ``--preset`` (or, with ``--init DIR``, loads the weights of a pretrained model:
a transformers xLSTM directory such as xLSTM-7B's, the authors' xlstm_large layout or one of our runs) and
hands it to an ``Engine`` (which owns the optimizer, schedule, compile, checkpointing of activations, DDP /
FSDP and checkpoints), then runs the engine's loop with periodic validation, a metrics CSV, a loss plot and
samples at the end.

The batch of step t depends only on (seed, t) and every process takes its slice of the global batch, so
a resumed run, and a run on W processes, follow the same trajectory as one uninterrupted process.
"""

from __future__ import annotations

import json
import signal
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch

from ..config import preset as xlstm_preset
from ..data import BatchSampler, load_data
from ..data.dataset import TOKEN_FILE_SUFFIXES
from ..data.tokenizer import HFTokenizer, load_tokenizer
from ..errors import UserError
from ..evaluate import bits_per_byte, lm_batches
from ..generation import generate
from ..io import load_pretrained
from ..io.files import detect_format, write_error, write_text_atomic
from ..io.hf import TOKENIZER
from ..io.run import model_description, read_meta, resolve_checkpoint
from ..models import LANGUAGE_MODELS, arch_of, build_model, config_from_dict, default_config
from .distributed import (all_reduce_max, barrier, init_distributed, is_initialized, launched_by_torchrun,
                          shutdown)
from .config import TrainConfig
from .engine import Engine, Preempted
from .metrics import MetricsLog, plot_losses
from .rundir import prepare_run_dir

SAMPLE_PROMPTS = ("The ", "def ", "import ")


class RunFinished(Exception):
    """A resumed run that has nothing left to do (its checkpoint is at --max-steps or --stop-at)."""


def resolve_model_config(cfg: TrainConfig, vocab_size: int) -> dict:
    """The model config dict of a fresh run from --config / --preset / defaults, checked against the data."""
    if cfg.arch not in LANGUAGE_MODELS:
        raise UserError(f"unknown --arch {cfg.arch!r}; choose one of {sorted(LANGUAGE_MODELS)}")
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
        model = default_config(cfg.arch, vocab_size, cfg.seq_len, cfg.size)
    return config_from_dict(cfg.arch, model).to_dict()


class Trainer:
    """``openxlstm train``: data, model and engine from a TrainConfig (fresh, or resumed from a checkpoint);
    run with ``fit()``."""

    def __init__(self, cfg: TrainConfig, resume: Optional[str] = None, log=None):
        if cfg.fsdp and not launched_by_torchrun():
            raise UserError("--fsdp shards the model over the processes that torchrun starts: run "
                            "torchrun --nproc_per_node=N -m openxlstm train --fsdp ... (without torchrun, "
                            "leave out --fsdp)")
        self.dist = init_distributed("cuda" if cfg.device.startswith("cuda") or
                                     (cfg.device == "auto" and torch.cuda.is_available()) else "cpu", always=cfg.fsdp)
        self.log = log if log is not None else (lambda msg: print(msg, flush=True))
        if not self.dist.is_main:
            self.log = lambda msg: None
        self.out = Path(cfg.out)
        self.cfg = cfg
        self.lock = None
        self._saved_step = None
        ckpt = resolve_checkpoint(self.out if resume == "auto" else resume) if resume is not None else None
        meta = read_meta(ckpt) if ckpt is not None else None
        if meta is None and cfg.init is not None:
            check_init(cfg)
        if meta is not None and int(meta.get("step") or 0) >= cfg.last_step:  # before anything is written
            if cfg.stop_at is not None and cfg.stop_at < cfg.max_steps:
                limit, further = (f"--stop-at {cfg.stop_at}", f"raise --stop-at, or leave it out to train to "
                                                              f"--max-steps {cfg.max_steps}")
            else:
                limit, further = f"--max-steps {cfg.max_steps}", "raise --max-steps to train further"
            raise RunFinished(f"{ckpt} is at step {meta.get('step')}, {limit} reached: nothing to do, nothing "
                              f"changed ({further})")
        self._prepare_out(ckpt)
        try:
            self._build(cfg, ckpt, meta)
        except BaseException:
            self.close()
            raise

    def _prepare_out(self, ckpt: Optional[Path]) -> None:
        """Lock and check the run directory on the main process (see rundir.py); every process learns
        whether that worked before going on."""
        error = None
        if self.dist.is_main:
            try:
                self.lock = prepare_run_dir(self.out, ckpt, self.cfg.overwrite)
            except UserError as e:
                error = e
        if self.dist.enabled and is_initialized():
            device = f"cuda:{self.dist.local_rank}" if torch.distributed.get_backend() == "nccl" else "cpu"
            failed = all_reduce_max([float(error is not None)], device)[0]
            if failed and error is None:
                raise UserError("the main process could not prepare the run directory (see its error)")
        if error is not None:
            raise error

    def close(self) -> None:
        """Release the run directory's lock."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _build(self, cfg: TrainConfig, ckpt: Optional[Path], meta: Optional[dict]) -> None:
        torch.manual_seed(cfg.seed)

        tokenizer_spec = cfg.tokenizer
        init_model = init_state = None
        if meta is None and cfg.init is not None:  # a fresh fine-tuning run: arch and model from --init
            init_model, init_tokenizer, init_state = self._init_model(cfg)
            if cfg.arch not in (TrainConfig.arch, arch_of(init_model)):
                raise UserError(f"--init {cfg.init!r} holds a model of architecture {arch_of(init_model)}, but --arch "
                                f"is {cfg.arch}: leave out --arch (the model comes from --init)")
            cfg = self.cfg = replace(cfg, arch=arch_of(init_model), model=model_description(init_model)["model"])
            if tokenizer_spec is None:
                tokenizer_spec = init_tokenizer
            elif init_tokenizer is not None:
                raise UserError(f"--tokenizer with --init: the model of {cfg.init!r} reads the ids of its own "
                                f"tokenizer, which the run uses; leave out --tokenizer")
        self.pack_documents = cfg.pack_documents
        if meta is not None and (meta.get("tokenizer") or {}).get("type") == "hf":
            tokenizer_spec = str(ckpt / HFTokenizer.FILE)
        elif meta is not None and (meta.get("tokenizer") or {}).get("type") == "byte":
            tokenizer_spec = load_tokenizer(meta["tokenizer"])  # runs from before the end-of-document id: 256 ids
        if meta is not None and "pack_documents" not in meta.get("train", {}):
            self.pack_documents = False  # a run from before packing resumes on the data it trained on
        self.data = self._load_data(tokenizer_spec)
        self.log(f"data: {self.data.description}")

        if meta is not None:
            if meta["arch"] != cfg.arch:
                raise UserError(f"the checkpoint holds a {meta['arch']} model, but --arch is {cfg.arch}")
            self.model_config = meta["model"]
        elif init_model is not None:
            self.model_config = cfg.model
        else:
            self.model_config = resolve_model_config(cfg, self.data.vocab_size)
        model = init_model if init_model is not None else build_model(cfg.arch, self.model_config)
        if cfg.init is not None:  # a pretrained vocabulary may be padded beyond its tokenizer's
            if self.data.vocab_size > model.config.vocab_size:
                raise UserError(f"the data's vocabulary ({self.data.vocab_size}) is larger than the vocabulary of the "
                                f"--init model ({model.config.vocab_size}): encode the data with the model's "
                                f"tokenizer, or give token ids below {model.config.vocab_size}")
        elif model.config.vocab_size != self.data.vocab_size:
            raise UserError(f"the model's vocabulary ({model.config.vocab_size}) does not match the data's "
                            f"tokenizer ({self.data.vocab_size})")
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

        self.engine = Engine(model, cfg.schedule(), cfg.engine_config(), self.dist, init_state=init_state)
        self.model = model  # the bare model (sharded in place under FSDP)
        self.device = self.engine.device
        if ckpt is not None:
            self.engine.resume(ckpt)
            self.engine.tokens = self.engine.tokens or self.engine.step * cfg.batch_size * cfg.seq_len
            self.log(f"resumed from {ckpt} at step {self.engine.step}")
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.metrics = MetricsLog(self.out, resume_step=self.engine.step if ckpt is not None else None)

    def _init_model(self, cfg: TrainConfig):
        """(model, tokenizer, whole-model state or None) of --init. Under --fsdp only the main process reads the
        directory (a float32 copy on its CPU); every process builds the model on the meta device, and the engine
        fills each process's shards from the main process's state, so no other process holds the whole model."""
        if not (cfg.fsdp and self.dist.enabled):
            model, tokenizer = self._load_init(cfg)
            return model, tokenizer, None
        payload, state, failure = [None], None, None
        if self.dist.is_main:
            try:
                model, tokenizer = self._load_init(cfg)
                state = model.state_dict()
                payload = [(arch_of(model), model_description(model)["model"], tokenizer, None)]
            except Exception as e:  # any failure: the other processes must not wait for the broadcast forever
                failure = e
                payload = [(None, None, None, str(e) if isinstance(e, UserError) else
                            f"the main process could not read --init {cfg.init!r} (see its error)")]
        torch.distributed.broadcast_object_list(payload, src=0)
        if failure is not None:
            raise failure
        arch, config, tokenizer, error = payload[0]
        if error is not None:
            raise UserError(error)
        with torch.device("meta"):
            model = build_model(arch, config)
        return model.train(), tokenizer, state

    def _load_init(self, cfg: TrainConfig):
        """(model in float32 on the CPU, training mode; the tokenizer to use when --tokenizer is not given) from
        --init: a transformers or xlstm_large directory (its tokenizer.json) or an openxlstm run (its
        tokenizer)."""
        init = Path(cfg.init).expanduser()
        fmt = detect_format(init)
        model, tokenizer, _ = load_pretrained(init, dtype=torch.float32, device="cpu")
        if hasattr(model, "tokenizer"):
            del model.tokenizer
        if fmt != "openxlstm":
            tokenizer = str(init / TOKENIZER) if (init / TOKENIZER).is_file() else None
        if (cfg.tokenizer is None and tokenizer is None
                and (cfg.data is None or Path(cfg.data).suffix not in TOKEN_FILE_SUFFIXES)):
            why = ("the run was trained on a token file without a tokenizer" if fmt == "openxlstm"
                   else f"it has no {TOKENIZER}")
            raise UserError(f"--init {cfg.init!r} has no tokenizer ({why}): pass --tokenizer (e.g. the model's "
                            f"tokenizer.json) or --data with a token file ({' or '.join(TOKEN_FILE_SUFFIXES)}) of "
                            f"the model's ids")
        return model.train(), tokenizer

    @property
    def step(self) -> int:
        return self.engine.step

    def _load_data(self, tokenizer_spec):
        cfg = self.cfg
        trains_bpe = isinstance(tokenizer_spec, str) and tokenizer_spec.startswith("bpe:")
        if trains_bpe and self.dist.enabled:  # one process trains the BPE, the others read its file
            shared = self.out / "tokenizer.json"
            if self.dist.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                data = load_data(cfg.data, tokenizer_spec, cfg.val_fraction, cfg.bin_dtype, self.pack_documents)
                data.tokenizer.save(self.out)
            barrier()
            if not self.dist.is_main:
                data = load_data(cfg.data, str(shared), cfg.val_fraction, cfg.bin_dtype, self.pack_documents)
            return data
        return load_data(cfg.data, tokenizer_spec, cfg.val_fraction, cfg.bin_dtype, self.pack_documents)

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> tuple[float, Optional[float]]:
        """(validation loss, bits per byte or None) on ``eval_tokens`` held-out tokens."""
        batches = lm_batches(self.data.val, self.cfg.seq_len, self.cfg.eval_tokens, max(16, self.micro_batch),
                             self.dist.rank, self.dist.world_size, self.data.val_starts)
        loss = self.engine.evaluate(batches).loss
        return loss, bits_per_byte(loss, self.data.bytes_per_token)

    def _validation_row(self) -> dict:
        loss, bpb = self.validate()
        return {"val_loss": round(loss, 5), "val_bpb": "" if bpb is None else round(bpb, 5)}

    def save(self) -> Optional[Path]:
        """Checkpoint the current step (once: Ctrl-C right after a periodic save does not write it again)."""
        if self._saved_step == self.step:
            return None
        path = self.engine.save(self.out, self.data.tokenizer, asdict(self.cfg),
                                extra={"bytes_per_token": self.data.bytes_per_token})
        self._saved_step = self.step
        return path

    def fit(self) -> dict:
        """Train to ``max_steps`` (or ``stop_at`` / ``max_time``), validating, logging and checkpointing."""
        cfg = self.cfg
        last_step = cfg.last_step
        params = self.model.num_params()  # a sharded parameter counts its whole size
        self.log(f"model: {cfg.arch}, {params:,} parameters; {last_step - self.step} steps of {cfg.batch_size} x "
                 f"{cfg.seq_len} tokens on {self.device} x {self.dist.world_size}"
                 + (" (FSDP)" if cfg.fsdp else " (DDP)" if self.dist.enabled else ""))
        try:
            run = self.engine.fit(lambda step: self.sampler.batch(self.data.train, step, self.data.train_starts), last_step,
                                  max_seconds=None if cfg.max_time is None else cfg.max_time * 60,
                                  log_every=cfg.log_every, eval_every=cfg.eval_every, evaluate=self._validation_row,
                                  save_every=cfg.save_every, save=self.save,
                                  metrics=self.metrics if self.dist.is_main else None, log=self.log,
                                  progress=cfg.progress)
        except KeyboardInterrupt:
            self.log(f"\ninterrupted at step {self.step}; checkpoint saved in {self.out} (continue with --resume)")
            raise
        except Preempted as e:
            self.log(f"\n{signal.Signals(e.signum).name} at step {self.step}: checkpoint saved in {self.out} (continue "
                     f"with --resume)")
            raise
        barrier()
        last = run.eval or {}
        val_bpb = last.get("val_bpb")
        result = {"arch": cfg.arch, "params": params, "steps": self.step, "tokens": self.engine.tokens,
                  "time_s": round(run.seconds, 1), "val_loss": last.get("val_loss"),
                  "val_bpb": val_bpb if val_bpb != "" else None, "stopped_early": run.stopped_early,
                  "finished": self.step >= cfg.max_steps, "checkpoint": str(self.out)}
        if self.dist.is_main:
            self.metrics.close()
            png = plot_losses({cfg.arch: self.out / "metrics.csv"}, self.out / "loss.png",
                              title=f"{cfg.arch}, {params / 1e6:.2f}M parameters")
            result["plot"] = None if png is None else str(png)
            write_text_atomic(self.out / "summary.json", json.dumps(result, indent=2) + "\n")
        return result

    def samples(self, count: int, max_new_tokens: int) -> list[tuple[str, str]]:
        """(prompt, continuation) pairs from the trained model (empty without a tokenizer); every process
        calls it (under FSDP the model is gathered first)."""
        if self.data.tokenizer is None or count <= 0:
            return []
        model = self.engine.unsharded_model()
        if model is None:
            return []
        prompts = [SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)] for i in range(count)]
        texts = generate(model, prompts, self.data.tokenizer, max_new_tokens=max_new_tokens, temperature=0.8,
                         top_k=50, seed=self.cfg.seed)
        return list(zip(prompts, texts))


def check_init(cfg: TrainConfig) -> None:
    """A fresh run's --init: an existing directory outside --out, and no other model choice beside it (one-line
    UserErrors). Checked before the run directory is prepared, which with --overwrite deletes a run there."""
    given = [f"--{name}" for name in ("model", "preset", "size") if getattr(cfg, name) is not None]
    if given:
        raise UserError(f"--init takes the architecture and model config from {cfg.init!r}: leave out "
                        f"{', '.join(given).replace('--model', '--config')}")
    init = Path(cfg.init).expanduser()
    if not init.exists():
        raise UserError(f"--init {cfg.init!r} does not exist: pass a model directory (transformers, xlstm_large "
                        f"or an openxlstm run)")
    if not init.is_dir():
        raise UserError(f"--init {cfg.init!r} is a file: pass the model directory that holds it")
    out = Path(cfg.out).expanduser().resolve()
    if init.resolve() == out or out in init.resolve().parents:
        raise UserError(f"--init {cfg.init!r} lies in --out {cfg.out!r}: the new run would write over (with "
                        f"--overwrite, delete) the model it starts from; choose another --out")
    try:
        detect_format(init)
    except UserError as e:
        raise UserError(f"--init: {e}") from None


def train(cfg: TrainConfig, resume: Optional[str] = None, log=None) -> dict:
    """Run a whole training (see TrainConfig); returns the summary dict (also written to OUT/summary.json).

    A resumed run with nothing left to do returns ``{"already_finished": message}`` and writes nothing. A
    full disk or a forbidden path is a one-line UserError; the last checkpoint stays intact."""
    trainer = None
    try:
        trainer = Trainer(cfg, resume=resume, log=log)
        result = trainer.fit()
        result["samples"] = trainer.samples(cfg.samples, cfg.sample_tokens)
    except RunFinished as e:
        return {"already_finished": str(e), "checkpoint": cfg.out}
    except OSError as e:
        raise write_error(e, f"the run's files into {cfg.out!r}") or e
    finally:
        if trainer is not None:
            trainer.close()
        shutdown()
    return result


__all__ = ["Trainer", "train", "check_init", "RunFinished", "resolve_model_config"]
