"""A linear map whose weight is block-diagonal (the headwise projections of xLSTM's layers).

x (..., nb * bs_in) is split into nb blocks, each mapped by its own (bs_out, bs_in) matrix; the weight is
stored as (nb, bs_out, bs_in), as the reference stores it. The autograd Function keeps only x and the weight
for backward (``torch.einsum`` would keep permuted copies of both).
"""

from __future__ import annotations

from typing import Optional

import torch


def block_diagonal_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ blockdiag(weight)^T (+ bias): x (..., nb * bs_in), weight (nb, bs_out, bs_in) -> (..., nb * bs_out).
    Under autocast both are cast to the autocast dtype; otherwise the weight takes x's dtype."""
    if not torch.is_grad_enabled():  # inference: the product alone, without the autograd Function around it
        if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            weight = weight.to(x.dtype)
        y = _product(x, weight)
    else:
        y = _BlockDiagonal.apply(x, weight)
    return y if bias is None else y + bias


def _product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., nb * bs_in) times blockdiag(weight)^T -> (..., nb * bs_out)."""
    nb = weight.shape[0]
    return torch.einsum("...hi,hoi->...ho", x.reshape(*x.shape[:-1], nb, -1), weight).reshape(*x.shape[:-1], -1)


class _BlockDiagonal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dt), weight.to(dt)
        elif weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        ctx.save_for_backward(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            return _product(x, weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        nb = weight.shape[0]
        dy = dy.to(x.dtype).contiguous().view(*dy.shape[:-1], nb, -1)  # (..., nb, bs_out)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.einsum("...ho,hoi->...hi", dy, weight).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            dw = torch.einsum("...ho,...hi->hoi", dy, x.reshape(*x.shape[:-1], nb, -1))
        return dx, dw


__all__ = ["block_diagonal_linear"]
