"""Checkpoints: a directory per step with the weights, a config JSON and the trainer state.

    RUN/latest                      text file naming the newest complete checkpoint directory
    RUN/ckpt-000500/config.json     {"arch", "model": {...}, "tokenizer": {...}, "step", "train": {...}, "weights"}
    RUN/ckpt-000500/model.safetensors  one process or DDP: the whole model ("weights": "safetensors")
    RUN/ckpt-000500/dcp/            FSDP: model and optimizer state, each process writing its own shards with
                                    torch.distributed.checkpoint ("weights": "dcp"); loads on any number of
                                    processes, sharded or not
    RUN/ckpt-000500/tokenizer.json  (HF tokenizers only)
    RUN/ckpt-000500/trainer.pt      schedule, RNG states, step, tokens seen; the optimizer too unless in dcp/

Writes are atomic: a checkpoint is written into a temporary directory (RUN/.ckpt-000500.tmp), its files and
the directory fsynced, the directory renamed into place, then the ``latest`` pointer replaced with
``os.replace``; older checkpoints are deleted only after that. At every moment ``latest`` names a complete
checkpoint (a crash or a full disk leaves the previous one), also when a checkpoint of the same step is
replaced. Leftover temporaries of a crashed run are removed by ``clean_leftovers`` (the next run in the
directory calls it). A full disk or a permission problem is a one-line UserError.

config.json describes the model; the weights file keeps a copy of that description (safetensors metadata;
trainer.pt for sharded weights), so a config.json edited after saving (``ffn_activation`` changed, say, which
no weight shape would reveal) is an error instead of a different model. Token-file runs without a tokenizer
record ``{"type": "none", "vocab_size": V}``: they load without a tokenizer, never as bytes.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from ..data.tokenizer import load_tokenizer
from ..errors import UserError
from ..models import arch_of, build_model
from .files import check_writable_dir, chmod_tree, fsync, fsync_tree, replace_dir, write_error, write_text_atomic

FORMAT = "openxlstm-checkpoint"
LATEST = "latest"
WEIGHTS_FILE = "model.safetensors"
DCP_DIR = "dcp"


MODEL_KEY = "openxlstm_model"  # safetensors metadata / trainer.pt: the model description saved with the weights


def model_description(model: torch.nn.Module) -> dict:
    """{"arch", "model"}: what config.json says about a model, as saved with its weights."""
    return {"arch": arch_of(model), "model": json.loads(json.dumps(model.config.to_dict()))}


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:06d}"


def begin_checkpoint(run_dir, step: int, create: bool = True) -> Path:
    """The temporary directory that checkpoint ``step`` is written into (emptied and created with ``create``;
    every process of a sharded save gets the same path)."""
    run_dir = Path(run_dir)
    tmp = run_dir / f".{checkpoint_name(step)}.tmp"
    if create:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as e:
            raise write_error(e, f"checkpoint {step} into {str(run_dir)!r}") or e
    return tmp


def _linked_copy(src: Path, dst: Path) -> None:
    """A copy of checkpoint directory ``src`` at ``dst`` made of hard links (no data copied; a real copy where
    the file system has no hard links)."""
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    fsync_tree(dst)


def _swap_in(run_dir: Path, tmp: Path, name: str) -> None:
    """Move the complete checkpoint ``tmp`` to RUN/name and point ``latest`` at it, ``latest`` naming a complete
    checkpoint at every moment. A checkpoint already called ``name`` (the same step saved again) is replaced:
    if ``latest`` names it, ``latest`` first moves to a hard-linked copy of it, so it never dangles."""
    final = run_dir / name
    if final.exists():
        if read_latest(run_dir) == name:
            keep = run_dir / f".{name}.prev"
            shutil.rmtree(keep, ignore_errors=True)
            _linked_copy(final, keep)
            write_text_atomic(run_dir / LATEST, keep.name + "\n")
        old = run_dir / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        fsync(run_dir)
        write_text_atomic(run_dir / LATEST, name + "\n")
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(run_dir / f".{name}.prev", ignore_errors=True)
        return
    os.replace(tmp, final)
    fsync(run_dir)
    write_text_atomic(run_dir / LATEST, name + "\n")


def read_latest(run_dir) -> Optional[str]:
    """The checkpoint name that RUN/latest holds (None without a readable pointer)."""
    try:
        return (Path(run_dir) / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def clean_leftovers(run_dir) -> list[str]:
    """Remove what a crashed save left in a run directory (temporary checkpoints .ckpt-*, and the temporary
    pointer, summary and plot files .NAME.tmp-PID), never the checkpoint ``latest`` names; returns the names
    removed. Call it only while no other process writes there (the run directory's lock held)."""
    run_dir = Path(run_dir)
    latest = read_latest(run_dir)
    removed = []
    for p in sorted(set(run_dir.glob(".ckpt-*")) | set(run_dir.glob(".*.tmp-*"))):
        if p.name == latest:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


def finish_checkpoint(run_dir, step: int, tmp: Path, model: torch.nn.Module, tokenizer=None,
                      train_config: Optional[dict] = None, trainer_state: Optional[dict] = None,
                      extra: Optional[dict] = None, keep: int = 2, weights: str = "safetensors") -> Path:
    """Add the config, tokenizer and trainer state to ``tmp`` (whose weights are written), rename it into
    place, point RUN/latest at it and keep the newest ``keep`` checkpoints. Returns the checkpoint directory."""
    run_dir = Path(run_dir)
    name = checkpoint_name(step)
    description = model_description(model)
    spec = ({"type": "none", "vocab_size": getattr(model.config, "vocab_size", None)} if tokenizer is None
            else tokenizer.spec())
    meta = {"format": FORMAT, **description, "tokenizer": spec, "step": step, "train": train_config or {},
            "weights": weights, **(extra or {})}
    try:
        if tokenizer is not None:
            tokenizer.save(tmp)
        if trainer_state is not None or weights == "dcp":
            torch.save({**(trainer_state or {}), MODEL_KEY: description}, tmp / "trainer.pt")
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: marks a whole checkpoint
        chmod_tree(tmp)
        fsync_tree(tmp)
        _swap_in(run_dir, tmp, name)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, f"checkpoint {step} into {str(run_dir)!r}") or e
    old = sorted(p for p in run_dir.glob("ckpt-*") if p.is_dir() and p.name != name)
    for p in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return run_dir / name


def save_checkpoint(run_dir, step: int, model: torch.nn.Module, tokenizer=None, train_config: Optional[dict] = None,
                    trainer_state: Optional[dict] = None, extra: Optional[dict] = None, keep: int = 2) -> Path:
    """Write RUN/ckpt-{step} atomically with the whole model in safetensors and point RUN/latest at it; keep
    the newest ``keep`` checkpoints.

    model: the bare model (not DDP- or compile-wrapped). trainer_state: anything torch.save can store
    (optimizer state, schedule, RNG states). Returns the checkpoint directory.
    """
    tmp = begin_checkpoint(run_dir, step)
    try:
        st_save_model(model, str(tmp / WEIGHTS_FILE), metadata={MODEL_KEY: json.dumps(model_description(model))})
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, f"checkpoint {step} into {str(run_dir)!r}") or e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_checkpoint(run_dir, step, tmp, model, tokenizer, train_config, trainer_state, extra, keep)


def save_model_dir(model: torch.nn.Module, directory, tokenizer=None, overwrite: bool = False) -> Path:
    """Write ``model`` as a model directory (config.json, model.safetensors, the tokenizer's file): a checkpoint
    without trainer state, which ``openxlstm.from_pretrained`` and ``generate`` / ``eval --model`` read.
    Built as a temporary sibling and swapped in; a non-empty ``directory`` is replaced only with ``overwrite``."""
    target = Path(directory).expanduser()
    check_writable_dir(target, overwrite)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    description = model_description(model)
    spec = ({"type": "none", "vocab_size": getattr(model.config, "vocab_size", None)} if tokenizer is None
            else tokenizer.spec())
    meta = {"format": FORMAT, **description, "tokenizer": spec, "step": None, "train": {}, "weights": "safetensors"}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        st_save_model(model, str(tmp / WEIGHTS_FILE), metadata={MODEL_KEY: json.dumps(description)})
        if tokenizer is not None:
            tokenizer.save(tmp)
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        fsync_tree(tmp)
        replace_dir(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, f"the model into {str(target)!r}") or e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory from itself or from a run directory holding a ``latest`` pointer."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {str(p)!r} does not exist")
    if not p.is_dir():
        raise UserError(f"{str(p)!r} is a file; pass a run directory or a checkpoint directory")
    if (p / LATEST).is_file():
        name = read_latest(p)
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise UserError(f"checkpoint {str(p)!r}: the 'latest' pointer is corrupt (it must hold the name of a "
                            f"checkpoint directory such as ckpt-000400)")
        target = p / name
        if not target.is_dir():
            raise UserError(f"checkpoint {str(p)!r}: 'latest' points at {name!r}, which is missing")
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


def _saved_description(ckpt: Path) -> Optional[dict]:
    """The model description saved with the weights (None in checkpoints written before it was saved)."""
    weights = ckpt / WEIGHTS_FILE
    try:
        if weights.is_file():
            with safe_open(str(weights), framework="pt") as f:
                text = (f.metadata() or {}).get(MODEL_KEY)
            return None if text is None else json.loads(text)
        if (ckpt / "trainer.pt").is_file():
            state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
            return state.get(MODEL_KEY) if isinstance(state, dict) else None
    except Exception:  # noqa: BLE001 - unreadable files: loading the weights or resuming reports them
        return None
    return None


def check_config_unchanged(model: torch.nn.Module, ckpt: Path) -> None:
    """A UserError when config.json (which built ``model``) no longer describes the model the weights were
    saved from, e.g. an edited ``ffn_activation``: the weights would load and silently compute another model."""
    saved = _saved_description(ckpt)
    if saved is None:
        return
    now = model_description(model)
    if saved == now:
        return
    if saved.get("arch") != now["arch"]:
        diff = f"arch: {now['arch']!r} in config.json, {saved.get('arch')!r} when saved"
    else:
        a, b = saved.get("model", {}), now["model"]
        keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        diff = ", ".join(f"{k}: {b.get(k)!r} in config.json, {a.get(k)!r} when saved" for k in keys[:3])
    raise UserError(f"checkpoint {str(ckpt)!r}: config.json was changed after the weights were saved ({diff}); "
                    f"restore config.json: the weights belong to the model it first described")


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Fill a bare model (one process, not sharded) with a checkpoint's weights, whichever way they were saved,
    after checking that config.json still describes the model they were saved from."""
    weights = ckpt / WEIGHTS_FILE
    sharded = ckpt / DCP_DIR
    if not weights.is_file() and not sharded.is_dir():
        raise UserError(f"checkpoint {str(ckpt)!r} is corrupt: {WEIGHTS_FILE} is missing")
    check_config_unchanged(model, ckpt)
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
    stored = _stored_dtype(ckpt)
    if stored is not None and stored != torch.float32:
        model.to(stored)
    load_weights(model, ckpt)
    meta["path"] = str(ckpt)
    return model.to(device).eval(), checkpoint_tokenizer(meta, ckpt), meta


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _stored_dtype(ckpt: Path) -> Optional[torch.dtype]:
    """The floating dtype of a checkpoint's safetensors weights (None for sharded or unreadable weights: the
    load reports the problem)."""
    try:
        with safe_open(str(ckpt / WEIGHTS_FILE), framework="pt") as f:
            for name in f.keys():
                dtype = _SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype())
                if dtype is not None:
                    return dtype
    except Exception:  # noqa: BLE001 - a missing or corrupt file is load_weights' one-line error
        return None
    return None


def checkpoint_tokenizer(meta: dict, ckpt: Path):
    """The tokenizer a checkpoint records, or None for a model of token ids (a token-file run without a
    tokenizer: ``{"type": "none"}``, or no record at all)."""
    spec = meta.get("tokenizer")
    if spec is None or not isinstance(spec, dict) or spec.get("type") in (None, "none"):
        return None
    if spec.get("type") not in ("byte", "hf"):
        raise UserError(f"checkpoint {str(ckpt)!r} is corrupt: unknown tokenizer type {spec.get('type')!r} in "
                        f"config.json (byte, hf or none)")
    return load_tokenizer(spec, ckpt)


def load_trainer_state(ckpt: Path) -> dict:
    path = Path(ckpt) / "trainer.pt"
    if not path.is_file():
        raise UserError(f"checkpoint {str(ckpt)!r} has no trainer state (trainer.pt): it cannot be resumed")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for truncated or foreign files
        raise UserError(f"checkpoint {str(ckpt)!r} is corrupt: cannot read trainer.pt ({type(e).__name__})") from None
    problem = _trainer_state_problem(state)
    if problem:
        raise UserError(f"checkpoint {str(ckpt)!r} is corrupt: trainer.pt {problem}")
    return state


def _trainer_state_problem(state) -> Optional[str]:
    """What is wrong with a loaded trainer.pt (None: the fields a resume reads are there, of the right types)."""
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not the trainer state"
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"has no valid step (got {step!r})"
    if not isinstance(state.get("tokens", 0), int):
        return f"has no valid token count (got {state.get('tokens')!r})"
    rng = state.get("rng")
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8:
        return "has no valid RNG state"
    if not isinstance(state.get("schedule", {}), dict):
        return "has no valid schedule state"
    optimizer = state.get("optimizer")
    if optimizer is not None and not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
                                      and isinstance(optimizer.get("param_groups"), list)):
        return "has no valid optimizer state"
    return None


__all__ = ["save_checkpoint", "save_model_dir", "begin_checkpoint", "finish_checkpoint", "resolve_checkpoint", "read_meta",
           "load_weights", "load_model", "load_trainer_state", "checkpoint_tokenizer", "check_config_unchanged", "clean_leftovers",
           "read_latest", "model_description", "FORMAT", "LATEST", "MODEL_KEY", "WEIGHTS_FILE", "DCP_DIR"]
