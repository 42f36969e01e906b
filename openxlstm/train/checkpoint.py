"""Checkpoints of a training run, whatever its parallelism: ``Checkpointer`` saves and resumes the model,
the optimizer and the trainer state (step, tokens seen, schedule, RNG states) through the run-directory
format of ``openxlstm.io.run``.

    one process or DDP   the main process writes model.safetensors and the optimizer into trainer.pt
    FSDP                 every process writes its shards of the model and optimizer with DCP (dcp/)

Any checkpoint resumes in any set-up: sharded ones on another number of processes or unsharded, whole-model
ones into FSDP.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict, set_state_dict)

from ..errors import UserError
from ..io.run import (DCP_DIR, WEIGHTS_FILE, begin_checkpoint, finish_checkpoint, load_trainer_state, load_weights,
                      save_checkpoint)
from ..models import arch_of, build_model
from .distributed import DistInfo, barrier, is_initialized


class Checkpointer:
    """Saves and resumes ``model`` (the bare model: sharded in place under FSDP) with ``optimizer``; the
    trainer state comes from and goes back to ``engine`` (its step, tokens and schedule)."""

    def __init__(self, engine, fsdp: bool, dist_info: DistInfo):
        self.engine, self.fsdp, self.dist = engine, fsdp, dist_info

    @property
    def model(self) -> nn.Module:
        return self.engine.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    def trainer_state(self) -> dict:
        """The step, tokens seen, schedule and RNG states (the optimizer is saved with the weights)."""
        e = self.engine
        return {"schedule": e.schedule.state_dict(), "step": e.step, "tokens": e.tokens,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def save(self, run_dir, tokenizer=None, train_config: Optional[dict] = None, extra: Optional[dict] = None,
             keep: int = 2) -> Optional[Path]:
        """Checkpoint step ``self.engine.step`` into RUN/ckpt-NNNNNN; returns its directory on the main process.

        One process or DDP: the main process writes model.safetensors and the optimizer into trainer.pt.
        FSDP: every process (all must call) writes its shards of the model and optimizer with DCP.
        """
        state = self.trainer_state()
        if not self.fsdp:
            if not self.dist.is_main:
                return None
            state["optimizer"] = self.optimizer.state_dict()
            return save_checkpoint(run_dir, self.engine.step, self.model, tokenizer, train_config, state, extra, keep)
        tmp = begin_checkpoint(run_dir, self.engine.step, create=self.dist.is_main)
        barrier()
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / DCP_DIR))
        path = None
        if self.dist.is_main:
            path = finish_checkpoint(run_dir, self.engine.step, tmp, self.model, tokenizer, train_config, state, extra,
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
        self.engine.step = int(state["step"])
        self.engine.tokens = int(state.get("tokens", 0))
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
        return copy.to(self.engine.device).eval()




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


__all__ = ["Checkpointer"]
