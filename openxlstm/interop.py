"""Old import path of the ``xlstm``-package interoperability, kept for existing code: it lives in
``openxlstm.io.official``."""

from .io.official import config_from_official, config_to_official, load_official, save_official

__all__ = ["load_official", "save_official", "config_from_official", "config_to_official"]
