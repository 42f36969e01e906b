"""Layers: the mLSTM and sLSTM layers, the gated FFN and their small building blocks."""

from ..ops.backends import Backends
from .common import BlockDiagonalLinear, CausalConv, LayerNorm, MultiHeadNorm, RMSNorm
from .ffn import GatedFFN
from .head import LMOutput
from .mlstm import mLSTMLayer, mLSTMLayerState
from .slstm import sLSTMLayer, sLSTMLayerState

__all__ = ["Backends", "BlockDiagonalLinear", "CausalConv", "LayerNorm", "MultiHeadNorm", "RMSNorm", "GatedFFN", "LMOutput",
           "mLSTMLayer", "mLSTMLayerState", "sLSTMLayer", "sLSTMLayerState"]
