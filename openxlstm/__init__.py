"""openxlstm: an open implementation of xLSTM (sLSTM and mLSTM cells, blocks and language models)."""

from . import ops
from .config import preset, xLSTMConfig
from .generation import generate
from .io import from_pretrained, load_official, save_official
from .layers import LMOutput
from .models import build_model
from .models.xlstm import xLSTMLM
from .models.xlstm_large import xLSTMLargeConfig, xLSTMLargeLM
from .ops.backends import Backends

__version__ = "0.1.0"

__all__ = ["ops", "generate", "load_official", "save_official", "preset", "xLSTMConfig", "xLSTMLM", "build_model",
           "from_pretrained", "xLSTMLargeConfig", "xLSTMLargeLM", "Backends", "LMOutput", "__version__"]
