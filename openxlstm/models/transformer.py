"""A Llama-style Transformer language model, the attention baseline: RMSNorm pre-norm blocks, RoPE, SDPA
causal attention, SwiGLU FFN, final RMSNorm.

    x = dropout(embedding(ids))                                           (B, S, E)
    for each block:  x = x + attn(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))
    logits = lm_head(RMSNorm(x))                                          (B, S, V)

The state is a KV cache, one ``KVCache(k, v)`` per layer, each (B, NH, T, head_dim) for the T tokens seen so
far: it grows with the text. Packed documents (``cu_seqlens``): attention is block-diagonal (a document sees
only itself, the first document of a row also the passed cache) with RoPE positions restarting at each
document, all on the device; the returned cache is the last document's, which needs one host read of
``cu_seqlens`` and B = 1. ``sized_transformer_config`` picks the width for a target parameter count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigIO, check_field_types, check_positive_ints
from ..layers.common import RMSNorm, run_block
from ..layers.head import check_input_ids, lm_outputs
from ..ops.varlen import doc_starts, last_start
from .base import LanguageModel, closest_width


@dataclass
class TransformerConfig(ConfigIO):
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
        check_positive_ints(self, ("vocab_size", "embedding_dim", "num_layers", "num_heads", "ffn_dim", "context_length"))
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

        starts: (B, S) bool document starts (``ops.varlen.doc_starts``) or None: attention is then
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


class TransformerLM(LanguageModel):
    """Llama-style Transformer LM. The state is a KV cache (one ``KVCache`` per layer)."""

    config_class = TransformerConfig

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
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

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def init_state(self, batch_size: int, device=None) -> tuple[KVCache, ...]:
        """An empty KV cache per layer: k, v (B, NH, 0, head_dim)."""
        w = self.lm_head.weight
        device = device if device is not None else w.device
        shape = (batch_size, self.config.num_heads, 0, self.config.head_dim)
        return tuple(KVCache(torch.zeros(shape, device=device, dtype=w.dtype), torch.zeros(shape, device=device,
                                                                                             dtype=w.dtype))
                     for _ in self.blocks)


def sized_transformer_config(target_params: int, vocab_size: int, num_layers: int = 4, head_dim: int = 32,
                             **kw) -> TransformerConfig:
    """A TransformerConfig with heads of ``head_dim`` whose parameter count is closest to target.

    The width E is a multiple of ``head_dim`` (num_heads = E / head_dim); ``ffn_dim`` follows E.
    """
    def make(w: int) -> TransformerConfig:
        return TransformerConfig(vocab_size=vocab_size, embedding_dim=w, num_layers=num_layers,
                                 num_heads=w // head_dim, **kw)

    width = closest_width(lambda w: make(w).num_params(), target_params, head_dim)
    return make(width)


__all__ = ["TransformerConfig", "TransformerLM", "KVCache", "sized_transformer_config", "rope_cos_sin", "apply_rope"]
