"""The gated feed-forward network of the sLSTM block: Linear(E -> 2F), act(g) * u, Linear(F -> E)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import xLSTMConfig
from .common import small_init_, wang_init_


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


# every activation of the reference's FeedForwardConfig.act_fn ("swish" is silu, "relu^2" relu2)
_ACTS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "relu2": _relu2, "sigmoid": torch.sigmoid, "selu": F.selu}


class GatedFFN(nn.Module):
    def __init__(self, config: xLSTMConfig):
        super().__init__()
        E, Fd = config.embedding_dim, config.ffn_dim
        self.config = config
        self.act = _ACTS[config.ffn_activation]
        self.proj_up = nn.Linear(E, 2 * Fd, bias=config.bias)
        self.proj_down = nn.Linear(Fd, E, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self):
        small_init_(self.proj_up.weight, self.config.embedding_dim)
        wang_init_(self.proj_down.weight, self.config.embedding_dim, self.config.num_blocks)
        for lin in (self.proj_up, self.proj_down):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, S, E) -> (B, S, E)."""
        g, u = self.proj_up(x).chunk(2, dim=-1)  # (B, S, F) each
        return self.dropout(self.proj_down(self.act(g) * u))


__all__ = ["GatedFFN"]
