"""xLSTM-7B-style model directories in two foreign layouts: read both, write transformers'.

``load_hf(path)`` reads, from a local directory:

* transformers (``xLSTMForCausalLM.save_pretrained``): config.json (model_type "xlstm"), model.safetensors
  or shards model-0000k-of-0000n.safetensors with model.safetensors.index.json, tokenizer.json if any;
* the authors' ``xlstm_large``: config.yaml (``xLSTMLargeConfig`` fields), model.safetensors or shards
  model_0.safetensors, model_1.safetensors, ...; the same weights, the embedding named ``embedding.weight``.

The model is built on the meta device and every tensor is read from its shard only when its parameter is
filled, so peak memory stays near the model's size. ``save_hf`` (``xLSTMLargeLM.save_pretrained``) writes
transformers' layout into a temporary directory swapped into place, sharded above ``max_shard_size``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..device import resolve_device, resolve_dtype
from ..errors import UserError
from ..models.xlstm_large import xLSTMLargeConfig, xLSTMLargeLM
from .files import check_writable_dir, detect_format, local_dir, read_json, replace_dir

_XLSTM_LARGE_FIELDS = ("vocab_size", "num_heads", "use_bias", "norm_eps", "norm_reduction_force_float32",
                       "add_out_norm", "qk_dim_factor", "v_dim_factor", "eps", "ffn_proj_factor",
                       "ffn_round_up_to_multiple_of", "gate_soft_cap", "output_logit_soft_cap")
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


def save_hf(model: torch.nn.Module, directory, max_shard_size: Union[int, str] = "5GB",
                    overwrite: bool = False) -> Path:
    """Write ``model`` (an ``xLSTMLargeLM``) in transformers' layout: config.json, model.safetensors (or shards
    of at most ``max_shard_size`` with model.safetensors.index.json) and tokenizer.json when the model has a
    ``tokenizers`` tokenizer. Written into a temporary directory renamed into place; an existing non-empty
    ``directory`` is replaced only with ``overwrite=True``."""
    from safetensors.torch import save_file

    if not (hasattr(model, "backbone") and hasattr(getattr(model, "config", None), "qk_dim_factor")):
        raise TypeError(f"save_pretrained writes xLSTMLargeLM models (transformers' xLSTM), got {type(model).__name__}")
    target = Path(directory).expanduser()
    check_writable_dir(target, overwrite)
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
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# configs --------------------------------------------------------------------------------------------------
def _config(kw: dict, where: str) -> xLSTMLargeConfig:
    try:
        return xLSTMLargeConfig(**kw)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def _alias(cfg: dict, name: str, alias: str, where: str):
    value, other = cfg.get(name), cfg.get(alias)
    if value is not None and other is not None and value != other:
        raise UserError(f"{where}: {name}={value} and {alias}={other} disagree")
    if value is None and other is None:
        raise UserError(f"{where} lacks {name!r} (or {alias!r})")
    return value if value is not None else other


def config_from_transformers(cfg: dict, where: str = "config.json") -> xLSTMLargeConfig:
    """Our config from a transformers ``xLSTMConfig`` dict. Its kernel, mode and generic fields are run-time
    choices here and are ignored; ``add_out_norm`` is taken as True, since transformers' model applies the
    output norm whatever it says."""
    for key in ("vocab_size", "num_heads"):
        if key not in cfg:
            raise UserError(f"{where} lacks {key!r}")
    kw = {f: cfg[f] for f in xLSTMLargeConfig.__dataclass_fields__ if f in cfg}
    kw["hidden_size"] = _alias(cfg, "hidden_size", "embedding_dim", where)
    kw["num_hidden_layers"] = _alias(cfg, "num_hidden_layers", "num_blocks", where)
    kw["add_out_norm"] = True
    return _config(kw, where)


def _xlstm_large_config(p: Path, fused: bool) -> xLSTMLargeConfig:
    where = str(p / ("config.yaml" if (p / "config.yaml").is_file() else "config.json"))
    if where.endswith(".yaml"):
        try:
            import yaml
        except ImportError:
            raise UserError("reading an xlstm_large config.yaml needs PyYAML: pip install pyyaml") from None
        try:
            cfg = yaml.safe_load(Path(where).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read {where!r}: {str(e).splitlines()[0]}") from None
        if not isinstance(cfg, dict):
            raise UserError(f"{where!r} must hold a mapping of xLSTMLargeConfig fields")
    else:
        cfg = read_json(Path(where))
    for key in ("embedding_dim", "num_blocks", "vocab_size", "num_heads"):
        if key not in cfg:
            raise UserError(f"{where} lacks {key!r}")
    kw = {f: cfg[f] for f in _XLSTM_LARGE_FIELDS if f in cfg}
    if cfg.get("use_bias") and cfg.get("add_out_norm", True):
        raise UserError(f"{where}: use_bias=True gives the xlstm_large output norm a bias, which the transformers "
                        f"layout (and openxlstm) does not have: not supported")
    # the authors' loader builds weight_mode "single" whatever the file says; the weight names decide here
    return _config(dict(kw, hidden_size=cfg["embedding_dim"], num_hidden_layers=cfg["num_blocks"],
                        weight_mode="fused" if fused else "single"), where)


# weights --------------------------------------------------------------------------------------------------
def _weight_files(p: Path, fmt: str) -> list[Path]:
    if fmt == "transformers" and (p / INDEX).is_file():
        weight_map = read_json(p / INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{str(p / INDEX)!r} has no weight_map")
        files = [p / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise UserError(f"shard {f.name!r} named in {INDEX} is missing from {str(p)!r}")
        return files
    if (p / SINGLE).is_file():
        return [p / SINGLE]
    if fmt == "xlstm_large" and (p / "model_0.safetensors").is_file():
        files, n = [], 0
        while (p / f"model_{n}.safetensors").is_file():
            files.append(p / f"model_{n}.safetensors")
            n += 1
        return files
    if any(p.glob("*.bin")) or any(p.glob("*.pt")):
        raise UserError(f"{str(p)!r} holds PyTorch pickle weights; only safetensors are read (re-save them with "
                        f"safe_serialization=True)")
    expected = f"{SINGLE} or {INDEX} with its shards" if fmt == "transformers" else f"{SINGLE} or model_0.safetensors, ..."
    raise UserError(f"{str(p)!r} has no weights: expected {expected}")


def _weight_names(files: list[Path]) -> list[str]:
    from safetensors import safe_open

    names = []
    for file in files:
        with _reading(file):
            with safe_open(str(file), framework="pt") as f:
                names.extend(f.keys())
    return names


class _reading:
    """Turns a safetensors or OS error while reading ``file`` into a one-line UserError."""

    def __init__(self, file: Path):
        self.file = file

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        from safetensors import SafetensorError

        if exc is not None and isinstance(exc, (SafetensorError, OSError)):
            first = (str(exc).strip().splitlines() or [kind.__name__])[0]
            raise UserError(f"cannot read weights {str(self.file)!r}: {first}") from None
        return False


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, nn.Parameter(tensor))


def load_weights_lazily(config: xLSTMLargeConfig, files: list[Path], rename: Callable[[str], str],
                        dtype: Optional[torch.dtype], device: torch.device, where: str) -> xLSTMLargeLM:
    """Build the model on the meta device and fill each parameter from its shard, one tensor at a time, in
    ``dtype`` (None: the checkpoint's, that of its first tensor) on ``device``. Missing, unexpected or
    misshapen weights are a UserError."""
    from safetensors import safe_open

    with torch.device("meta"):
        model = xLSTMLargeLM(config)
    params = dict(model.named_parameters())  # a tied head appears once, as the embedding
    loaded, unexpected = set(), []
    for file in files:
        with _reading(file):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    name = rename(key)
                    if name not in params:
                        unexpected.append(key)
                        continue
                    t = f.get_tensor(key)
                    if t.shape != params[name].shape:
                        raise UserError(f"{where}: weight {key!r} has shape {tuple(t.shape)}, the config implies "
                                        f"{tuple(params[name].shape)}")
                    dtype = dtype or t.dtype
                    _set_parameter(model, name, t.to(device=device, dtype=dtype))
                    loaded.add(name)
    missing = [n for n in params if n not in loaded]
    if missing or unexpected:
        raise UserError(f"{where}: the weights do not match the config: missing {missing[:3]}"
                        f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    return model.eval()


def _tokenizer(p: Path):
    if not (p / TOKENIZER).is_file():
        return None
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        warnings.warn(f"{p / TOKENIZER} is not read: install the 'tokenizers' package to use it", stacklevel=3)
        return None
    from ..data.tokenizer import HFTokenizer

    return HFTokenizer.from_file(p / TOKENIZER)


# loading --------------------------------------------------------------------------------------------------
def load_hf(path, dtype=None, device=None):
    """(model in eval mode, tokenizer or None, info) from a transformers or xlstm_large directory (an openxlstm
    run is refused here: ``openxlstm.io.load_pretrained`` reads all three).

    info: {"source": "transformers" | "xlstm_large", "arch": "xlstm-large", "path", "step": None, "train": {}}.
    """
    p = local_dir(path)
    dtype, device = resolve_dtype(dtype), resolve_device("cpu" if device is None else device)
    fmt = detect_format(p)
    if fmt == "openxlstm":
        raise UserError(f"{str(p)!r} is an openxlstm run: load it with openxlstm.from_pretrained")
    files = _weight_files(p, fmt)
    names = _weight_names(files)
    if fmt == "transformers":
        config = config_from_transformers(read_json(p / "config.json"), str(p / "config.json"))
        if config.tie_word_embeddings and "lm_head.weight" in names:
            config.tie_word_embeddings = False  # transformers' xLSTM loads a stored head, tied or not
        rename = _identity
    else:
        config = _xlstm_large_config(p, fused=any(name.endswith("qkv_opreact.weight") for name in names))
        rename = _from_xlstm_large
    model = load_weights_lazily(config, files, rename, dtype, device, str(p))
    model.tokenizer = _tokenizer(p)
    return model, model.tokenizer, {"source": fmt, "arch": "xlstm-large", "path": str(p), "step": None, "train": {}}


def _identity(key: str) -> str:
    return key


def _from_xlstm_large(key: str) -> str:
    return "backbone.embeddings.weight" if key == "embedding.weight" else key


__all__ = ["load_hf", "save_hf", "config_from_transformers", "config_to_transformers", "parse_size", "INDEX", "SINGLE",
           "TOKENIZER"]
