"""The experiments' model zoo: every model the paper compares, at a chosen width, built by name.

Names (case-insensitive):
  "xlstm[a:b]"   xLSTMLM with ``num_blocks`` blocks, mLSTM:sLSTM ratio a:b (the paper's formal-language models
                 are xLSTM[1:0], xLSTM[0:1] and xLSTM[1:1] with 2 blocks: sLSTM at [1] for [1:1])
  "lstm"         classic multi-layer LSTM (``num_blocks`` layers, hidden = width)
  "reslstm"      LSTM cells in residual pre-LayerNorm blocks with the sLSTM block's gated FFN: the ablation's
                 "LSTM in the xLSTM block structure", i.e. the sLSTM block without exponential gating
  "transformer"  Llama-style Transformer (``num_blocks`` layers, heads of 16 units)

All take ``forward(input_ids (B, S), state=None, return_state=False, labels=None)`` -> logits (B, S, V), or
with ``labels`` an ``LMOutput`` holding the loss; ``set_activation_checkpointing`` as the main models.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from ..baselines import LSTMConfig, LSTMLM, TransformerConfig, TransformerLM
from ..config import parse_ratio, slstm_positions, xLSTMConfig
from ..layers import GatedFFN, LayerNorm
from ..layers.common import run_block, small_init_, wang_init_
from ..layers.head import lm_outputs
from ..layers.slstm import forget_bias_init
from ..model import xLSTMLM

PAPER_MODELS = ("xlstm[1:0]", "xlstm[0:1]", "xlstm[1:1]", "lstm", "transformer")
SLSTM_INITS = ("reference", "block0")


class ResidualLSTMLM(nn.Module):
    """Embedding -> blocks of [x + W_o LSTM(LN(x)); x + FFN(LN(x))] -> LayerNorm -> head.

    The xLSTM block structure (spec §2.1/§2.3) around a classic sigmoid-gated LSTM cell (one nn.LSTM per
    block, hidden = E): the rung between the plain LSTM and the sLSTM in the ablation ladder.
    State: a tuple with one (h, c) per block, each (1, B, E).
    """

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        self.config = config
        E = config.embedding_dim
        self.embedding = nn.Embedding(config.vocab_size, E)
        self.norms = nn.ModuleList(LayerNorm(E, eps=config.norm_eps) for _ in range(config.num_blocks))
        self.cells = nn.ModuleList(nn.LSTM(E, E, batch_first=True) for _ in range(config.num_blocks))
        self.outs = nn.ModuleList(nn.Linear(E, E, bias=False) for _ in range(config.num_blocks))
        self.ffn_norms = nn.ModuleList(LayerNorm(E, eps=config.norm_eps) for _ in range(config.num_blocks))
        self.ffns = nn.ModuleList(GatedFFN(config) for _ in range(config.num_blocks))
        self.post_norm = LayerNorm(E, eps=config.norm_eps)
        self.lm_head = nn.Linear(E, config.vocab_size, bias=False)
        self.activation_checkpointing = False
        self.reset_parameters()

    def set_activation_checkpointing(self, enabled: bool = True) -> "ResidualLSTMLM":
        """Recompute each block's LSTM during backward instead of keeping its activations (as xLSTMLM)."""
        self.activation_checkpointing = bool(enabled)
        return self

    def reset_parameters(self):
        E, L = self.config.embedding_dim, self.config.num_blocks
        small_init_(self.embedding.weight, E)
        small_init_(self.lm_head.weight, E)
        for cell, out in zip(self.cells, self.outs):
            for name, p in cell.named_parameters():
                if name.startswith("weight"):
                    small_init_(p, E)
                else:
                    nn.init.zeros_(p)
                    if name.startswith("bias_ih"):
                        with torch.no_grad():
                            p[E : 2 * E].fill_(1.0)  # forget-gate bias 1 (gate order i, f, g, o)
            wang_init_(out.weight, E, L)

    def forward(self, input_ids: torch.Tensor, state: Optional[tuple] = None, return_state: bool = False,
                labels: Optional[torch.Tensor] = None, return_logits: bool = False):
        """input_ids: (B, S) -> logits (B, S, V), or (logits, state) with ``return_state=True``; with ``labels``
        an ``LMOutput`` with the loss (as ``xLSTMLM.forward``)."""
        if input_ids.dim() != 2:
            raise ValueError(f"ResidualLSTMLM: input_ids must have shape (B, S), got {tuple(input_ids.shape)}")
        x = self.embedding(input_ids)  # (B, S, E)
        new_state = []
        for j in range(self.config.num_blocks):
            y, hc = run_block(self.cells[j], self.activation_checkpointing, self.norms[j](x),
                              None if state is None else state[j])  # (B, S, E)
            x = x + self.outs[j](y)
            x = x + self.ffns[j](self.ffn_norms[j](x))
            new_state.append(hc)
        return lm_outputs(self.post_norm(x), self.lm_head, labels, tuple(new_state), return_state, return_logits)

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on weight matrices except the embedding."""
        decay = [p for p in self.parameters() if p.dim() >= 2 and p is not self.embedding.weight]
        ids = {id(p) for p in decay}
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": [p for p in self.parameters() if id(p) not in ids], "weight_decay": 0.0}]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


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
                context_length: int = 256, slstm_init: str = "reference") -> nn.Module:
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
        return LSTMLM(LSTMConfig(vocab_size=vocab_size, embedding_dim=width, num_layers=num_blocks,
                                 context_length=context_length))
    if key == "transformer":
        heads = max(1, width // 16)
        return TransformerLM(TransformerConfig(vocab_size=vocab_size, embedding_dim=width, num_layers=num_blocks,
                                               num_heads=heads, context_length=context_length))
    config = xLSTMConfig(vocab_size=vocab_size, embedding_dim=width, num_blocks=num_blocks,
                         mlstm_num_heads=num_heads, slstm_num_heads=num_heads, context_length=context_length)
    if key == "reslstm":
        return ResidualLSTMLM(config)
    ratio = key[len("xlstm["):-1]
    model = xLSTMLM(replace(config, slstm_at=slstm_positions(num_blocks, ratio)))
    if slstm_init == "block0":
        for block in model.blocks:
            if block.kind == "s":
                layer = block.layer
                with torch.no_grad():
                    layer.bias[width:2 * width] = forget_bias_init(layer.config, layer.head_dim, 0).repeat(layer.num_heads)
    return model


__all__ = ["PAPER_MODELS", "SLSTM_INITS", "ResidualLSTMLM", "build_model", "canonical_name"]
