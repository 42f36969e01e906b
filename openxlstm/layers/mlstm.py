"""The mLSTM layer ("pre up-projection" block body): up-project, conv, q/k/v, mLSTM, gate, down-project.

    [x_m | z] = proj_up(x)                                   (B, S, 2I)
    a = mlstm_layer_core([x_m | z])                          (B, S, I), see ``openxlstm.ops.mlstm.layer_op``
    y = dropout(proj_down(a))                                (B, S, E)

``forward`` runs a sequence (packed documents with ``cu_seqlens``), ``step`` one token per sequence, and
``init_state`` gives the state of an empty sequence: the conv window (B, K-1, I) and the cell's C, n, m.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import xLSTMConfig
from ..ops.backends import Backends
from ..ops.mlstm.layer_op import mLSTMCoreWeights, mLSTMLayerState, mlstm_layer_core, mlstm_layer_step
from .common import BlockDiagonalLinear, CausalConv, MultiHeadNorm, small_init_, wang_init_


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
        """The reference initialization: small init for the input projections, wang init for proj_down, gate
        weights 0, input-gate bias N(0, 0.1), forget-gate bias linspace(3, 6) over heads, skip and norm 1."""
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

    def core_weights(self) -> mLSTMCoreWeights:
        """The weights used between proj_up and proj_down, for the core op."""
        conv = self.conv
        return mLSTMCoreWeights(
            None if conv is None else conv.weight, None if conv is None else conv.bias,
            self.q_proj.weight, self.q_proj.bias, self.k_proj.weight, self.k_proj.bias,
            self.v_proj.weight, self.v_proj.bias, self.igate.weight, self.igate.bias, self.fgate.weight,
            self.fgate.bias, self.outnorm.weight, self.outnorm.bias, self.skip)

    def init_state(self, batch_size: int, device=None) -> mLSTMLayerState:
        """The state of an empty sequence: zeros (float32), conv (B, K-1, I) in the weights' dtype."""
        B, NH, d = batch_size, self.num_heads, self.head_dim
        device = device if device is not None else self.proj_up.weight.device
        conv = (None if self.conv is None else
                torch.zeros(B, self.conv.kernel_size - 1, self.inner_dim, device=device, dtype=self.proj_up.weight.dtype))
        f32 = dict(device=device, dtype=torch.float32)
        return mLSTMLayerState(conv, torch.zeros(B, NH, d, d, **f32), torch.zeros(B, NH, d, **f32),
                               torch.zeros(B, NH, **f32))

    def forward(self, x: torch.Tensor, state: Optional[mLSTMLayerState] = None, cu_seqlens: Optional[torch.Tensor] = None,
                *, backends: Backends = Backends()) -> tuple[torch.Tensor, mLSTMLayerState]:
        """x: (B, S, E) (normalized) -> (y (B, S, E), new mLSTMLayerState); cu_seqlens: packed documents
        (``openxlstm.ops.varlen``) for the conv and the cell."""
        a, new_state = mlstm_layer_core(self.proj_up(x), self.core_weights(), state, num_heads=self.num_heads,
                                        norm_eps=self.outnorm.eps, backend=backends.mlstm,
                                        chunk_size=backends.chunk_size, cu_seqlens=cu_seqlens)
        return self.dropout(self.proj_down(a)), new_state

    def step(self, x: torch.Tensor, state: Optional[mLSTMLayerState], *, backends: Backends = Backends()
             ) -> tuple[torch.Tensor, mLSTMLayerState]:
        """One token per sequence: x (B, 1, E) -> (y (B, 1, E), new state), with the cell's fused step."""
        a, new_state = mlstm_layer_step(self.proj_up(x), self.core_weights(), state, num_heads=self.num_heads,
                                        norm_eps=self.outnorm.eps, backend=backends.mlstm)
        return self.dropout(self.proj_down(a)), new_state


__all__ = ["mLSTMLayer", "mLSTMLayerState"]
