"""LSTM cells in the xLSTM block structure: the ablation's rung between the plain LSTM and the sLSTM.

    x = embedding(ids)                                               (B, S, E)
    for each block:  x = x + W_o LSTM(LayerNorm(x))                  one nn.LSTM (hidden E) per block
                     x = x + FFN(LayerNorm(x))                       the sLSTM block's gated FFN
    logits = lm_head(LayerNorm(x))                                   (B, S, V)

That is the sLSTM block with a classic sigmoid-gated cell instead of exponential gating and memory mixing.
Its config is an ``xLSTMConfig`` (embedding_dim, num_blocks, norm_eps, the FFN fields; the mLSTM and sLSTM
fields are unused). State: one (h, c) per block, each (1, B, E), as nn.LSTM returns them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..config import xLSTMConfig
from ..layers import GatedFFN, LayerNorm
from ..layers.common import run_block, small_init_, wang_init_
from ..layers.head import check_input_ids, lm_outputs
from ..ops.varlen import check_cu_seqlens
from .base import LanguageModel
from .lstm import LSTMState, lstm_packed


class ResidualLSTMBlock(nn.Module):
    """x <- x + out(LSTM(LayerNorm(x))); x <- x + FFN(LayerNorm(x))."""

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        E = config.embedding_dim
        self.norm = LayerNorm(E, eps=config.norm_eps)
        self.cell = nn.LSTM(E, E, batch_first=True)
        self.out = nn.Linear(E, E, bias=False)
        self.ffn_norm = LayerNorm(E, eps=config.norm_eps)
        self.ffn = GatedFFN(config)

    def forward(self, x: torch.Tensor, state: Optional[LSTMState], cu_seqlens: Optional[torch.Tensor] = None):
        """x (B, S, E) -> (x, LSTMState (1, B, E) each)."""
        h = self.norm(x)
        if cu_seqlens is None:
            y, hc = self.cell(h, None if state is None else tuple(state))
        else:
            y, hc = lstm_packed(self.cell, h, state, cu_seqlens)
        x = x + self.out(y)
        return x + self.ffn(self.ffn_norm(x)), LSTMState(*hc)


class ResidualLSTMLM(LanguageModel):
    """Residual pre-LayerNorm blocks around nn.LSTM cells (``forward`` as every model: see ``models/base.py``)."""

    config_class = xLSTMConfig

    def __init__(self, config: xLSTMConfig):
        super().__init__(config)
        E = config.embedding_dim
        self.embedding = nn.Embedding(config.vocab_size, E)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(ResidualLSTMBlock(config) for _ in range(config.num_blocks))
        self.post_norm = LayerNorm(E, eps=config.norm_eps)
        self.lm_head = nn.Linear(E, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self):
        """Small init for the embedding, head and cell weights, wang init for the cell outputs, zero cell
        biases with a forget-gate bias of 1, the FFN's own init, norms 1."""
        E, L = self.config.embedding_dim, self.config.num_blocks
        small_init_(self.embedding.weight, E)
        if not self.config.tie_weights:
            small_init_(self.lm_head.weight, E)
        for block in self.blocks:
            for name, p in block.cell.named_parameters():
                if name.startswith("weight"):
                    small_init_(p, E)
                else:
                    nn.init.zeros_(p)
                    if name.startswith("bias_ih"):
                        with torch.no_grad():
                            p[E:2 * E].fill_(1.0)  # forget-gate bias 1 (gate order i, f, g, o)
            wang_init_(block.out.weight, E, L)
            block.norm.reset_parameters()
            block.ffn_norm.reset_parameters()
            block.ffn.reset_parameters()
        self.post_norm.reset_parameters()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def init_state(self, batch_size: int, device=None) -> tuple[LSTMState, ...]:
        """Zeros (1, B, E) for each block's h and c, in the weights' dtype."""
        w = self.lm_head.weight
        device = device if device is not None else w.device
        shape = (1, batch_size, self.config.embedding_dim)
        return tuple(LSTMState(torch.zeros(shape, device=device, dtype=w.dtype),
                               torch.zeros(shape, device=device, dtype=w.dtype)) for _ in self.blocks)

    def forward(self, input_ids: torch.Tensor, state: Optional[Sequence[LSTMState]] = None,
                return_state: bool = False, labels: Optional[torch.Tensor] = None, return_logits: bool = False,
                logits_to_keep: int = 0, cu_seqlens: Optional[torch.Tensor] = None):
        """As ``xLSTMLM.forward``: logits (B, S, V), (logits, state), or an ``LMOutput`` with ``labels``."""
        check_input_ids("ResidualLSTMLM", input_ids, self.config.vocab_size)
        if cu_seqlens is not None:
            check_cu_seqlens("ResidualLSTMLM", cu_seqlens, *input_ids.shape, input_ids.device)
        if state is not None:
            if len(state) != len(self.blocks):
                raise ValueError(f"ResidualLSTMLM: state must hold one (h, c) per block ({len(self.blocks)}), "
                                 f"got {len(state)}")
            if state[0][0].shape[1] != input_ids.shape[0]:
                raise ValueError(f"ResidualLSTMLM: state has batch size {state[0][0].shape[1]}, input_ids has "
                                 f"{input_ids.shape[0]}")
        x = self.emb_dropout(self.embedding(input_ids))  # (B, S, E)
        new_state = []
        for j, block in enumerate(self.blocks):
            x, s = run_block(block, self.activation_checkpointing, x, None if state is None else state[j], cu_seqlens)
            new_state.append(s)
        return lm_outputs(self.post_norm(x), self.lm_head, labels, tuple(new_state), return_state, return_logits,
                          logits_to_keep)


__all__ = ["ResidualLSTMLM", "ResidualLSTMBlock"]
