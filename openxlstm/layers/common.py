"""Small building blocks shared by the mLSTM and sLSTM layers, and the reference initializers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..ops.blockdiag import block_diagonal_linear
from ..ops.conv import causal_conv1d


def small_init_(w: torch.Tensor, dim: int) -> torch.Tensor:
    """N(0, 2 / (5 dim)) ("small init", Nguyen & Salazar 2019): embeddings and input projections."""
    return nn.init.normal_(w, mean=0.0, std=math.sqrt(2.0 / (5.0 * dim)))


def wang_init_(w: torch.Tensor, dim: int, num_blocks: int) -> torch.Tensor:
    """N(0, (2 / (num_blocks sqrt(dim)))^2): output projections of residual branches."""
    return nn.init.normal_(w, mean=0.0, std=2.0 / num_blocks / math.sqrt(dim))


def run_block(block: nn.Module, checkpointing: bool, *args):
    """``block(*args)``, or with activation checkpointing (only the block's inputs are kept for backward and
    its forward runs again during backward) when ``checkpointing`` is set, the block trains and a gradient
    is being recorded."""
    if checkpointing and block.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class _AffineNorm(nn.Module):
    """A normalization's per-unit weight (ones) and optional bias (zeros) over ``dim`` units."""

    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def reset_parameters(self):
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        y = y * self.weight
        return y if self.bias is None else y + self.bias


class LayerNorm(_AffineNorm):
    """LayerNorm over the last dimension with a weight and an optional bias (the reference has no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False):
        super().__init__(dim, bias)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class RMSNorm(_AffineNorm):
    """x / rms(x) over the last dimension (reduced in float32 when ``force_float32``), then weight (+ bias).
    Used by the Transformer baseline and xLSTM-7B."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False, force_float32: bool = True):
        super().__init__(dim, bias)
        self.eps, self.force_float32 = eps, force_float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._affine(F.rms_norm(x.float() if self.force_float32 else x, (x.shape[-1],), eps=self.eps).to(x.dtype))


class MultiHeadNorm(_AffineNorm):
    """Normalize each head separately (GroupNorm with one group per head: LayerNorm over d without affine)
    and scale by a per-unit weight (+ bias); reduced in float32 when ``force_float32``.

    Input (..., NH, d) -> output (..., NH * d).
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5, bias: bool = False,
                 force_float32: bool = False):
        super().__init__(num_heads * head_dim, bias)
        self.num_heads, self.head_dim, self.eps, self.force_float32 = num_heads, head_dim, eps, force_float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float() if self.force_float32 else x, (self.head_dim,), eps=self.eps).to(x.dtype)
        return self._affine(y.flatten(-2))


class BlockDiagonalLinear(nn.Module):
    """A linear map with a block-diagonal weight: the input is split into ``num_blocks`` equal blocks, each
    mapped by its own (block x block) matrix. weight: (num_blocks, out_block, in_block), as the reference."""

    def __init__(self, features: int, num_blocks: int, bias: bool = False):
        super().__init__()
        if features % num_blocks:
            raise ValueError(f"BlockDiagonalLinear: features={features} not divisible by num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        size = features // num_blocks
        self.weight = nn.Parameter(torch.empty(num_blocks, size, size))
        self.bias = nn.Parameter(torch.zeros(features)) if bias else None
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / (5.0 * size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_diagonal_linear(x, self.weight, self.bias)


class CausalConv(nn.Module):
    """Causal depthwise conv over time with bias; carries the last K-1 inputs as its state."""

    def __init__(self, features: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(features, kernel_size))
        self.bias = nn.Parameter(torch.empty(features))
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.kernel_size)  # torch.nn.Conv1d's default for a depthwise conv
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, state=None, cu_seqlens=None):
        """x (B, S, F), state (B, K-1, F) or None -> (y (B, S, F), new state); cu_seqlens: packed documents."""
        return causal_conv1d(x, self.weight, self.bias, state, return_state=True, cu_seqlens=cu_seqlens)


__all__ = ["run_block", "LayerNorm", "MultiHeadNorm", "BlockDiagonalLinear", "CausalConv", "small_init_", "wang_init_"]
