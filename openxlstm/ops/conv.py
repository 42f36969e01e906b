"""Causal depthwise 1-D convolution over time that can carry its window as state."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    state: Optional[torch.Tensor] = None,
    *,
    return_state: bool = False,
):
    """y_t = bias + sum_j weight[:, j] * x_{t-K+1+j} per channel, with x_{<0} taken from ``state`` (or 0).

    Args:
        x: (B, S, F) input.
        weight: (F, K) one kernel per channel; bias: (F,) or None.
        state: (B, K-1, F) the last K-1 inputs before x (zeros when None).
        return_state: also return the new window (B, K-1, F), the last K-1 inputs of [state, x].

    Returns y (B, S, F) (and the new state). Never modifies its arguments.
    """
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must have shape (B, S, F), got {tuple(x.shape)}")
    B, S, Fdim = x.shape
    if weight.dim() != 2 or weight.shape[0] != Fdim:
        raise ValueError(f"causal_conv1d: weight must have shape (F, K) = ({Fdim}, K), got {tuple(weight.shape)}")
    K = weight.shape[1]
    if state is None:
        state = x.new_zeros(B, K - 1, Fdim)
    elif tuple(state.shape) != (B, K - 1, Fdim):
        raise ValueError(f"causal_conv1d: state must have shape (B, K-1, F) = {(B, K - 1, Fdim)}, got {tuple(state.shape)}")
    xs = torch.cat([state.to(x.dtype), x], dim=1)  # (B, K-1+S, F)
    y = F.conv1d(xs.transpose(1, 2), weight.to(x.dtype)[:, None, :], None if bias is None else bias.to(x.dtype), groups=Fdim)
    y = y.transpose(1, 2)  # (B, S, F)
    if not return_state:
        return y
    return y, xs[:, xs.shape[1] - (K - 1) :].clone()


__all__ = ["causal_conv1d"]
