"""Packed documents: ``cu_seqlens`` (flash-linear-attention's convention) turned into per-token document
starts on the device, without reading anything on the host.

``cu_seqlens`` (D+1,) int32 or int64: the cumulative lengths of D documents laid end to end over the B*S tokens
of a (B, S) input read row by row: ``cu_seqlens[0] = 0``, ``cu_seqlens[-1] = B*S``, non-decreasing (an empty
document changes nothing). Document j is the tokens ``cu_seqlens[j] .. cu_seqlens[j+1] - 1``. With B = 1 this
is flash-linear-attention's packed batch of one row; with B > 1 every row start (a multiple of S) must be a
boundary, so each row is a packed row of its own, and the result equals that of the B*S tokens in one row.

Every document runs exactly as if it ran alone from the initial state (zeros), except the first document of
each row, which starts from the state passed in (zeros when none); a returned state is the state after the
last token of each row, i.e. the last document's. Recurrent cells reset their state at every other document
start, causal convolutions do not look across a boundary, attention is block-diagonal.

The values are checked on the device (``torch._assert_async``: an error on the CPU, a device assertion on a GPU).
"""

from __future__ import annotations

from typing import Optional

import torch


def check_cu_seqlens(name: str, cu_seqlens, B: int, S: int, device: torch.device) -> None:
    """Type, shape and device errors at once; the values asserted on the device (no host read)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise TypeError(f"{name}: cu_seqlens must be an int32 or int64 tensor (D+1,), got {got}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name}: cu_seqlens must have shape (D+1,) with D >= 1 documents, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name}: cu_seqlens is on {cu_seqlens.device}, the inputs on {device}")
    ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == B * S) & (cu_seqlens.diff() >= 0).all()
    torch._assert_async(ok, f"{name}: cu_seqlens must start at 0, end at B*S = {B * S} and never decrease")


def doc_starts(cu_seqlens: Optional[torch.Tensor], B: int, S: int, name: str = "cu_seqlens",
               device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """(B, S) bool: True at the first token of every document that starts from the initial state, i.e. every
    document start except the first token of a row (where the passed state, or zeros, applies). None for None.

    With B > 1, a row start missing from ``cu_seqlens`` (a document running from one row into the next) fails
    a device assertion.
    """
    if cu_seqlens is None:
        return None
    device = cu_seqlens.device if device is None else device
    check_cu_seqlens(name, cu_seqlens, B, S, device)
    flat = torch.zeros(B * S + 1, dtype=torch.bool, device=device)
    flat[cu_seqlens.clamp(0, B * S).long()] = True  # (B*S + 1,): the end marker lands in the extra slot
    starts = flat[:B * S].view(B, S)
    if B > 1:
        torch._assert_async(starts[:, 0].all(), f"{name}: with B > 1 rows every row start (a multiple of "
                                                f"S = {S}) must be a document boundary")
    return torch.cat([torch.zeros_like(starts[:, :1]), starts[:, 1:]], dim=1)


def last_start(starts: torch.Tensor) -> torch.Tensor:
    """(B, S) -> (B, S) int64: the index of the latest document start at or before each token, -1 in a row's
    first document (before any start)."""
    S = starts.shape[-1]
    idx = torch.arange(S, device=starts.device).expand_as(starts)
    return torch.where(starts, idx, -1).cummax(-1).values


__all__ = ["check_cu_seqlens", "doc_starts", "last_start"]
