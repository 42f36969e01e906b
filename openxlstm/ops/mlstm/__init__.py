"""mLSTM: matrix memory with exponential gating. One function, several exact backends.

``recurrent.py`` (the specification, and the decode step), ``parallel.py`` (quadratic) and
``chunkwise.py`` (linear, for training) are plain PyTorch and run anywhere in any float dtype; Triton
kernels for CUDA live beside them. See ``common.py`` for the conventions all of them share.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..backends import MLSTM_BACKENDS, resolve_backend, state_dtype
from ..varlen import doc_starts
from .chunkwise import mlstm_chunkwise
from .common import (M_FLOOR, attach_state_gradient, check_inputs, initial_state, mLSTMState, state_stabilizer,
                     state_with_m_gradient)
from .parallel import mlstm_parallel
from .recurrent import mlstm_recurrent, mlstm_step, mlstm_step_inference

BACKENDS = MLSTM_BACKENDS
CHUNKWISE_DEFAULT = 64  # chunk of the PyTorch chunkwise form (the Triton kernels default to 256)


def mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    *,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    eps: float = 1e-6,
    return_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """The mLSTM cell over a whole sequence.

    Args:
        q, k: (B, NH, S, d_qk) queries and keys (the 1/sqrt(d_qk) scale is applied inside).
        v: (B, NH, S, d_v) values.
        i, f: (B, NH, S) input- and forget-gate pre-activations (input gate exponential, forget gate sigmoid;
            f = -inf is a hard reset, exactly a fresh start).
        state: optional (C (B, NH, d_qk, d_v), n (B, NH, d_qk), m (B, NH)) to continue a sequence.
        backend: "auto", "recurrent", "parallel", "chunkwise" or "triton" (CUDA).
        chunk_size: chunk length L of the chunkwise backends (default: the backend's own, 64 for "chunkwise"
            and 256 for "triton"); any S >= 1 is accepted and the result does not depend on it beyond rounding.
        eps: added to the normalizer's denominator.
        return_state: also return the final state.
        cu_seqlens: (D+1,) int tensor of packed documents over the B*S tokens (``openxlstm.ops.varlen``):
            every document starts from zeros except each row's first, which starts from ``state``; the
            returned state is the last document's.

    Returns:
        h (B, NH, S, d_v) in the dtype of v, or (h, mLSTMState) with states in float32 (float64 inputs: float64).
        Inputs and the caller's state are never modified. Gradients of the returned state are those of its
        stored values, m included (see ``common.py``).
    """
    B, NH, S, dqk, dv = check_inputs(q, k, v, i, f, state)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"mlstm: chunk_size must be a positive int or None, got {chunk_size!r}")
    starts = doc_starts(cu_seqlens, B, S, "mlstm", q.device)
    name = resolve_backend("mlstm", backend, q.device)
    sdt = state_dtype(q.dtype)
    if state is not None:
        state = state_with_m_gradient(tuple(t.to(device=q.device, dtype=sdt) for t in state))
    h, final = _cell(q, k, v, i, f, state, name, chunk_size, eps, starts, cu_seqlens)
    if not return_state:
        return h
    if torch.is_grad_enabled() and any(t.requires_grad for t in (i, f, *(state or ()))):
        m0 = None if state is None else state[2]
        final = attach_state_gradient(final, state_stabilizer(i.to(sdt), F.logsigmoid(f.to(sdt)), m0, starts))
    return h, final


def _cell(q, k, v, i, f, state, name, chunk_size, eps, starts, cu_seqlens) -> tuple[torch.Tensor, mLSTMState]:
    """The backend ``name`` with m a constant: h in v's dtype and the final state."""
    if name == "triton":
        from .triton import mlstm_triton

        h, final = mlstm_triton(q, k, v, i, f, state, chunk_size=chunk_size, eps=eps, cu_seqlens=cu_seqlens)
        return h.to(v.dtype), mLSTMState(*final)
    B, NH, _, dqk = q.shape
    st = initial_state(state, B, NH, dqk, v.shape[-1], state_dtype(q.dtype), q.device)
    if name == "recurrent":
        h, final = mlstm_recurrent(q, k, v, i, f, st, eps=eps, starts=starts)
    elif name == "parallel":
        h, final = mlstm_parallel(q, k, v, i, f, st, eps=eps, starts=starts)
    else:
        h, final = mlstm_chunkwise(q, k, v, i, f, st, chunk_size=chunk_size or CHUNKWISE_DEFAULT, eps=eps,
                                   starts=starts)
    return h.to(v.dtype), mLSTMState(*final)


def mlstm_forward_saving(q, k, v, i, f, state=None, *, backend: str = "auto", chunk_size: Optional[int] = None,
                         eps: float = 1e-6, cu_seqlens: Optional[torch.Tensor] = None):
    """The cell without autograd, keeping what ``mlstm_backward`` needs: (h, final mLSTMState, saved).

    For the Triton backend ``saved`` holds h in float32 and per-token statistics (the chunk states are
    recomputed by the backward); for the PyTorch backends it is None: their backward runs the forward again
    under autograd. Used by layers that recompute their cheap parts instead of keeping them (layers/mlstm.py).
    """
    check_inputs(q, k, v, i, f, state)
    name = resolve_backend("mlstm", backend, q.device)
    with torch.no_grad():
        if name == "triton" and q.dtype != torch.float64:
            from .triton import mlstm_triton_forward

            C0, n0, m0 = (None, None, None) if state is None else state
            h, h32, C, n, m, stats = mlstm_triton_forward(q, k, v, i, f, C0, n0, m0, chunk_size, eps, cu_seqlens)
            return h, mLSTMState(C, n, m), (h32, stats)
        h, final = mlstm(q, k, v, i, f, state, backend=name, chunk_size=chunk_size, eps=eps, return_state=True,
                         cu_seqlens=cu_seqlens)
        return h, final, None


def mlstm_backward(q, k, v, i, f, state, saved, dh, dC=None, dn=None, *, backend: str = "auto",
                   chunk_size: Optional[int] = None, eps: float = 1e-6, cu_seqlens: Optional[torch.Tensor] = None):
    """Gradients (dq, dk, dv, di, df, dC0, dn0) of ``mlstm_forward_saving``'s outputs h, C, n given dh, dC,
    dn (dC, dn may be None; dC0, dn0 are None without a state). m is a constant here: the gradient of the
    returned m, and of C, n through m, is added by the caller (``state_stabilizer``)."""
    if saved is not None:
        from .triton import mlstm_triton_backward

        C0, n0, m0 = (None, None, None) if state is None else state
        h32, stats = saved
        return mlstm_triton_backward(q, k, v, i, f, C0, n0, m0, h32, stats, dh, dC, dn, chunk_size, eps, cu_seqlens)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v, i, f)]
        st = None if state is None else (state[0].detach().requires_grad_(), state[1].detach().requires_grad_(),
                                          state[2].detach())
        starts = doc_starts(cu_seqlens, q.shape[0], q.shape[2], "mlstm", q.device)
        h, (C, n, _) = _cell(*leaves, st, resolve_backend("mlstm", backend, q.device), chunk_size, eps, starts, cu_seqlens)
        outs, grads = [h], [dh]
        for t, g in ((C, dC), (n, dn)):
            if g is not None:
                outs.append(t)
                grads.append(g)
        inputs = leaves + ([] if st is None else list(st[:2]))
        got = torch.autograd.grad(outs, inputs, grads, allow_unused=True)
    got = [torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs)]
    return (*got[:5], *(got[5:] if st is not None else (None, None)))


def mlstm_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    *,
    backend: str = "auto",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, mLSTMState]:
    """One generation step for a batch of single tokens: q, k (B, NH, d_qk), v (B, NH, d_v), i, f (B, NH).

    Returns h (B, NH, d_v) in the dtype of v and the new state. "auto" uses the fused Triton step on CUDA.
    """
    if q.dim() != 3:
        raise ValueError(f"mlstm_decode: q must have shape (B, NH, d_qk), got {tuple(q.shape)}")
    B, NH, dqk = q.shape
    check_inputs(q[:, :, None], k[:, :, None], v[:, :, None], i[:, :, None], f[:, :, None], state)
    name = resolve_backend("mlstm", backend, q.device)
    if name == "triton":
        from .triton_step import mlstm_step_triton

        h, new = mlstm_step_triton(q, k, v, i, f, state, eps=eps)
    else:
        st = initial_state(state, B, NH, dqk, v.shape[-1], state_dtype(q.dtype), q.device)
        step = mlstm_step if torch.is_grad_enabled() else mlstm_step_inference
        h, new = step(q, k, v, i, f, st, eps=eps)
    return h.to(v.dtype), mLSTMState(*new)


__all__ = [
    "mlstm_decode",
    "mlstm_forward_saving",
    "mlstm_backward",
    "BACKENDS",
    "M_FLOOR",
    "mLSTMState",
    "mlstm",
    "mlstm_chunkwise",
    "mlstm_parallel",
    "mlstm_recurrent",
    "mlstm_step",
]
