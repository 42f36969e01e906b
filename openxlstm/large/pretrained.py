"""Checkpoint directories of xLSTM-7B-style models: read them from two foreign layouts (``save.py`` writes one).

``load_hf(path)`` reads, from a local directory only (nothing is fetched):

* transformers (``xLSTMForCausalLM.save_pretrained``): config.json (model_type "xlstm"), model.safetensors
  or shards model-0000k-of-0000n.safetensors with model.safetensors.index.json, tokenizer.json if any;
* the authors' ``xlstm_large``: config.yaml (``xLSTMLargeConfig`` fields), model.safetensors or shards
  model_0.safetensors, model_1.safetensors, ...; the same weights, the embedding named ``embedding.weight``;
* our run or checkpoint directories (``openxlstm train``) are told apart here (``detect_format``) and read by
  ``openxlstm.train.checkpoint`` (``openxlstm.from_pretrained`` takes all three).

The model is built on the meta device and every tensor is read from its shard only when its parameter is
filled, so peak memory stays near the model's size. ``save_pretrained`` writes transformers' layout into a
temporary directory renamed into place, sharded above ``max_shard_size`` (``save.py``).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import UserError
from .model import xLSTMLargeConfig, xLSTMLargeLM
from .save import INDEX, SINGLE, TOKENIZER

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}

_XLSTM_LARGE_FIELDS = ("vocab_size", "num_heads", "use_bias", "norm_eps", "norm_reduction_force_float32",
                       "add_out_norm", "qk_dim_factor", "v_dim_factor", "eps", "ffn_proj_factor",
                       "ffn_round_up_to_multiple_of", "gate_soft_cap", "output_logit_soft_cap")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    """None, a floating torch.dtype, or a name ("bfloat16", "bf16", "float32", ...) -> torch.dtype or None."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported: choose float32, bfloat16, float16 or float64")
    return _DTYPES[name]


def resolve_device(device) -> torch.device:
    try:
        return torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise UserError(f"device {device!r} is not a valid device (cpu, cuda, cuda:N)") from None


def local_dir(path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise UserError(f"{str(path)!r} is a file: pass the checkpoint directory that holds config.json")
    if _HUB_NAME.match(str(path)):
        raise UserError(f"{str(path)!r} does not exist as a local directory, and openxlstm downloads nothing: if it "
                        f"names a Hugging Face model, fetch its files first (huggingface-cli download {path} "
                        f"--local-dir DIR) and pass DIR")
    raise UserError(f"checkpoint directory {str(path)!r} does not exist")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {str(path)!r}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{str(path)!r} must hold a JSON object")
    return data


def detect_format(p: Path) -> str:
    """"transformers", "xlstm_large" or "openxlstm" for a checkpoint directory."""
    if (p / "latest").is_file():
        return "openxlstm"
    if (p / "config.json").is_file():
        try:
            cfg = _read_json(p / "config.json")
        except UserError as e:
            raise UserError(f"checkpoint {str(p)!r} is corrupt: {e}") from None
        if cfg.get("format") == "openxlstm-checkpoint":
            return "openxlstm"
        if cfg.get("model_type") not in (None, "xlstm"):
            raise UserError(f"{str(p)!r} holds a transformers {cfg['model_type']!r} model; only xLSTM (model_type "
                            f"'xlstm') is supported")
        if cfg.get("model_type") == "xlstm" or "hidden_size" in cfg or "num_hidden_layers" in cfg:
            return "transformers"
        if "embedding_dim" in cfg and "num_blocks" in cfg:
            return "xlstm_large"
        raise UserError(f"{str(p)!r}: config.json is neither a transformers xLSTM config nor an openxlstm checkpoint")
    if (p / "config.yaml").is_file():
        return "xlstm_large"
    raise UserError(f"{str(p)!r} is not a checkpoint directory: no config.json (transformers, openxlstm) or "
                    f"config.yaml (xlstm_large) in it")


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
        cfg = _read_json(Path(where))
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
        weight_map = _read_json(p / INDEX).get("weight_map")
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
    run is refused here: ``openxlstm.train.checkpoint.load_pretrained`` reads all three).

    info: {"source": "transformers" | "xlstm_large", "arch": "xlstm-large", "path", "step": None, "train": {}}.
    """
    p = local_dir(path)
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    fmt = detect_format(p)
    if fmt == "openxlstm":
        raise UserError(f"{str(p)!r} is an openxlstm run: load it with openxlstm.from_pretrained")
    files = _weight_files(p, fmt)
    names = _weight_names(files)
    if fmt == "transformers":
        config = config_from_transformers(_read_json(p / "config.json"), str(p / "config.json"))
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


__all__ = ["load_hf", "detect_format", "config_from_transformers", "resolve_dtype", "resolve_device", "local_dir"]
