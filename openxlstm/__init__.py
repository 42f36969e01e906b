"""openxlstm: an open implementation of xLSTM (sLSTM and mLSTM cells, blocks and language models)."""

from . import ops
from .config import preset, xLSTMConfig
from .layers import Backends
from .model import xLSTMLM

__version__ = "0.1.0"

__all__ = ["ops", "preset", "xLSTMConfig", "xLSTMLM", "Backends", "__version__"]
