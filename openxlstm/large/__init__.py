"""xLSTM-7B ("xLSTM Large", spec §4): the model (``model.py``) and its checkpoints (``pretrained.py`` reads,
``save.py`` writes):
transformers' ``xLSTMForCausalLM`` directories and the authors' ``xlstm_large`` layout, loaded and saved.

The architecture is registered as "xlstm-large" in ``openxlstm.models.ARCHS`` (by ``openxlstm/models.py``),
so that training, run checkpoints and ``build_model`` handle it like the others.
"""

from .model import xLSTMLargeConfig, xLSTMLargeLM
from .pretrained import load_hf
from .save import save_pretrained

__all__ = ["xLSTMLargeConfig", "xLSTMLargeLM", "load_hf", "save_pretrained"]
