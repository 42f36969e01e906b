"""The architecture registry: "xlstm", "lstm", "transformer" and "xlstm-large" (xLSTM-7B's architecture, the
model of transformers' ``xLSTMForCausalLM`` checkpoints) map to their config and model classes.

The training engine, checkpoints and generation only see ``build_model(arch, config_dict)``; they never need
to know which architecture they handle. (A model from a checkpoint: ``openxlstm.train.load_model``.)
"""

from __future__ import annotations

from typing import Union

from torch import nn

from .baselines import LSTMConfig, LSTMLM, TransformerConfig, TransformerLM
from .config import xLSTMConfig
from .errors import UserError
from .large.model import xLSTMLargeConfig, xLSTMLargeLM
from .model import xLSTMLM

ARCHS = {
    "xlstm": (xLSTMConfig, xLSTMLM),
    "lstm": (LSTMConfig, LSTMLM),
    "transformer": (TransformerConfig, TransformerLM),
    "xlstm-large": (xLSTMLargeConfig, xLSTMLargeLM),
}


def config_from_dict(arch: str, config: Union[dict, object]):
    """The config object of ``arch`` from a dict (or pass a config object through, checking its type)."""
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
    config_cls = ARCHS[arch][0]
    if isinstance(config, config_cls):
        return config
    if not isinstance(config, dict):
        raise UserError(f"the {arch} config must be a JSON object of {config_cls.__name__} fields")
    try:
        return config_cls.from_dict(dict(config))
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid {arch} config: {e}") from None


def build_model(arch: str, config: Union[dict, object]) -> nn.Module:
    """A freshly initialized model of ``arch`` (a name of ``ARCHS``) from its config (dict or object)."""
    config = config_from_dict(arch, config)
    return ARCHS[arch][1](config)


def arch_of(model: nn.Module) -> str:
    """The registry name of a model instance."""
    for name, (_, model_cls) in ARCHS.items():
        if isinstance(model, model_cls):
            return name
    raise TypeError(f"{type(model).__name__} is not a registered architecture")


__all__ = ["ARCHS", "build_model", "config_from_dict", "arch_of"]
