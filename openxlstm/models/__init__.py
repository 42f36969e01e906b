"""The model registry: every architecture by one name, mapped to its config and model classes.

    "xlstm"        xLSTM language model (``xlstm.py``)
    "xlstm-large"  xLSTM-7B's architecture, the model of transformers' ``xLSTMForCausalLM`` (``xlstm_large.py``)
    "transformer"  Llama-style Transformer baseline (``transformer.py``)
    "lstm"         classic multi-layer LSTM baseline (``lstm.py``)
    "reslstm"      LSTM cells in the xLSTM block structure (``reslstm.py``)
    "tirex"        TiRex, the sLSTM time-series forecaster (``tirex.py``; trained with ``forecast-train``)

Every model derives from ``Model`` (``base.py``); the language models (``LANGUAGE_MODELS``: all but the
forecaster) from ``LanguageModel``, with one forward signature, so training, checkpoints, generation and
evaluation only see ``build_model(arch, config)`` and never need to know which architecture they handle. The experiments' names ("xlstm[1:1]", "lstm", ...) are aliases: see
``openxlstm.experiments.zoo``.
"""

from __future__ import annotations

from typing import Optional, Union

from ..errors import UserError
from .base import LanguageModel, Model
from .lstm import LSTMConfig, LSTMLM, sized_lstm_config
from .reslstm import ResidualLSTMLM
from .tirex import TiRex, TiRexConfig
from .transformer import TransformerConfig, TransformerLM, sized_transformer_config
from .xlstm import xLSTMConfig, xLSTMLM
from .xlstm_large import xLSTMLargeConfig, xLSTMLargeLM

ARCHS = {
    "xlstm": (xLSTMConfig, xLSTMLM),
    "xlstm-large": (xLSTMLargeConfig, xLSTMLargeLM),
    "transformer": (TransformerConfig, TransformerLM),
    "lstm": (LSTMConfig, LSTMLM),
    "reslstm": (xLSTMConfig, ResidualLSTMLM),
    "tirex": (TiRexConfig, TiRex),
}
LANGUAGE_MODELS = [name for name, (_, cls) in ARCHS.items() if issubclass(cls, LanguageModel)]


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


def build_model(arch: str, config: Union[dict, object]) -> LanguageModel:
    """A freshly initialized model of ``arch`` (a name of ``ARCHS``) from its config (dict or object)."""
    config = config_from_dict(arch, config)
    return ARCHS[arch][1](config)


def default_config(arch: str, vocab_size: int, context_length: int, size: Optional[int] = None) -> dict:
    """The default model of ``arch`` (what ``openxlstm train --arch NAME`` trains), as a config dict: the
    xLSTM[3:1] of 4 blocks of width 128 (sLSTM at block 1); the residual LSTM of the same shape; xLSTM-7B's
    architecture at 4 blocks of width 128; the LSTM and Transformer baselines sized to the default xLSTM's
    parameter count, or to ``size`` parameters."""
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
    xl = xLSTMConfig(vocab_size=vocab_size, embedding_dim=128, num_blocks=4, slstm_at=[1], mlstm_num_heads=4,
                     slstm_num_heads=4, context_length=context_length)
    if arch not in LANGUAGE_MODELS:
        raise UserError(f"{arch} is a forecaster: train it with openxlstm forecast-train")
    if arch in ("xlstm", "xlstm-large", "reslstm") and size is not None:
        raise UserError(f"--size sizes the lstm and transformer baselines; give a {arch} model with --config")
    if arch in ("xlstm", "reslstm"):
        return xl.to_dict()
    if arch == "xlstm-large":
        return xLSTMLargeConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_heads=4).to_dict()
    target = size or xLSTMLM(xl).num_params()
    if arch == "lstm":
        return sized_lstm_config(target, vocab_size, num_layers=2, context_length=context_length).to_dict()
    return sized_transformer_config(target, vocab_size, num_layers=4, head_dim=32, context_length=context_length).to_dict()


def arch_of(model) -> str:
    """The registry name of a model instance: of the nearest registered class in its type's MRO (FSDP wraps
    a model in a subclass of its class)."""
    names = {model_cls: name for name, (_, model_cls) in ARCHS.items()}
    for cls in type(model).__mro__:
        if cls in names:
            return names[cls]
    raise TypeError(f"{type(model).__name__} is not a registered architecture")


__all__ = ["ARCHS", "LANGUAGE_MODELS", "Model", "LanguageModel", "build_model", "config_from_dict", "default_config", "arch_of"]
