"""Layers: the mLSTM and sLSTM layers, the gated FFN and their small building blocks."""

from .backends import Backends
from .common import BlockDiagonalLinear, CausalConv, LayerNorm, MultiHeadNorm
from .ffn import GatedFFN
from .head import LMOutput
from .mlstm import mLSTMLayer, mLSTMLayerState
from .slstm import sLSTMLayer, sLSTMLayerState

__all__ = ["Backends", "BlockDiagonalLinear", "CausalConv", "LayerNorm", "MultiHeadNorm", "GatedFFN", "LMOutput",
           "mLSTMLayer", "mLSTMLayerState", "sLSTMLayer", "sLSTMLayerState"]
