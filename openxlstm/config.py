"""Model configuration: one validated dataclass, JSON round-trip, and the paper's presets.

Kernel/backend choices are run-time arguments of the model (``xLSTMLM.set_backends``), never config fields:
a checkpoint describes a model, not the machine it was trained on.
"""

from __future__ import annotations

import json
import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Union

_RATIO_RE = re.compile(r"^\s*(?:xLSTM\s*\[)?\s*(\d+)\s*:\s*(\d+)\s*\]?\s*$", re.IGNORECASE)


def _describe(hint) -> str:
    """A type annotation in words, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
             list: "a list", dict: "an object", tuple: "a list", type(None): "null"}
    return names.get(origin or hint, str(hint))


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    base = origin or hint
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if base in (list, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(base, type):
        return isinstance(value, base)
    return True


def check_field_types(config) -> None:
    """Every field of a config dataclass holds a value of its annotated type, strictly: a boolean field takes
    only true / false (``tie_weights="no"`` would otherwise count as true), an integer field no floats or
    booleans, a float field only finite numbers. Raises ValueError naming the field and what it accepts."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in hints and not _matches(value, hints[f.name]):
            raise ValueError(f"{type(config).__name__}: {f.name} must be {_describe(hints[f.name])}, got {value!r}")


def check_positive_ints(config, names) -> None:
    """Each named field holds an integer >= 1 (ValueError naming the config and the field otherwise)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(config).__name__}: {name} must be a positive integer, got {value!r}")


class ConfigIO:
    """Dict and JSON round trips shared by every config dataclass; unknown fields are an error that lists the
    known ones."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def to_json(self, path: Union[str, Path, None] = None) -> str:
        """The config as JSON text (also written to ``path`` when given)."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: Union[str, Path]):
        """Parse a JSON string, or read a JSON file when given a path."""
        src = str(text_or_path)
        text = Path(src).read_text() if not src.lstrip().startswith("{") else src
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cls.__name__}: invalid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: the JSON must be an object of config fields")
        return cls.from_dict(data)


def round_up(x: float, multiple: int) -> int:
    """Round x up to a multiple of ``multiple`` (the reference rounds up-projection widths up to 64)."""
    return int(math.ceil(x / multiple) * multiple)


def parse_ratio(ratio: str) -> tuple[int, int]:
    """"xLSTM[7:1]" or "7:1" -> (7, 1): the ratio of mLSTM to sLSTM blocks."""
    match = _RATIO_RE.match(str(ratio))
    if not match or (int(match.group(1)) == 0 and int(match.group(2)) == 0):
        raise ValueError(f"invalid xLSTM ratio {ratio!r}: expected 'a:b' or 'xLSTM[a:b]' with a + b > 0")
    return int(match.group(1)), int(match.group(2))


def slstm_positions(num_blocks: int, ratio: str) -> list[int]:
    """0-based sLSTM block indices for an mLSTM:sLSTM ratio, with the paper's placements where it has them.

    The paper places sLSTM at [3, 20] in its 24-block [7:1] models and at [3, 5, 7, 40, 42, 44] in its
    48-block ones; other counts spread sLSTM blocks evenly (centred in equal segments).
    """
    a, b = parse_ratio(ratio)
    if b == 0:
        return []
    if a == 0:
        return list(range(num_blocks))
    if (a, b) == (7, 1) and num_blocks == 24:
        return [3, 20]
    if (a, b) == (7, 1) and num_blocks == 48:
        return [3, 5, 7, 40, 42, 44]
    count = max(1, round(num_blocks * b / (a + b)))
    return sorted({min(num_blocks - 1, int((j + 0.5) * num_blocks / count)) for j in range(count)})


FFN_ACTIVATIONS = ("gelu", "silu", "relu", "relu2", "sigmoid", "selu")  # relu2: relu(x)^2


@dataclass
class xLSTMConfig(ConfigIO):
    """An xLSTM language model: embedding -> residual stack of mLSTM/sLSTM blocks -> LayerNorm -> head.

    ``slstm_at`` lists the 0-based indices of sLSTM blocks; it also accepts "all" or a ratio such as
    "xLSTM[7:1]" / "7:1", resolved to the paper's placements. Derived widths: ``mlstm_inner_dim`` (the
    mLSTM up-projection, proj_factor * E rounded up to 64) and ``ffn_dim`` (sLSTM block FFN, likewise).
    """

    vocab_size: int = 50304
    embedding_dim: int = 768
    num_blocks: int = 24
    slstm_at: Union[list, str] = field(default_factory=list)
    tie_weights: bool = False
    weight_decay_on_embedding: bool = False
    bias: bool = False  # biases of the dense projections (the reference default: none)
    dropout: float = 0.0
    norm_eps: float = 1e-5
    context_length: int = 2048  # the training context; informational, the model runs any length
    # mLSTM block
    mlstm_num_heads: int = 4
    mlstm_proj_factor: float = 2.0
    mlstm_conv_kernel: int = 4
    mlstm_qkv_blocksize: int = 4
    # sLSTM block
    slstm_num_heads: int = 4
    slstm_conv_kernel: int = 4
    slstm_forget_gate: str = "sigmoid"
    slstm_bias_init: str = "powerlaw_blockdependent"
    ffn_proj_factor: float = 1.3
    ffn_activation: str = "gelu"

    def __post_init__(self):
        def check(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"xLSTMConfig: {msg}")

        for name in ("vocab_size", "embedding_dim", "num_blocks", "mlstm_num_heads", "slstm_num_heads",
                     "mlstm_qkv_blocksize", "context_length"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                  f"{name} must be a positive integer, got {value!r}")
        check_field_types(self)
        for name in ("mlstm_conv_kernel", "slstm_conv_kernel"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 0, f"{name} must be an integer >= 0 (0: no conv), got {value!r}")
        for name in ("mlstm_proj_factor", "ffn_proj_factor"):
            check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)!r}")
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        check(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps!r}")
        check(self.slstm_forget_gate in ("sigmoid", "exp"),
              f"slstm_forget_gate must be 'sigmoid' or 'exp', got {self.slstm_forget_gate!r}")
        check(self.slstm_bias_init in ("powerlaw_blockdependent", "small_init", "zeros"),
              f"slstm_bias_init must be 'powerlaw_blockdependent', 'small_init' or 'zeros', got {self.slstm_bias_init!r}")
        check(self.ffn_activation in FFN_ACTIVATIONS,
              f"ffn_activation must be one of {', '.join(FFN_ACTIVATIONS)}, got {self.ffn_activation!r}")

        if isinstance(self.slstm_at, str):
            self.slstm_at = (list(range(self.num_blocks)) if self.slstm_at.strip().lower() == "all"
                             else slstm_positions(self.num_blocks, self.slstm_at))
        check(isinstance(self.slstm_at, (list, tuple)), f"slstm_at must be a list of block indices, 'all' or a ratio, got {self.slstm_at!r}")
        check(all(isinstance(j, int) and not isinstance(j, bool) for j in self.slstm_at),
              f"slstm_at must hold integer block indices, got {self.slstm_at!r}")
        bad = [j for j in self.slstm_at if not 0 <= j < self.num_blocks]
        check(not bad, f"slstm_at indices {bad} are out of range for num_blocks={self.num_blocks} (0-based)")
        check(len(set(self.slstm_at)) == len(self.slstm_at), f"slstm_at has repeated indices: {self.slstm_at}")
        self.slstm_at = sorted(self.slstm_at)

        if self.has_mlstm:
            inner = self.mlstm_inner_dim
            check(inner % self.mlstm_num_heads == 0,
                  f"the mLSTM inner width {inner} (mlstm_proj_factor * embedding_dim rounded up to 64) "
                  f"must be divisible by mlstm_num_heads={self.mlstm_num_heads}")
            check(inner % self.mlstm_qkv_blocksize == 0,
                  f"the mLSTM inner width {inner} must be divisible by mlstm_qkv_blocksize={self.mlstm_qkv_blocksize}")
        if self.slstm_at:
            check(self.embedding_dim % self.slstm_num_heads == 0,
                  f"embedding_dim={self.embedding_dim} must be divisible by slstm_num_heads={self.slstm_num_heads}")

    # derived quantities -------------------------------------------------------------------------------
    @property
    def has_mlstm(self) -> bool:
        return len(self.slstm_at) < self.num_blocks

    @property
    def mlstm_inner_dim(self) -> int:
        return round_up(self.mlstm_proj_factor * self.embedding_dim, 64)

    @property
    def ffn_dim(self) -> int:
        return round_up(self.ffn_proj_factor * self.embedding_dim, 64)

    @property
    def block_types(self) -> list[str]:
        """"m" or "s" for each block, in order."""
        s = set(self.slstm_at)
        return ["s" if j in s else "m" for j in range(self.num_blocks)]


PRESET_SHAPES = {"125m": (768, 24), "350m": (1024, 48), "760m": (1536, 48), "1.3b": (2048, 48)}
PRESET_RATIOS = ("1:0", "7:1")


def preset(size: str, ratio: str = "7:1", **overrides) -> xLSTMConfig:
    """The paper's language models: ``preset("125m", "7:1")``; sizes 125m, 350m, 760m, 1.3b; any ratio.

    Vocabulary 50304, untied head, 4 heads, context 2048. Keyword overrides replace any field.
    """
    key = str(size).lower()
    if key not in PRESET_SHAPES:
        raise ValueError(f"unknown preset size {size!r}; choose one of {list(PRESET_SHAPES)}")
    E, L = PRESET_SHAPES[key]
    a, b = parse_ratio(ratio)
    kwargs = dict(vocab_size=50304, embedding_dim=E, num_blocks=L, slstm_at=f"{a}:{b}", tie_weights=False,
                  mlstm_num_heads=4, slstm_num_heads=4, context_length=2048)
    kwargs.update(overrides)
    return xLSTMConfig(**kwargs)


__all__ = ["xLSTMConfig", "ConfigIO", "check_positive_ints", "check_field_types", "FFN_ACTIVATIONS", "preset", "parse_ratio", "slstm_positions", "PRESET_SHAPES", "PRESET_RATIOS", "round_up"]
