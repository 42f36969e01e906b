"""Bridges to the tools practitioners already use, one module each (``openxlstm.integrations.lm_eval``: the
lm-evaluation-harness model "openxlstm").

Nothing here is imported by ``import openxlstm``: each module needs its own optional packages and is imported
explicitly, e.g. ``import openxlstm.integrations.lm_eval``.
"""
