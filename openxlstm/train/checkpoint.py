"""Checkpoints: a directory per step with the weights, a config JSON and the trainer state.

    RUN/latest                      text file naming the newest complete checkpoint directory
    RUN/ckpt-000500/config.json     {"arch", "model": {...}, "tokenizer": {...}, "step", "train": {...}, "weights"}
    RUN/ckpt-000500/model.safetensors  one process or DDP: the whole model ("weights": "safetensors")
    RUN/ckpt-000500/dcp/            FSDP: model and optimizer state, each process writing its own shards with
                                    torch.distributed.checkpoint ("weights": "dcp"); loads on any number of
                                    processes, sharded or not
    RUN/ckpt-000500/tokenizer.json  (HF tokenizers only)
    RUN/ckpt-000500/trainer.pt      schedule, RNG states, step, tokens seen; the optimizer too unless in dcp/

Writes are atomic: a checkpoint is written into a temporary directory that is renamed into place, then the
``latest`` pointer is replaced with ``os.replace``; a crash at any moment leaves the previous ``latest``
pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from ..data.tokenizer import load_tokenizer
from ..errors import UserError
from ..models import arch_of, build_model

FORMAT = "openxlstm-checkpoint"
LATEST = "latest"
WEIGHTS_FILE = "model.safetensors"
DCP_DIR = "dcp"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:06d}"


def begin_checkpoint(run_dir, step: int, create: bool = True) -> Path:
    """The temporary directory that checkpoint ``step`` is written into (emptied and created with ``create``;
    every process of a sharded save gets the same path)."""
    run_dir = Path(run_dir)
    tmp = run_dir / f".{checkpoint_name(step)}.tmp"
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    return tmp


def finish_checkpoint(run_dir, step: int, tmp: Path, model: torch.nn.Module, tokenizer=None,
                      train_config: Optional[dict] = None, trainer_state: Optional[dict] = None,
                      extra: Optional[dict] = None, keep: int = 2, weights: str = "safetensors") -> Path:
    """Add the config, tokenizer and trainer state to ``tmp`` (whose weights are written), rename it into
    place, point RUN/latest at it and keep the newest ``keep`` checkpoints. Returns the checkpoint directory."""
    run_dir = Path(run_dir)
    name = checkpoint_name(step)
    final = run_dir / name
    meta = {"format": FORMAT, "arch": arch_of(model), "model": model.config.to_dict(),
            "tokenizer": None if tokenizer is None else tokenizer.spec(), "step": step,
            "train": train_config or {}, "weights": weights, **(extra or {})}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(tmp)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(run_dir / LATEST, name + "\n")
    old = sorted(p for p in run_dir.glob("ckpt-*") if p.is_dir() and p.name != name)
    for p in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def save_checkpoint(run_dir, step: int, model: torch.nn.Module, tokenizer=None, train_config: Optional[dict] = None,
                    trainer_state: Optional[dict] = None, extra: Optional[dict] = None, keep: int = 2) -> Path:
    """Write RUN/ckpt-{step} atomically with the whole model in safetensors and point RUN/latest at it; keep
    the newest ``keep`` checkpoints.

    model: the bare model (not DDP- or compile-wrapped). trainer_state: anything torch.save can store
    (optimizer state, schedule, RNG states). Returns the checkpoint directory.
    """
    tmp = begin_checkpoint(run_dir, step)
    st_save_model(model, str(tmp / WEIGHTS_FILE))
    return finish_checkpoint(run_dir, step, tmp, model, tokenizer, train_config, trainer_state, extra, keep)


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory from itself or from a run directory holding a ``latest`` pointer."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {str(p)!r} does not exist")
    if (p / LATEST).is_file():
        target = p / (p / LATEST).read_text().strip()
        if not target.is_dir():
            raise UserError(f"checkpoint {str(p)!r}: 'latest' points at {target.name!r}, which is missing")
        return target
    if (p / "config.json").is_file():
        return p
    raise UserError(f"{str(p)!r} is not a checkpoint: no config.json (or 'latest' pointer) in it")


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {str(ckpt)!r} is corrupt: cannot read config.json ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "arch" not in meta or "model" not in meta:
        raise UserError(f"checkpoint {str(ckpt)!r} is corrupt: config.json is not an openxlstm checkpoint config")
    return meta


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Fill a bare model (one process, not sharded) with a checkpoint's weights, whichever way they were saved."""
    weights = ckpt / WEIGHTS_FILE
    sharded = ckpt / DCP_DIR
    if not weights.is_file() and not sharded.is_dir():
        raise UserError(f"checkpoint {str(ckpt)!r} is corrupt: {WEIGHTS_FILE} is missing")
    try:
        if weights.is_file():
            missing, unexpected = st_load_model(model, str(weights), strict=False)
        else:
            state = {"model": model.state_dict()}
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(state, checkpoint_id=str(sharded), no_dist=True)
            missing, unexpected = model.load_state_dict(state["model"], strict=False)
    except (SafetensorError, CheckpointException, RuntimeError, OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = WEIGHTS_FILE if weights.is_file() else f"{DCP_DIR}/"
        raise UserError(f"checkpoint {str(ckpt)!r} is corrupt: cannot load {what} ({first})") from None
    if missing or unexpected:
        raise UserError(f"checkpoint {str(ckpt)!r} does not match its config: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")


def load_model(path, device="cpu"):
    """(model in eval mode, tokenizer or None, meta dict) from a checkpoint or run directory (safetensors or
    sharded weights alike)."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    model = build_model(meta["arch"], meta["model"])
    load_weights(model, ckpt)
    tokenizer = load_tokenizer(meta.get("tokenizer"), ckpt)
    meta["path"] = str(ckpt)
    return model.to(device).eval(), tokenizer, meta


def load_trainer_state(ckpt: Path) -> dict:
    path = Path(ckpt) / "trainer.pt"
    if not path.is_file():
        raise UserError(f"checkpoint {str(ckpt)!r} has no trainer state (trainer.pt): it cannot be resumed")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for truncated or foreign files
        raise UserError(f"checkpoint {str(ckpt)!r} is corrupt: cannot read trainer.pt ({type(e).__name__})") from None


__all__ = ["save_checkpoint", "begin_checkpoint", "finish_checkpoint", "resolve_checkpoint", "read_meta", "load_weights",
           "load_model", "load_trainer_state", "WEIGHTS_FILE", "DCP_DIR"]
