"""xLSTM-7B-style models written in transformers' layout (``xLSTMForCausalLM.from_pretrained`` reads it): the
file names of the layout, the config.json, and the writer (sharded safetensors, atomic directory swap).

Kept apart from ``model.py`` and ``pretrained.py`` (the reader) so that the model's ``save_pretrained`` method
and the reader both import it, and it imports neither.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Union

import torch

from ..errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER = "tokenizer.json"


# transformers' xLSTMConfig fields that choose kernels and modes, written so that any machine loads the model
_TRANSFORMERS_RUNTIME = {"chunkwise_kernel": "chunkwise--native_autograd", "sequence_kernel": "native_sequence__native",
                         "step_kernel": "native", "mode": "inference", "chunk_size": 64, "return_last_states": True,
                         "autocast_kernel_dtype": "bfloat16", "inference_state_dtype": "float32", "use_cache": True}


def config_to_transformers(config, dtype: torch.dtype) -> dict:
    """The config.json of transformers' ``xLSTMForCausalLM`` for our ``xLSTMLargeConfig``."""
    if not config.add_out_norm:
        raise ValueError("transformers' xLSTM always applies an output norm: a model without one (add_out_norm=False) "
                         "cannot be saved in its format")
    name = str(dtype).removeprefix("torch.")
    return {"architectures": ["xLSTMForCausalLM"], "model_type": "xlstm", **config.to_dict(),
            "embedding_dim": config.hidden_size, "num_blocks": config.num_hidden_layers, **_TRANSFORMERS_RUNTIME,
            "dtype": name}


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "2GiB"."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = _SIZE.match(str(size))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size {size!r}: give a positive number of bytes or a size like '5GB', '500MB', '2GiB'")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Names grouped in order into shards of at most ``limit`` bytes (a larger tensor gets a shard alone)."""
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_pretrained(model: torch.nn.Module, directory, max_shard_size: Union[int, str] = "5GB",
                    overwrite: bool = False) -> Path:
    """Write ``model`` (an ``xLSTMLargeLM``) in transformers' layout: config.json, model.safetensors (or shards
    of at most ``max_shard_size`` with model.safetensors.index.json) and tokenizer.json when the model has a
    ``tokenizers`` tokenizer. Written into a temporary directory renamed into place; an existing non-empty
    ``directory`` is replaced only with ``overwrite=True``."""
    from safetensors.torch import save_file

    if not (hasattr(model, "backbone") and hasattr(getattr(model, "config", None), "qk_dim_factor")):
        raise TypeError(f"save_pretrained writes xLSTMLargeLM models (transformers' xLSTM), got {type(model).__name__}")
    target = Path(directory).expanduser()
    if target.exists() and not target.is_dir():
        raise UserError(f"{str(target)!r} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UserError(f"{str(target)!r} is not empty: pass overwrite=True to replace it")
    limit = parse_size(max_shard_size)
    tensors = dict(model.state_dict())
    if model.config.tie_word_embeddings:  # transformers' xLSTM does not tie on load: the head is stored too
        tensors["lm_head.weight"] = tensors["lm_head.weight"].clone()
    dtype = model.backbone.embeddings.weight.dtype
    config = config_to_transformers(model.config, dtype)
    groups = _shards(tensors, limit)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        weight_map = {}
        for k, names in enumerate(groups, start=1):
            file = SINGLE if len(groups) == 1 else f"model-{k:05d}-of-{len(groups):05d}.safetensors"
            save_file({n: tensors[n].detach().to("cpu").contiguous() for n in names}, str(tmp / file),
                      metadata={"format": "pt"})
            weight_map.update({n: file for n in names})
        if len(groups) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None and hasattr(tokenizer, "tokenizer") and hasattr(tokenizer.tokenizer, "save"):
            tokenizer.tokenizer.save(str(tmp / TOKENIZER))
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing target (emptiness or overwrite already checked) is set aside
    first and deleted only once ``new`` is in place."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["save_pretrained", "config_to_transformers", "parse_size", "INDEX", "SINGLE", "TOKENIZER"]
