"""Causal depthwise 1-D convolution over time that can carry its window as state."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .varlen import doc_starts, last_start


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    state: Optional[torch.Tensor] = None,
    *,
    return_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """y_t = bias + sum_j weight[:, j] * x_{t-K+1+j} per channel, with x_{<0} taken from ``state`` (or 0).

    Args:
        x: (B, S, F) input.
        weight: (F, K) one kernel per channel; bias: (F,) or None.
        state: (B, K-1, F) the last K-1 inputs before x (zeros when None).
        return_state: also return the new window (B, K-1, F), the last K-1 inputs of [state, x].
        cu_seqlens: (D+1,) packed documents over the B*S tokens (``openxlstm.ops.varlen``): the window of a
            token reaches back to its document's start only (zeros before it, as for a document run alone;
            a row's first document sees ``state``), and the returned window is the last document's.

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
    w = weight.to(x.dtype)
    starts = doc_starts(cu_seqlens, B, S, "causal_conv1d", x.device)
    if starts is None:
        y = F.conv1d(xs.transpose(1, 2), w[:, None, :], None if bias is None else bias.to(x.dtype), groups=Fdim)
        y = y.transpose(1, 2)  # (B, S, F)
    else:
        # the tap of lag j (input x_{t-j}) counts only while t - j lies in t's document
        begin = last_start(starts)  # (B, S) the token's document start, -1 in a row's first document
        reach = torch.where(begin >= 0, torch.arange(S, device=x.device) - begin, S + K)  # (B, S) largest lag
        y = sum(xs[:, K - 1 - j:K - 1 - j + S] * w[:, K - 1 - j] * (reach >= j)[..., None].to(x.dtype)
                for j in range(K))
        if bias is not None:
            y = y + bias.to(x.dtype)
    if not return_state:
        return y
    window = xs[:, xs.shape[1] - (K - 1):]  # (B, K-1, F): inputs S-K+1 .. S-1 (negative: the state)
    if starts is not None:
        first = last_start(starts)[:, -1:]  # (B, 1) start of the last document, -1: the row's first
        idx = torch.arange(S - (K - 1), S, device=x.device)
        window = window * ((first < 0) | (idx >= first))[..., None].to(x.dtype)
    return y, window.clone()


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       state: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per sequence (generation, no autograd needed): x (B, 1, F), state (B, K-1, F) or None ->
    (y (B, 1, F), new window (B, K-1, F)), equal to ``causal_conv1d(x, ..., return_state=True)``."""
    B, _, Fdim = x.shape
    K = weight.shape[1]
    if state is None:
        state = x.new_zeros(B, K - 1, Fdim)
    window = torch.cat([state.to(x.dtype), x], dim=1)  # (B, K, F)
    y = F.conv1d(window.transpose(1, 2), weight.to(x.dtype)[:, None, :], None if bias is None else bias.to(x.dtype),
                 groups=Fdim)  # (B, F, 1)
    return y.transpose(1, 2), window[:, 1:]


__all__ = ["causal_conv1d", "causal_conv1d_step"]
