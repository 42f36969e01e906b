"""The xLSTM language model: token embedding -> pre-LayerNorm residual blocks -> LayerNorm -> head.

    x = dropout(embedding(ids))                                    (B, S, E)
    for each block:  x = x + layer(LayerNorm(x))                   mLSTM or sLSTM layer
                     x = x + FFN(LayerNorm(x))                     sLSTM blocks only
    logits = lm_head(LayerNorm(x))                                 (B, S, V)

Every block is recurrent, so the model carries a fixed-size state: ``model(ids[:, :t], return_state=True)``
followed by single-token calls that carry the state gives the logits of one pass over ``ids``. A call is a
step (each layer's ``step``) when it reads one token per row without recording gradients (generation).

Packed documents: ``model(ids, cu_seqlens=cu)`` runs each document of the packed rows as if alone (every
recurrent state and conv window starts from zeros at its start; see ``openxlstm.ops.varlen`` and
docs/packing.md).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..config import xLSTMConfig
from ..layers import GatedFFN, LayerNorm, mLSTMLayer, mLSTMLayerState, sLSTMLayer, sLSTMLayerState
from ..layers.common import run_block, small_init_
from ..layers.head import check_input_ids, lm_outputs
from ..ops.backends import Backends
from ..ops.varlen import check_cu_seqlens
from .base import LanguageModel

BlockState = Union[mLSTMLayerState, sLSTMLayerState]


class xLSTMBlock(nn.Module):
    """x <- x + layer(LayerNorm(x)); for sLSTM blocks also x <- x + FFN(LayerNorm(x))."""

    def __init__(self, config: xLSTMConfig, block_idx: int, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = LayerNorm(config.embedding_dim, eps=config.norm_eps)
        if kind == "m":
            self.layer = mLSTMLayer(config)
            self.ffn_norm, self.ffn = None, None
        else:
            self.layer = sLSTMLayer(config, block_idx)
            self.ffn_norm = LayerNorm(config.embedding_dim, eps=config.norm_eps)
            self.ffn = GatedFFN(config)

    def reset_parameters(self):
        self.norm.reset_parameters()
        self.layer.reset_parameters()
        if self.ffn is not None:
            self.ffn_norm.reset_parameters()
            self.ffn.reset_parameters()

    def forward(self, x: torch.Tensor, state: Optional[BlockState], backends: Backends,
                cu_seqlens: Optional[torch.Tensor] = None, step: bool = False):
        """x: (B, S, E) -> (x, new state); cu_seqlens: packed documents or None; ``step``: one token per row
        through the layer's step."""
        h = self.norm(x)
        y, state = (self.layer.step(h, state, backends=backends) if step else
                    self.layer(h, state, cu_seqlens, backends=backends))
        x = x + y
        if self.ffn is not None:
            x = x + self.ffn(self.ffn_norm(x))
        return x, state


class xLSTMLM(LanguageModel):
    """xLSTM language model (``forward`` as every model of the registry: see ``models/base.py``).

    Args:
        config: the model's shape.
        backends: run-time kernel choice (default "auto": Triton on CUDA, PyTorch elsewhere).
    """

    config_class = xLSTMConfig

    def __init__(self, config: xLSTMConfig, backends: Optional[Backends] = None):
        super().__init__(config)
        self.backends = backends or Backends()
        E = config.embedding_dim
        self.embedding = nn.Embedding(config.vocab_size, E)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(xLSTMBlock(config, j, kind) for j, kind in enumerate(config.block_types))
        self.post_norm = LayerNorm(E, eps=config.norm_eps)
        self.lm_head = nn.Linear(E, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self):
        """The reference initialization, applied by the constructor."""
        E = self.config.embedding_dim
        small_init_(self.embedding.weight, E)
        if not self.config.tie_weights:
            small_init_(self.lm_head.weight, E)
        for block in self.blocks:
            block.reset_parameters()
        self.post_norm.reset_parameters()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """The reference's split: no decay on norms, biases, the mLSTM skip, the sLSTM recurrent matrix and
        (unless ``weight_decay_on_embedding``) the embedding."""
        if param is self.embedding.weight:
            return not self.config.weight_decay_on_embedding
        return param.dim() < 2 or name.endswith("layer.recurrent")

    def init_state(self, batch_size: int, device=None) -> tuple[BlockState, ...]:
        """One zero state per block (see each layer's ``init_state``)."""
        return tuple(block.layer.init_state(batch_size, device) for block in self.blocks)

    def _check(self, input_ids: torch.Tensor, state, cu_seqlens=None) -> None:
        check_input_ids("xLSTMLM", input_ids, self.config.vocab_size)
        if cu_seqlens is not None:
            check_cu_seqlens("xLSTMLM", cu_seqlens, *input_ids.shape, input_ids.device)
        if state is not None:
            if len(state) != len(self.blocks):
                raise ValueError(f"xLSTMLM: state must hold one entry per block ({len(self.blocks)}), got {len(state)}")
            for j, (block, s) in enumerate(zip(self.blocks, state)):
                want = mLSTMLayerState if block.kind == "m" else sLSTMLayerState
                if not isinstance(s, want):
                    raise TypeError(f"xLSTMLM: state[{j}] must be an {want.__name__}, got {type(s).__name__}")
                lead = s.C if block.kind == "m" else s.h
                if lead.shape[0] != input_ids.shape[0]:
                    raise ValueError(f"xLSTMLM: state[{j}] has batch size {lead.shape[0]}, input_ids has {input_ids.shape[0]}")

    def forward(self, input_ids: torch.Tensor, state: Optional[Sequence[BlockState]] = None,
                return_state: bool = False, labels: Optional[torch.Tensor] = None, return_logits: bool = False,
                logits_to_keep: int = 0, cu_seqlens: Optional[torch.Tensor] = None):
        """input_ids: (B, S) token ids -> logits (B, S, V), or (logits, state) with ``return_state=True``;
        ``logits_to_keep > 0`` keeps only the logits of the last that many positions.

        With ``labels`` (B, S) (the next token of each position, -100 where nothing is scored) the result is
        an ``LMOutput`` with the mean loss, computed without (B*S, V) float32 logits; its ``logits`` are
        filled only with ``return_logits=True`` and its ``state`` with ``return_state=True``.
        ``state`` (from an earlier call) continues the sequence exactly; it is never modified.

        ``cu_seqlens`` (D+1,) int: packed documents over the B*S tokens read row by row (flash-linear-
        attention's convention; with B > 1 every row start must be a boundary). Each document runs as if
        alone from the initial state, except the first of each row, which continues ``state``; the returned
        state is that of each row's last document. Labels are the caller's: put -100 where the next token
        belongs to another document (``openxlstm.data.packing.packed_labels``).
        """
        self._check(input_ids, state, cu_seqlens)
        backends = self.backends.resolve(input_ids.device)
        step = input_ids.shape[1] == 1 and cu_seqlens is None and not torch.is_grad_enabled()
        x = self.emb_dropout(self.embedding(input_ids))  # (B, S, E)
        new_state = []
        for j, block in enumerate(self.blocks):
            x, s = run_block(block, self.activation_checkpointing, x, None if state is None else state[j], backends,
                             cu_seqlens, step)
            new_state.append(s)
        return lm_outputs(self.post_norm(x), self.lm_head, labels, tuple(new_state), return_state, return_logits,
                          logits_to_keep)


__all__ = ["xLSTMLM", "xLSTMBlock", "BlockState"]
