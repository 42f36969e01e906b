"""The xLSTM language model: token embedding -> pre-LayerNorm residual blocks -> LayerNorm -> head.

Every block is recurrent, so the model carries a fixed-size state: ``model(ids[:, :t], return_state=True)``
followed by single-token calls that carry the state gives the logits of one pass over ``ids``.

Packed documents: ``model(ids, cu_seqlens=cu)`` runs each document of the packed rows as if alone (every
recurrent state and conv window starts from zeros at its start; see ``openxlstm.ops.packing`` and
docs/packing.md).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from .config import xLSTMConfig
from .layers import Backends, GatedFFN, LayerNorm, mLSTMLayer, mLSTMLayerState, sLSTMLayer, sLSTMLayerState
from .layers.common import run_block, small_init_
from .layers.head import check_input_ids, lm_outputs
from .ops.packing import check_cu_seqlens

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

    def forward(self, x: torch.Tensor, state: Optional[BlockState], backends: Backends,
                cu_seqlens: Optional[torch.Tensor] = None):
        """x: (B, S, E) -> (x, new state); cu_seqlens: packed documents or None."""
        y, state = self.layer(self.norm(x), state, backends, cu_seqlens)
        x = x + y
        if self.ffn is not None:
            x = x + self.ffn(self.ffn_norm(x))
        return x, state


class xLSTMLM(nn.Module):
    """xLSTM language model (spec §2). ``forward(input_ids, state=None, return_state=False)``.

    Args:
        config: the model's shape.
        backends: run-time kernel choice (default "auto": Triton on CUDA, PyTorch elsewhere).
    """

    def __init__(self, config: xLSTMConfig, backends: Optional[Backends] = None):
        super().__init__()
        if not isinstance(config, xLSTMConfig):
            raise TypeError(f"xLSTMLM needs an xLSTMConfig, got {type(config).__name__}")
        self.config = config
        self.backends = backends or Backends()
        self.activation_checkpointing = False
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
        """The reference initialization (spec §2.4), applied by the constructor."""
        E = self.config.embedding_dim
        small_init_(self.embedding.weight, E)
        if not self.config.tie_weights:
            small_init_(self.lm_head.weight, E)
        for block in self.blocks:
            block.norm.reset_parameters()
            block.layer.reset_parameters()
            if block.ffn is not None:
                block.ffn_norm.reset_parameters()
                block.ffn.reset_parameters()
        self.post_norm.reset_parameters()

    def set_backends(self, mlstm: str = "auto", slstm: str = "auto", chunk_size: Optional[int] = None) -> "xLSTMLM":
        """Choose the kernels at run time (not saved with the model)."""
        self.backends = Backends(mlstm=mlstm, slstm=slstm, chunk_size=chunk_size)
        return self

    def set_activation_checkpointing(self, enabled: bool = True) -> "xLSTMLM":
        """Recompute each block's forward during backward instead of keeping its activations (training only;
        a run-time choice, not saved with the model). Same results; memory per block drops to its input."""
        self.activation_checkpointing = bool(enabled)
        return self

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
        x = self.emb_dropout(self.embedding(input_ids))  # (B, S, E)
        new_state = []
        for j, block in enumerate(self.blocks):
            x, s = run_block(block, self.activation_checkpointing, x, None if state is None else state[j], self.backends,
                             cu_seqlens)
            new_state.append(s)
        return lm_outputs(self.post_norm(x), self.lm_head, labels, tuple(new_state), return_state, return_logits,
                          logits_to_keep)

    def generate(self, prompt, tokenizer=None, **kwargs):
        """Continue ``prompt``: prefill in one pass, then decode token by token with the recurrent state.

        See ``openxlstm.generation.generate`` for the arguments (max_new_tokens, temperature, top_k, top_p,
        seed, stop, on_text).
        """
        from .generation import generate

        return generate(self, prompt, tokenizer, **kwargs)

    # optimizer ------------------------------------------------------------------------------------------
    def weight_decay_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(decay, no_decay) as the reference splits them: decay on projection/gate/conv weight matrices;
        none on norms, biases, the mLSTM skip, the sLSTM recurrent matrix, and (by default) the embedding."""
        decay, no_decay, seen = [], [], set()
        emb = self.embedding.weight
        for name, p in self.named_parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if p is emb:
                (decay if self.config.weight_decay_on_embedding else no_decay).append(p)
            elif p.dim() >= 2 and not name.endswith("layer.recurrent"):
                decay.append(p)
            else:
                no_decay.append(p)
        return decay, no_decay

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """Parameter groups for ``torch.optim.AdamW``."""
        decay, no_decay = self.weight_decay_groups()
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def num_params(self) -> int:
        """Number of distinct parameters (a tied head counts once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


__all__ = ["xLSTMLM", "xLSTMBlock", "BlockState"]
