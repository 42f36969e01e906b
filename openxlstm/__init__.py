"""openxlstm: an open implementation of xLSTM (sLSTM and mLSTM cells, blocks and language models)."""

from . import ops
from .config import preset, xLSTMConfig
from .layers import Backends, LMOutput
from .generation import generate
from .interop import load_official, save_official
from .large import xLSTMLargeConfig, xLSTMLargeLM
from .model import xLSTMLM
from .train.checkpoint import from_pretrained

__version__ = "0.1.0"

__all__ = ["ops", "generate", "load_official", "save_official", "preset", "xLSTMConfig", "xLSTMLM",
           "from_pretrained", "xLSTMLargeConfig", "xLSTMLargeLM", "Backends", "LMOutput", "__version__"]
