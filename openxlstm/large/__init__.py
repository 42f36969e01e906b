"""Old import path of xLSTM-7B's model and its transformers-format reader and writer, kept for existing code:
the model lives in ``openxlstm.models.xlstm_large``, the formats in ``openxlstm.io.hf``."""

from ..io.hf import load_hf
from ..io.hf import save_hf as save_pretrained
from ..models.xlstm_large import xLSTMLargeConfig, xLSTMLargeLM

__all__ = ["xLSTMLargeConfig", "xLSTMLargeLM", "load_hf", "save_pretrained"]
