"""Every model format in one place: readers and writers of model directories, and ``from_pretrained``.

    run.py       our run and checkpoint directories (``openxlstm train``) and saved models
    hf.py        transformers' ``xLSTMForCausalLM`` directories (xLSTM-7B) and the authors' ``xlstm_large``
    official.py  the authors' ``xlstm`` package: its configs and state dicts, both ways
    tirex.py     TiRex's Lightning checkpoints (``model.ckpt``)
    files.py     atomic writes, directory swaps, format detection

``from_pretrained(path)`` takes any of the directories and returns the model in eval mode with its tokenizer
as ``model.tokenizer``; ``save_pretrained(model, directory)`` writes the model's own format.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..device import resolve_device, resolve_dtype
from .files import detect_format, local_dir
from ..models.base import use_formats
from ..models.xlstm_large import xLSTMLargeLM
from .hf import load_hf, save_hf
from .official import load_official, save_official
from .run import load_model, save_model_dir
from .tirex import is_tirex_checkpoint, load_tirex_checkpoint


def load_pretrained(path, dtype=None, device=None):
    """(model in eval mode, tokenizer or None, info) from any local model directory: an openxlstm run,
    checkpoint or saved model, a transformers ``xLSTMForCausalLM`` directory (xLSTM-7B), the authors'
    ``xlstm_large`` layout, or TiRex's ``model.ckpt`` (the file or its directory). ``dtype``: torch.dtype or name, None keeps the checkpoint's; ``device``: default
    the CPU. info: the run's meta for ours, else {"source", "arch", "path", "step": None, "train": {}}; always
    with "source" ("openxlstm", "transformers", "xlstm_large" or "tirex"). The tokenizer is also ``model.tokenizer``."""
    if is_tirex_checkpoint(path):
        model = load_tirex_checkpoint(path, device=resolve_device("cpu" if device is None else device))
        model = model if resolve_dtype(dtype) is None else model.to(resolve_dtype(dtype))
        return model, None, {"source": "tirex", "arch": "tirex", "path": str(path), "step": None, "train": {}}
    p = local_dir(path)
    if detect_format(p) != "openxlstm":
        return load_hf(p, dtype=dtype, device=device)
    dtype, device = resolve_dtype(dtype), resolve_device("cpu" if device is None else device)
    model, tokenizer, meta = load_model(p, device=device)
    if dtype is not None:
        model.to(dtype)
    model.tokenizer = tokenizer
    return model, tokenizer, dict(meta, source="openxlstm")


def from_pretrained(path, dtype=None, device=None) -> torch.nn.Module:
    """The model of a local model directory, in eval mode, with its tokenizer as ``model.tokenizer``.

    Args:
        path: a directory written by ``model.save_pretrained`` or ``openxlstm train`` (a run or one of its
            checkpoints), by transformers' ``save_pretrained`` (xLSTM-7B and its kind), or in the authors'
            ``xlstm_large`` layout.
        dtype: torch.dtype or name ("bfloat16", "float32", ...); None keeps the checkpoint's.
        device: where the weights go (default CPU).
    """
    return load_pretrained(path, dtype=dtype, device=device)[0]


def save_pretrained(model: torch.nn.Module, directory, overwrite: bool = False, **kwargs) -> Path:
    """Write ``model`` into ``directory`` in its own format: xLSTM-7B-style models in transformers' layout
    (``hf.save_hf``, which takes ``max_shard_size``), every other model as an openxlstm model directory
    (config.json, model.safetensors and the tokenizer; ``run.save_model_dir``). Returns the directory's path."""
    if isinstance(model, xLSTMLargeLM):
        return save_hf(model, directory, overwrite=overwrite, **kwargs)
    if kwargs:
        raise TypeError(f"save_pretrained: unexpected arguments {sorted(kwargs)}")
    return save_model_dir(model, directory, tokenizer=getattr(model, "tokenizer", None), overwrite=overwrite)


use_formats(save=save_pretrained, load=from_pretrained)


__all__ = ["from_pretrained", "load_pretrained", "save_pretrained", "load_official", "save_official", "detect_format"]
