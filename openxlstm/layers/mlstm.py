"""The mLSTM layer ("pre up-projection" block body, spec §2.2): up-project, conv, q/k/v, mLSTM, gate, down."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import xLSTMConfig
from ..ops.mlstm import mlstm, mlstm_decode
from .backends import Backends
from .common import BlockDiagonalLinear, CausalConv, MultiHeadNorm, small_init_, wang_init_


class mLSTMLayerState(NamedTuple):
    """conv: (B, K-1, I) last inputs of the conv (None without conv); C, n, m: the cell state."""

    conv: Optional[torch.Tensor]
    C: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor


class mLSTMLayer(nn.Module):
    def __init__(self, config: xLSTMConfig):
        super().__init__()
        E, I, NH = config.embedding_dim, config.mlstm_inner_dim, config.mlstm_num_heads
        self.config = config
        self.inner_dim, self.num_heads, self.head_dim = I, NH, I // NH
        self.proj_up = nn.Linear(E, 2 * I, bias=config.bias)
        self.conv = CausalConv(I, config.mlstm_conv_kernel) if config.mlstm_conv_kernel > 0 else None
        nb = I // config.mlstm_qkv_blocksize
        self.q_proj = BlockDiagonalLinear(I, nb, bias=config.bias)
        self.k_proj = BlockDiagonalLinear(I, nb, bias=config.bias)
        self.v_proj = BlockDiagonalLinear(I, nb, bias=config.bias)
        self.igate = nn.Linear(3 * I, NH)
        self.fgate = nn.Linear(3 * I, NH)
        self.outnorm = MultiHeadNorm(NH, I // NH, eps=config.norm_eps)
        self.skip = nn.Parameter(torch.ones(I))
        self.proj_down = nn.Linear(I, E, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self):
        """The reference initialization (spec §2.4)."""
        E, L = self.config.embedding_dim, self.config.num_blocks
        small_init_(self.proj_up.weight, E)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            small_init_(proj.weight, E)
        wang_init_(self.proj_down.weight, E, L)
        for lin in (self.proj_up, self.q_proj, self.k_proj, self.v_proj, self.proj_down):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.conv is not None:
            self.conv.reset_parameters()
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, mean=0.0, std=0.1)
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        nn.init.ones_(self.skip)
        self.outnorm.reset_parameters()

    def forward(self, x: torch.Tensor, state: Optional[mLSTMLayerState] = None, backends: Backends = Backends()):
        """x: (B, S, E) (normalized) -> (y (B, S, E), new mLSTMLayerState)."""
        B, S, _ = x.shape
        NH, DH = self.num_heads, self.head_dim
        x_m, z = self.proj_up(x).chunk(2, dim=-1)  # (B, S, I) each
        conv_state = None
        if self.conv is not None:
            x_c, conv_state = self.conv(x_m, None if state is None else state.conv)
            x_c = F.silu(x_c)
        else:
            x_c = x_m
        q, k, v = self.q_proj(x_c), self.k_proj(x_c), self.v_proj(x_m)  # (B, S, I)
        qkv = torch.cat([q, k, v], dim=-1)
        i, f = self.igate(qkv), self.fgate(qkv)  # (B, S, NH)

        def heads(t):  # (B, S, I) -> (B, NH, S, DH)
            return t.view(B, S, NH, DH).transpose(1, 2)

        cell_state = None if state is None else (state.C, state.n, state.m)
        if S == 1 and backends.mlstm in ("auto", "recurrent", "triton"):  # decode: the fused step
            h, cell = mlstm_decode(q.view(B, NH, DH), k.view(B, NH, DH), v.view(B, NH, DH),
                                   i.view(B, NH), f.view(B, NH), cell_state, backend=backends.mlstm)
            h = h[:, None]  # (B, 1, NH, DH)
        else:
            h, cell = mlstm(heads(q), heads(k), heads(v), i.transpose(1, 2), f.transpose(1, 2), cell_state,
                            backend=backends.mlstm, chunk_size=backends.chunk_size, return_state=True)
            h = h.transpose(1, 2)  # (B, S, NH, DH)
        h = self.outnorm(h)  # (B, S, I)
        y = self.proj_down((h + self.skip * x_c) * F.silu(z))
        return self.dropout(y), mLSTMLayerState(conv_state, *cell)


__all__ = ["mLSTMLayer", "mLSTMLayerState"]
