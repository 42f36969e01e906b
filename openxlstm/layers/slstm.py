"""The sLSTM layer (spec §2.3): conv on the i/f path, headwise gate projections, sLSTM cell, head norm."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import xLSTMConfig
from ..ops.slstm import slstm
from ..ops.slstm.recurrent import slstm_decode
from .backends import Backends
from .common import BlockDiagonalLinear, CausalConv, MultiHeadNorm, small_init_


class sLSTMLayerState(NamedTuple):
    """conv: (B, K-1, E) last conv inputs (None without conv); h, c, n, m: the cell state, each (B, E)."""

    conv: Optional[torch.Tensor]
    h: torch.Tensor
    c: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor


def forget_bias_init(config: xLSTMConfig, head_dim: int, block_idx: int) -> torch.Tensor:
    """Forget-gate bias of one head (head_dim,) for the configured scheme.

    "powerlaw_blockdependent" (reference default): -(-5 + 12 * (j / (d-1)) ** (0.3 + 1.3 * r)), r = the
    block's relative depth block_idx / (num_blocks - 1); "small_init": linspace(3, 6); "zeros".
    """
    if config.slstm_bias_init == "zeros":
        return torch.zeros(head_dim)
    if config.slstm_bias_init == "small_init":
        return torch.linspace(3.0, 6.0, head_dim)
    ratio = block_idx / (config.num_blocks - 1) if config.num_blocks > 1 else 0.0
    pos = torch.arange(head_dim) / max(head_dim - 1, 1)
    return -(-5.0 + 12.0 * pos ** (0.3 + 1.3 * ratio))


class sLSTMLayer(nn.Module):
    def __init__(self, config: xLSTMConfig, block_idx: int):
        super().__init__()
        E, NH = config.embedding_dim, config.slstm_num_heads
        self.config, self.block_idx = config, block_idx
        self.num_heads, self.head_dim = NH, E // NH
        self.conv = CausalConv(E, config.slstm_conv_kernel) if config.slstm_conv_kernel > 0 else None
        self.igate = BlockDiagonalLinear(E, NH)
        self.fgate = BlockDiagonalLinear(E, NH)
        self.zgate = BlockDiagonalLinear(E, NH)
        self.ogate = BlockDiagonalLinear(E, NH)
        self.recurrent = nn.Parameter(torch.zeros(NH, E // NH, 4, E // NH))  # R: (NH, d_in, gate, d_out)
        self.bias = nn.Parameter(torch.zeros(4 * E))  # [i | f | z | o]
        self.norm = MultiHeadNorm(NH, E // NH, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self):
        E = self.config.embedding_dim
        for gate in (self.igate, self.fgate, self.zgate, self.ogate):
            small_init_(gate.weight, E)
        if self.conv is not None:
            self.conv.reset_parameters()
        nn.init.zeros_(self.recurrent)
        with torch.no_grad():
            self.bias.zero_()
            self.bias[E : 2 * E] = forget_bias_init(self.config, self.head_dim, self.block_idx).repeat(self.num_heads)
        self.norm.reset_parameters()

    def forward(self, x: torch.Tensor, state: Optional[sLSTMLayerState] = None, backends: Backends = Backends(),
                cu_seqlens: Optional[torch.Tensor] = None):
        """x: (B, S, E) (normalized) -> (y (B, S, E), new sLSTMLayerState); cu_seqlens: packed documents
        (``openxlstm.ops.packing``) for the conv and the cell.

        A single token without gradient (generation) takes ``slstm_decode``, the cell's step in plain
        PyTorch, whatever ``backends.slstm`` says: same maths, a fraction of the ops of a sequence kernel.
        """
        B, S, E = x.shape
        conv_state = None
        if self.conv is not None:
            x_c, conv_state = self.conv(x, None if state is None else state.conv, cu_seqlens)
            x_c = F.silu(x_c)
        else:
            x_c = x
        pre = torch.cat([self.igate(x_c), self.fgate(x_c), self.zgate(x), self.ogate(x)], dim=-1)  # (B, S, 4E)
        cell_state = None if state is None else (state.h, state.c, state.n, state.m)
        if S == 1 and not torch.is_grad_enabled():  # decode: one plain step, no sequence kernel or autograd Function
            h, cell = slstm_decode(pre[:, 0], self.recurrent, self.bias, cell_state,
                                   forget_gate=self.config.slstm_forget_gate)
            h = h[:, None]  # (B, 1, E)
        else:
            h, cell = slstm(pre, self.recurrent, self.bias, cell_state, forget_gate=self.config.slstm_forget_gate,
                            backend=backends.slstm, return_state=True, cu_seqlens=cu_seqlens)
        y = self.norm(h.view(B, S, self.num_heads, self.head_dim))
        return self.dropout(y), sLSTMLayerState(conv_state, *cell)


__all__ = ["sLSTMLayer", "sLSTMLayerState", "forget_bias_init"]
