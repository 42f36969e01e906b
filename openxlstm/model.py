"""Old import path of the xLSTM language model, kept for existing code: it lives in ``openxlstm.models.xlstm``."""

from .models.xlstm import BlockState, xLSTMBlock, xLSTMLM

__all__ = ["xLSTMLM", "xLSTMBlock", "BlockState"]
