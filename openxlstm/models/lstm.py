"""A classic multi-layer LSTM language model, the baseline without exponential gating or matrix memory.

    x = dropout(embedding(ids))                  (B, S, E)
    y, (h, c) = nn.LSTM(x, state)                (B, S, H); h, c (num_layers, B, H), as nn.LSTM returns them
    logits = lm_head(dropout(y))                 (B, S, V)

``sized_lstm_config`` picks the width that gives a target parameter count, so that it can be built "of equal
size" to an xLSTM. Packed documents (``cu_seqlens``): nn.LSTM runs once over all the documents as a batch of
variable-length sequences (``pack_padded_sequence``): exact, one cuDNN call, but its layout comes from one
host read of ``cu_seqlens`` per forward (the baseline only; the xLSTM never reads it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from ..config import ConfigIO, check_field_types, check_positive_ints
from ..layers.common import run_block
from ..layers.head import check_input_ids, lm_outputs
from ..ops.varlen import check_cu_seqlens
from .base import LanguageModel, closest_width


@dataclass
class LSTMConfig(ConfigIO):
    """Embedding (E) -> ``num_layers`` stacked nn.LSTM layers (hidden H) -> Linear head (H -> V).

    ``hidden_dim`` defaults to ``embedding_dim``; ``tie_weights`` needs H == E.
    """

    vocab_size: int = 256
    embedding_dim: int = 256
    hidden_dim: Optional[int] = None
    num_layers: int = 2
    dropout: float = 0.0
    tie_weights: bool = False
    context_length: int = 2048  # the training context; informational

    def __post_init__(self):
        if self.hidden_dim is None:
            self.hidden_dim = self.embedding_dim
        check_field_types(self)
        check_positive_ints(self, ("vocab_size", "embedding_dim", "hidden_dim", "num_layers", "context_length"))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LSTMConfig: dropout must be in [0, 1), got {self.dropout!r}")
        if self.tie_weights and self.hidden_dim != self.embedding_dim:
            raise ValueError("LSTMConfig: tie_weights needs hidden_dim == embedding_dim")

    def num_params(self) -> int:
        """Parameter count without building the model."""
        V, E, H, L = self.vocab_size, self.embedding_dim, self.hidden_dim, self.num_layers
        lstm = sum(4 * H * ((E if j == 0 else H) + H) + 8 * H for j in range(L))
        return V * E + lstm + (0 if self.tie_weights else H * V)


class LSTMState(NamedTuple):
    """h, c: (num_layers, B, H), as nn.LSTM returns them."""

    h: torch.Tensor
    c: torch.Tensor


class LSTMLM(LanguageModel):
    """A classic multi-layer LSTM language model (sigmoid gates, scalar memory, no exponential gating)."""

    config_class = LSTMConfig

    def __init__(self, config: LSTMConfig):
        super().__init__(config)
        E, H = config.embedding_dim, config.hidden_dim
        self.embedding = nn.Embedding(config.vocab_size, E)
        self.dropout = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(E, H, num_layers=config.num_layers, batch_first=True,
                            dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.lm_head = nn.Linear(H, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self):
        """Embedding/head N(0, 1/sqrt(E)) scaled; LSTM uniform(+-1/sqrt(H)) with forget-gate bias 1."""
        E, H = self.config.embedding_dim, self.config.hidden_dim
        nn.init.normal_(self.embedding.weight, std=math.sqrt(2.0 / (5.0 * E)))
        if not self.config.tie_weights:
            nn.init.normal_(self.lm_head.weight, std=math.sqrt(2.0 / (5.0 * H)))
        bound = 1.0 / math.sqrt(H)
        for name, p in self.lstm.named_parameters():
            nn.init.uniform_(p, -bound, bound)
            if name.startswith("bias_ih"):
                with torch.no_grad():
                    p[H:2 * H].fill_(1.0)  # gate order i, f, g, o: a forget bias of 1 (Jozefowicz et al. 2015)
            elif name.startswith("bias_hh"):
                nn.init.zeros_(p)

    def forward(self, input_ids: torch.Tensor, state: Optional[LSTMState] = None, return_state: bool = False,
                labels: Optional[torch.Tensor] = None, return_logits: bool = False, logits_to_keep: int = 0,
                cu_seqlens: Optional[torch.Tensor] = None):
        """input_ids: (B, S) -> logits (B, S, V), or (logits, LSTMState) with ``return_state=True``; with
        ``labels`` an ``LMOutput``; ``cu_seqlens``: packed documents (as ``xLSTMLM.forward``)."""
        check_input_ids("LSTMLM", input_ids, self.config.vocab_size)
        if state is not None:
            if not isinstance(state, tuple) or len(state) != 2:
                raise TypeError("LSTMLM: state must be an LSTMState(h, c)")
            if state[0].shape[1] != input_ids.shape[0]:
                raise ValueError(f"LSTMLM: state has batch size {state[0].shape[1]}, input_ids has {input_ids.shape[0]}")
            state = (state[0], state[1])
        x = self.dropout(self.embedding(input_ids))  # (B, S, E)
        if cu_seqlens is None:
            y, (h, c) = run_block(self.lstm, self.activation_checkpointing, x, state)  # (B, S, H); h, c: (L, B, H)
        else:
            check_cu_seqlens("LSTMLM", cu_seqlens, *input_ids.shape, input_ids.device)
            y, (h, c) = lstm_packed(self.lstm, x, state, cu_seqlens, self.activation_checkpointing)
        return lm_outputs(self.dropout(y), self.lm_head, labels, LSTMState(h, c), return_state, return_logits,
                          logits_to_keep)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def init_state(self, batch_size: int, device=None) -> LSTMState:
        """Zeros (num_layers, B, H) for h and c, in the weights' dtype."""
        w = self.lm_head.weight
        shape = (self.config.num_layers, batch_size, self.config.hidden_dim)
        device = device if device is not None else w.device
        return LSTMState(torch.zeros(shape, device=device, dtype=w.dtype), torch.zeros(shape, device=device, dtype=w.dtype))


def lstm_packed(lstm: nn.LSTM, x: torch.Tensor, state, cu_seqlens: torch.Tensor, checkpointing: bool = False):
    """``lstm`` (batch_first) over the documents of packed rows x (B, S, E), run as one batch of D
    variable-length sequences: the first document of row r starts from ``state[:, r]`` (zeros when None), the
    others from zeros. Returns y (B, S, H) and each row's last document's (h, c), each (L, B, H)."""
    B, S, E = x.shape
    L, H = lstm.num_layers, lstm.hidden_size
    bounds = cu_seqlens.tolist()  # the one host read: the layout of the batch of documents
    if bounds[0] != 0 or bounds[-1] != B * S or any(a > b for a, b in zip(bounds, bounds[1:])) or \
            any(r * S not in bounds for r in range(B)):
        raise ValueError(f"LSTM: cu_seqlens must run from 0 to B*S = {B * S} without decreasing, with every "
                         f"row start (a multiple of S = {S}) among its boundaries")
    docs = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]  # (start, end) over the B*S tokens
    lengths = torch.tensor([b - a for a, b in docs])
    width = int(lengths.max())
    offs = torch.arange(width)
    starts = torch.tensor([a for a, _ in docs])
    gather = (starts[:, None] + torch.minimum(offs, lengths[:, None] - 1)).to(x.device)  # (D, width)
    xd = x.reshape(B * S, E)[gather]  # (D, width, E), padded with each document's last token
    h0 = x.new_zeros(L, len(docs), H)
    c0 = x.new_zeros(L, len(docs), H)
    if state is not None:
        first = [d for d, (a, _) in enumerate(docs) if a % S == 0]  # each row's first document
        rows = torch.tensor([docs[d][0] // S for d in first], device=x.device)
        sel = torch.tensor(first, device=x.device)
        h0 = h0.index_copy(1, sel, state[0][:, rows].to(h0.dtype))
        c0 = c0.index_copy(1, sel, state[1][:, rows].to(c0.dtype))
    packed = nn.utils.rnn.pack_padded_sequence(xd, lengths, batch_first=True, enforce_sorted=False)
    out, (h, c) = run_block(lstm, checkpointing, packed, (h0, c0))
    yd, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=width)  # (D, width, H)
    doc_of = torch.repeat_interleave(torch.arange(len(docs)), lengths).to(x.device)  # (B*S,)
    pos_of = torch.cat([torch.arange(int(n)) for n in lengths]).to(x.device)
    y = yd[doc_of, pos_of].view(B, S, H)
    last = torch.tensor([d for d, (_, b) in enumerate(docs) if b % S == 0], device=x.device)  # each row's last
    return y, (h[:, last], c[:, last])


def sized_lstm_config(target_params: int, vocab_size: int, num_layers: int = 2, multiple: int = 8, **kw) -> LSTMConfig:
    """An LSTMConfig with E = H (a multiple of ``multiple``) whose parameter count is closest to target."""
    def count(w: int) -> int:
        return LSTMConfig(vocab_size=vocab_size, embedding_dim=w, num_layers=num_layers, **kw).num_params()

    width = closest_width(count, target_params, multiple)
    return LSTMConfig(vocab_size=vocab_size, embedding_dim=width, num_layers=num_layers, **kw)


__all__ = ["LSTMConfig", "LSTMLM", "LSTMState", "lstm_packed", "sized_lstm_config"]
