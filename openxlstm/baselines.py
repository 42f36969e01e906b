"""Baselines for honest comparisons: a classic multi-layer LSTM LM and a Llama-style Transformer LM.

Both have the interface of ``xLSTMLM``: ``forward(input_ids, state=None, return_state=False, labels=None)`` ->
logits (B, S, V), (logits, state), or an ``LMOutput`` with the loss; ``optim_groups(weight_decay)``; ``num_params()``; a ``config`` dataclass with
``to_dict``/``from_dict``. ``sized_lstm_config`` / ``sized_transformer_config`` pick the width that gives a
target parameter count, so a baseline can be built "of equal size" to an xLSTM.

State: the LSTM carries ``LSTMState(h, c)``, each (num_layers, B, H); the Transformer carries a KV cache,
a tuple with one ``KVCache(k, v)`` per layer, each (B, NH, T, head_dim) for T tokens seen so far.

Packed documents (``cu_seqlens``, as ``xLSTMLM.forward``; see ``openxlstm.ops.packing``): the Transformer
attends block-diagonally (a document sees only itself, the first document of a row also the passed cache)
with RoPE positions restarting at each document, all on the device; its returned cache is the last
document's, which needs one host read of ``cu_seqlens`` and B = 1. The LSTM runs nn.LSTM once over all the
documents as a batch of variable-length sequences (``pack_padded_sequence``): exact, one cuDNN call, but its
layout comes from one host read of ``cu_seqlens`` per forward (the baseline only; the xLSTM never reads it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_field_types
from .layers.common import RMSNorm, run_block
from .layers.head import check_input_ids, lm_outputs
from .ops.packing import check_cu_seqlens, doc_starts, last_start


def _check_positive_ints(obj, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(obj).__name__}: {name} must be a positive integer, got {value!r}")


class _ConfigIO:
    """to_dict / from_dict shared by the baseline configs (unknown fields are an error)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)


def _decay_groups(model: nn.Module, weight_decay: float, embedding: nn.Parameter) -> list[dict]:
    """AdamW groups: decay on weight matrices, none on the embedding, norms and biases (as xLSTMLM)."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and p is not embedding else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _CheckpointingMixin:
    """``set_activation_checkpointing`` as ``xLSTMLM`` has it (recompute each layer during backward)."""

    activation_checkpointing = False

    def set_activation_checkpointing(self, enabled: bool = True):
        self.activation_checkpointing = bool(enabled)
        return self


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------------------------------------------------
# LSTM
# ---------------------------------------------------------------------------------------------------------
@dataclass
class LSTMConfig(_ConfigIO):
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
        _check_positive_ints(self, ("vocab_size", "embedding_dim", "hidden_dim", "num_layers", "context_length"))
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


class LSTMLM(_CheckpointingMixin, nn.Module):
    """A classic multi-layer LSTM language model (sigmoid gates, scalar memory, no exponential gating)."""

    def __init__(self, config: LSTMConfig):
        super().__init__()
        if not isinstance(config, LSTMConfig):
            raise TypeError(f"LSTMLM needs an LSTMConfig, got {type(config).__name__}")
        self.config = config
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
            y, (h, c) = self._packed(x, state, cu_seqlens)
        return lm_outputs(self.dropout(y), self.lm_head, labels, LSTMState(h, c), return_state, return_logits,
                          logits_to_keep)

    def _packed(self, x: torch.Tensor, state, cu_seqlens: torch.Tensor):
        """nn.LSTM over the documents of packed rows x (B, S, E), run as one batch of D variable-length
        sequences: the first document of row r starts from ``state[:, r]`` (zeros when None), the others
        from zeros. Returns y (B, S, H) and each row's last document's (h, c), each (L, B, H)."""
        B, S, E = x.shape
        L, H = self.config.num_layers, self.config.hidden_dim
        bounds = cu_seqlens.tolist()  # the one host read: the layout of the batch of documents
        if bounds[0] != 0 or bounds[-1] != B * S or any(a > b for a, b in zip(bounds, bounds[1:])) or \
                any(r * S not in bounds for r in range(B)):
            raise ValueError(f"LSTMLM: cu_seqlens must run from 0 to B*S = {B * S} without decreasing, with every "
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
        out, (h, c) = run_block(self.lstm, self.activation_checkpointing, packed, (h0, c0))
        yd, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=width)  # (D, width, H)
        doc_of = torch.repeat_interleave(torch.arange(len(docs)), lengths).to(x.device)  # (B*S,)
        pos_of = torch.cat([torch.arange(int(n)) for n in lengths]).to(x.device)
        y = yd[doc_of, pos_of].view(B, S, H)
        last = torch.tensor([d for d, (_, b) in enumerate(docs) if b % S == 0], device=x.device)  # each row's last
        return y, (h[:, last], c[:, last])

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """Parameter groups for ``torch.optim.AdamW`` (decay on matrices, not on embedding or biases)."""
        return _decay_groups(self, weight_decay, self.embedding.weight)

    def num_params(self) -> int:
        return _num_params(self)


# ---------------------------------------------------------------------------------------------------------
# Transformer (Llama-style)
# ---------------------------------------------------------------------------------------------------------
@dataclass
class TransformerConfig(_ConfigIO):
    """Llama-style decoder: RMSNorm pre-norm blocks, RoPE, SDPA causal attention, SwiGLU FFN, final RMSNorm.

    ``ffn_dim`` defaults to 8/3 E rounded up to 64 (SwiGLU's usual width). ``context_length`` is the
    training context (informational: RoPE runs at any length).
    """

    vocab_size: int = 256
    embedding_dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    ffn_dim: Optional[int] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_weights: bool = False
    context_length: int = 2048

    def __post_init__(self):
        if self.ffn_dim is None:
            self.ffn_dim = int(math.ceil(8 * self.embedding_dim / 3 / 64) * 64)
        check_field_types(self)
        _check_positive_ints(self, ("vocab_size", "embedding_dim", "num_layers", "num_heads", "ffn_dim", "context_length"))
        if self.embedding_dim % self.num_heads or (self.embedding_dim // self.num_heads) % 2:
            raise ValueError(f"TransformerConfig: embedding_dim={self.embedding_dim} must split into num_heads="
                             f"{self.num_heads} heads of even size (RoPE rotates pairs)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig: dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.embedding_dim // self.num_heads

    def num_params(self) -> int:
        """Parameter count without building the model."""
        V, E, F_, L = self.vocab_size, self.embedding_dim, self.ffn_dim, self.num_layers
        block = 4 * E * E + 3 * E * F_ + 2 * E
        return V * E + L * block + E + (0 if self.tie_weights else E * V)


class KVCache(NamedTuple):
    """k, v: (B, NH, T, head_dim) for the T tokens seen so far."""

    k: torch.Tensor
    v: torch.Tensor


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (S,) -> cos, sin: (S, head_dim // 2), in float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, NH, S, D): rotate the pairs (x[..., :D/2], x[..., D/2:]) (the "rotate half" layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    y = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return y.type_as(x)


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        E = config.embedding_dim
        self.num_heads, self.head_dim, self.rope_base = config.num_heads, config.head_dim, config.rope_base
        self.dropout = config.dropout
        self.qkv = nn.Linear(E, 3 * E, bias=False)
        self.proj = nn.Linear(E, E, bias=False)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache], starts: Optional[torch.Tensor] = None):
        """x: (B, S, E), cache of T earlier tokens -> (y (B, S, E), KVCache of T + S tokens).

        starts: (B, S) bool document starts (``ops.packing.doc_starts``) or None: attention is then
        block-diagonal over documents (the cache is visible to each row's first document only) and RoPE
        positions restart at every start."""
        B, S, E = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, NH, S, D) each
        T = 0 if cache is None else cache.k.shape[2]
        pos = torch.arange(T, T + S, device=x.device)
        if starts is not None:
            begin = last_start(starts)  # (B, S) the token's document start, -1 in a row's first document
            pos = torch.where(begin >= 0, pos - T - begin, pos)  # (B, S)
        cos, sin = rope_cos_sin(pos.reshape(-1), self.head_dim, self.rope_base)
        cos, sin = (t.view(*pos.shape, -1)[..., None, :, :] if starts is not None else t for t in (cos, sin))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)  # (B, NH, T + S, D)
        drop = self.dropout if self.training else 0.0
        if starts is not None:  # block-diagonal causal: same document (the cache counts as the first's)
            doc = starts.cumsum(-1)  # (B, S), 0 for a row's first document
            keys = torch.cat([doc.new_zeros(B, T), doc], dim=1)  # (B, T + S)
            mask = (doc[:, :, None] == keys[:, None, :]) & torch.ones(S, T + S, dtype=torch.bool,
                                                                       device=x.device).tril(diagonal=T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=drop)
        elif T == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:  # query i (absolute position T + i) sees keys 0 .. T + i
            mask = torch.ones(S, T + S, dtype=torch.bool, device=x.device).tril(diagonal=T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        y = y.transpose(1, 2).reshape(B, S, E)  # (B, S, E)
        return self.proj(y), KVCache(k, v)


class SwiGLU(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.embedding_dim, 2 * config.ffn_dim, bias=False)
        self.down = nn.Linear(config.ffn_dim, config.embedding_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, S, F) each
        return self.down(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.embedding_dim, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.embedding_dim, config.norm_eps)
        self.ffn = SwiGLU(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache], starts: Optional[torch.Tensor] = None):
        y, cache = self.attn(self.attn_norm(x), cache, starts)
        x = x + self.dropout(y)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, cache


class TransformerLM(_CheckpointingMixin, nn.Module):
    """Llama-style Transformer LM. The state is a KV cache (one ``KVCache`` per layer)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"TransformerLM needs a TransformerConfig, got {type(config).__name__}")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.embedding_dim, config.norm_eps)
        self.lm_head = nn.Linear(config.embedding_dim, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self):
        """GPT-2/Llama recipe: N(0, 0.02), residual output projections scaled by 1/sqrt(2 L), norms 1."""
        std = 0.02
        nn.init.normal_(self.embedding.weight, std=std)
        if not self.config.tie_weights:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.normal_(block.ffn.gate_up.weight, std=std)
            for out in (block.attn.proj, block.ffn.down):
                nn.init.normal_(out.weight, std=std / math.sqrt(2 * self.config.num_layers))
            nn.init.ones_(block.attn_norm.weight)
            nn.init.ones_(block.ffn_norm.weight)
        nn.init.ones_(self.norm.weight)

    def forward(self, input_ids: torch.Tensor, state: Optional[Sequence[KVCache]] = None, return_state: bool = False,
                labels: Optional[torch.Tensor] = None, return_logits: bool = False, logits_to_keep: int = 0,
                cu_seqlens: Optional[torch.Tensor] = None):
        """input_ids: (B, S) -> logits (B, S, V), or (logits, tuple of KVCache) with ``return_state=True``;
        with ``labels`` an ``LMOutput`` (as ``xLSTMLM.forward``).

        ``state`` (the caches of an earlier call) continues the sequence; it is never modified.
        ``cu_seqlens``: packed documents (as ``xLSTMLM.forward``); the returned caches are then the last
        document's (B = 1 only: one host read of its start).
        """
        check_input_ids("TransformerLM", input_ids, self.config.vocab_size)
        if state is not None:
            if len(state) != len(self.blocks):
                raise ValueError(f"TransformerLM: state must hold one KVCache per layer ({len(self.blocks)}), got {len(state)}")
            if state[0].k.shape[0] != input_ids.shape[0]:
                raise ValueError(f"TransformerLM: state has batch size {state[0].k.shape[0]}, input_ids has {input_ids.shape[0]}")
        B, S = input_ids.shape
        starts = doc_starts(cu_seqlens, B, S, "TransformerLM", input_ids.device)
        if starts is not None and return_state and B > 1:
            raise ValueError("TransformerLM: return_state with cu_seqlens needs B = 1 (each row's last document "
                             "would leave a cache of its own length)")
        x = self.emb_dropout(self.embedding(input_ids))  # (B, S, E)
        caches = []
        for j, block in enumerate(self.blocks):
            x, cache = run_block(block, self.activation_checkpointing, x, None if state is None else state[j], starts)
            caches.append(cache)
        if starts is not None and return_state:  # keep the keys and values of the document of the last token
            cut = int(cu_seqlens[cu_seqlens < S].max())
            if cut > 0:
                caches = [KVCache(c.k[:, :, c.k.shape[2] - (S - cut):], c.v[:, :, c.v.shape[2] - (S - cut):])
                          for c in caches]
        return lm_outputs(self.norm(x), self.lm_head, labels, tuple(caches), return_state, return_logits,
                          logits_to_keep)

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """Parameter groups for ``torch.optim.AdamW`` (decay on matrices, not on embedding or norms)."""
        return _decay_groups(self, weight_decay, self.embedding.weight)

    def num_params(self) -> int:
        return _num_params(self)


# ---------------------------------------------------------------------------------------------------------
# Equal-size helpers
# ---------------------------------------------------------------------------------------------------------
def _closest_width(count, target: int, multiple: int, lo: int = 1, hi: int = 1 << 16) -> int:
    """The multiple of ``multiple`` in [lo*multiple, hi*multiple] whose ``count(width)`` is closest to target
    (count is increasing in width)."""
    a, b = lo, hi
    while a < b:  # smallest k with count(k * multiple) >= target
        mid = (a + b) // 2
        if count(mid * multiple) >= target:
            b = mid
        else:
            a = mid + 1
    candidates = [k for k in (a - 1, a) if k >= lo]
    return multiple * min(candidates, key=lambda k: abs(count(k * multiple) - target))


def sized_lstm_config(target_params: int, vocab_size: int, num_layers: int = 2, multiple: int = 8, **kw) -> LSTMConfig:
    """An LSTMConfig with E = H (a multiple of ``multiple``) whose parameter count is closest to target."""
    def count(w: int) -> int:
        return LSTMConfig(vocab_size=vocab_size, embedding_dim=w, num_layers=num_layers, **kw).num_params()

    width = _closest_width(count, target_params, multiple)
    return LSTMConfig(vocab_size=vocab_size, embedding_dim=width, num_layers=num_layers, **kw)


def sized_transformer_config(target_params: int, vocab_size: int, num_layers: int = 4, head_dim: int = 32,
                             **kw) -> TransformerConfig:
    """A TransformerConfig with heads of ``head_dim`` whose parameter count is closest to target.

    The width E is a multiple of ``head_dim`` (num_heads = E / head_dim); ``ffn_dim`` follows E.
    """
    def make(w: int) -> TransformerConfig:
        return TransformerConfig(vocab_size=vocab_size, embedding_dim=w, num_layers=num_layers,
                                 num_heads=w // head_dim, **kw)

    width = _closest_width(lambda w: make(w).num_params(), target_params, head_dim)
    return make(width)


__all__ = ["LSTMConfig", "LSTMLM", "LSTMState", "TransformerConfig", "TransformerLM", "KVCache", "RMSNorm",
           "sized_lstm_config", "sized_transformer_config"]
