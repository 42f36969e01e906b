"""Old import path of the baseline models, kept for existing code: they live in ``openxlstm.models.lstm`` and
``openxlstm.models.transformer``."""

from .models.lstm import LSTMConfig, LSTMLM, LSTMState, sized_lstm_config
from .models.transformer import KVCache, TransformerConfig, TransformerLM, sized_transformer_config

__all__ = ["LSTMConfig", "LSTMLM", "LSTMState", "TransformerConfig", "TransformerLM", "KVCache", "sized_lstm_config",
           "sized_transformer_config"]
