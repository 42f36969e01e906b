"""The sLSTM layer of the sLSTM block: conv on the i/f path, headwise gate projections, sLSTM cell, head norm."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import xLSTMConfig
from ..ops.conv import causal_conv1d_step
from ..ops.slstm import slstm
from ..ops.slstm.recurrent import slstm_decode
from ..ops.backends import Backends
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

    def init_state(self, batch_size: int, device=None) -> sLSTMLayerState:
        """The state of an empty sequence: zeros; h, c, n, m (B, E) in float32, conv (B, K-1, E) in the
        weights' dtype."""
        E = self.config.embedding_dim
        device = device if device is not None else self.bias.device
        conv = (None if self.conv is None else
                torch.zeros(batch_size, self.conv.kernel_size - 1, E, device=device, dtype=self.bias.dtype))
        return sLSTMLayerState(conv, *(torch.zeros(batch_size, E, device=device, dtype=torch.float32) for _ in range(4)))

    def _preact(self, x: torch.Tensor, conv_state, cu_seqlens=None, step: bool = False):
        """x (B, S, E) -> (gate pre-activations (B, S, 4E) in the order [i | f | z | o], new conv state);
        ``step``: one token per row, without autograd (the conv's step)."""
        if self.conv is not None:
            if step:
                x_c, conv_state = causal_conv1d_step(x, self.conv.weight, self.conv.bias, conv_state)
            else:
                x_c, conv_state = self.conv(x, conv_state, cu_seqlens)
            x_c = F.silu(x_c)
        else:
            x_c = x
        return torch.cat([self.igate(x_c), self.fgate(x_c), self.zgate(x), self.ogate(x)], dim=-1), conv_state

    def forward(self, x: torch.Tensor, state: Optional[sLSTMLayerState] = None, cu_seqlens: Optional[torch.Tensor] = None,
                *, backends: Backends = Backends()) -> tuple[torch.Tensor, sLSTMLayerState]:
        """x: (B, S, E) (normalized) -> (y (B, S, E), new sLSTMLayerState); cu_seqlens: packed documents
        (``openxlstm.ops.varlen``) for the conv and the cell."""
        B, S, E = x.shape
        pre, conv_state = self._preact(x, None if state is None else state.conv, cu_seqlens)
        cell_state = None if state is None else (state.h, state.c, state.n, state.m)
        h, cell = slstm(pre, self.recurrent, self.bias, cell_state, forget_gate=self.config.slstm_forget_gate,
                        backend=backends.slstm, return_state=True, cu_seqlens=cu_seqlens)
        y = self.norm(h.view(B, S, self.num_heads, self.head_dim))
        return self.dropout(y), sLSTMLayerState(conv_state, *cell)

    def step(self, x: torch.Tensor, state: Optional[sLSTMLayerState], *, backends: Backends = Backends()
             ) -> tuple[torch.Tensor, sLSTMLayerState]:
        """One token per sequence: x (B, 1, E) -> (y (B, 1, E), new state), the cell's step in plain PyTorch
        (same maths as every backend, a fraction of the ops of a sequence kernel)."""
        B = x.shape[0]
        pre, conv_state = self._preact(x, None if state is None else state.conv, step=not torch.is_grad_enabled())
        cell_state = None if state is None else (state.h, state.c, state.n, state.m)
        h, cell = slstm_decode(pre[:, 0], self.recurrent, self.bias, cell_state,
                               forget_gate=self.config.slstm_forget_gate)
        y = self.norm(h.view(B, 1, self.num_heads, self.head_dim))
        return self.dropout(y), sLSTMLayerState(conv_state, *cell)


__all__ = ["sLSTMLayer", "sLSTMLayerState", "forget_bias_init"]
