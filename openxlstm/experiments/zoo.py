"""The experiments' model zoo: every model the paper compares, at a chosen width, built by name.

Names (case-insensitive):
  "xlstm[a:b]"   xLSTMLM with ``num_blocks`` blocks, mLSTM:sLSTM ratio a:b (the paper's formal-language models
                 are xLSTM[1:0], xLSTM[0:1] and xLSTM[1:1] with 2 blocks: sLSTM at [1] for [1:1])
  "lstm"         classic multi-layer LSTM (``num_blocks`` layers, hidden = width)
  "reslstm"      LSTM cells in residual pre-LayerNorm blocks with the sLSTM block's gated FFN: the ablation's
                 "LSTM in the xLSTM block structure", i.e. the sLSTM block without exponential gating
  "transformer"  Llama-style Transformer (``num_blocks`` layers, heads of 16 units)

These names are aliases of the model registry (``openxlstm.models``): each builds a registered
architecture, so every zoo model trains, checkpoints and generates like any other.
"""

from __future__ import annotations

import torch

from ..config import parse_ratio, slstm_positions
from ..layers.slstm import forget_bias_init
from ..models import LanguageModel, build_model as build_registered

PAPER_MODELS = ("xlstm[1:0]", "xlstm[0:1]", "xlstm[1:1]", "lstm", "transformer")
SLSTM_INITS = ("reference", "block0")


def canonical_name(name: str) -> str:
    """"xLSTM[1:1]" / "xlstm1:1" / "LSTM" -> "xlstm[1:1]" / "lstm"; raises ValueError for unknown names."""
    key = str(name).strip().lower().replace(" ", "")
    if key in ("lstm", "reslstm", "transformer"):
        return key
    if key.startswith("xlstm"):
        a, b = parse_ratio(key[len("xlstm"):].strip("[]") or "bad")
        return f"xlstm[{a}:{b}]"
    raise ValueError(f"unknown model {name!r}; choose xlstm[a:b] (e.g. {', '.join(PAPER_MODELS[:3])}), "
                     "lstm, reslstm or transformer")


def build_model(name: str, vocab_size: int, width: int = 64, num_blocks: int = 2, num_heads: int = 4,
                context_length: int = 256, slstm_init: str = "reference") -> LanguageModel:
    """A freshly initialized model ``name`` with embedding width ``width`` and ``num_blocks`` blocks/layers.

    xLSTM: mLSTM and sLSTM blocks with ``num_heads`` heads each (the mLSTM inner width is 2 * width rounded
    up to 64); the Transformer uses heads of width 16 (width // 16 heads).

    ``slstm_init``: "reference" keeps the reference's depth-dependent sLSTM forget-gate biases
    ("powerlaw_blockdependent": the deeper the block, the more of its units start with long memory);
    "block0" gives every sLSTM block the profile of block 0 (most units start forgetting fast), whatever
    its depth. Other models ignore it.
    """
    if slstm_init not in SLSTM_INITS:
        raise ValueError(f"slstm_init must be one of {', '.join(SLSTM_INITS)}, got {slstm_init!r}")
    for arg, value in (("vocab_size", vocab_size), ("width", width), ("num_blocks", num_blocks), ("num_heads", num_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"build_model: {arg} must be a positive integer, got {value!r}")
    key = canonical_name(name)
    if key == "lstm":
        return build_registered("lstm", dict(vocab_size=vocab_size, embedding_dim=width, num_layers=num_blocks,
                                             context_length=context_length))
    if key == "transformer":
        return build_registered("transformer", dict(vocab_size=vocab_size, embedding_dim=width, num_layers=num_blocks,
                                                    num_heads=max(1, width // 16), context_length=context_length))
    config = dict(vocab_size=vocab_size, embedding_dim=width, num_blocks=num_blocks, mlstm_num_heads=num_heads,
                  slstm_num_heads=num_heads, context_length=context_length)
    if key == "reslstm":
        return build_registered("reslstm", config)
    model = build_registered("xlstm", dict(config, slstm_at=slstm_positions(num_blocks, key[len("xlstm["):-1])))
    if slstm_init == "block0":
        for block in model.blocks:
            if block.kind == "s":
                layer = block.layer
                with torch.no_grad():
                    layer.bias[width:2 * width] = forget_bias_init(layer.config, layer.head_dim, 0).repeat(layer.num_heads)
    return model


__all__ = ["PAPER_MODELS", "SLSTM_INITS", "build_model", "canonical_name"]
