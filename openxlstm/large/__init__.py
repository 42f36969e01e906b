"""xLSTM-7B ("xLSTM Large", spec §4): the model (``model.py``) and its checkpoints (``pretrained.py``):
transformers' ``xLSTMForCausalLM`` directories and the authors' ``xlstm_large`` layout, loaded and saved.

Importing this package registers the architecture as "xlstm-large" in ``openxlstm.models.ARCHS``, so that
training, run checkpoints and ``build_model`` handle it like the others.
"""

from ..models import ARCHS as _ARCHS
from .model import xLSTMLargeConfig, xLSTMLargeLM
from .pretrained import from_pretrained, load_pretrained, save_pretrained

_ARCHS.setdefault("xlstm-large", (xLSTMLargeConfig, xLSTMLargeLM))

__all__ = ["xLSTMLargeConfig", "xLSTMLargeLM", "from_pretrained", "load_pretrained", "save_pretrained"]
