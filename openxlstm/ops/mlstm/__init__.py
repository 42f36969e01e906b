"""mLSTM: matrix memory with exponential gating. One function, several exact backends.

``recurrent.py`` (the specification, and the decode step), ``parallel.py`` (quadratic) and
``chunkwise.py`` (linear, for training) are plain PyTorch and run anywhere in any float dtype; Triton
kernels for CUDA live beside them. See ``common.py`` for the conventions all of them share.
"""

from __future__ import annotations

from typing import Optional

import torch

from .chunkwise import mlstm_chunkwise
from .common import M_FLOOR, check_inputs, initial_state, mLSTMState, state_dtype
from .parallel import mlstm_parallel
from .recurrent import mlstm_recurrent, mlstm_step

BACKENDS = ("auto", "recurrent", "parallel", "chunkwise", "triton")


def triton_available(device: torch.device) -> bool:
    """True when the Triton kernels can run on ``device`` (a CUDA device with triton importable)."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to the fastest backend available on ``device``; validate explicit names."""
    if backend not in BACKENDS:
        raise ValueError(f"mlstm: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if triton_available(device) else "chunkwise"
    return backend


def mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    *,
    backend: str = "auto",
    chunk_size: int = 64,
    eps: float = 1e-6,
    return_state: bool = False,
):
    """The mLSTM cell over a whole sequence.

    Args:
        q, k: (B, NH, S, d_qk) queries and keys (the 1/sqrt(d_qk) scale is applied inside).
        v: (B, NH, S, d_v) values.
        i, f: (B, NH, S) input- and forget-gate pre-activations (input gate exponential, forget gate sigmoid).
        state: optional (C (B, NH, d_qk, d_v), n (B, NH, d_qk), m (B, NH)) to continue a sequence.
        backend: "auto", "recurrent", "parallel", "chunkwise" or "triton" (CUDA).
        chunk_size: chunk length L of the chunkwise backends; any S >= 1 is accepted.
        eps: added to the normalizer's denominator.
        return_state: also return the final state.

    Returns:
        h (B, NH, S, d_v) in the dtype of v, or (h, mLSTMState) with states in float32 (float64 inputs: float64).
        Inputs and the caller's state are never modified.
    """
    B, NH, S, dqk, dv = check_inputs(q, k, v, i, f, state)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"mlstm: chunk_size must be a positive int, got {chunk_size!r}")
    name = resolve_backend(backend, q.device)
    if name == "triton":
        from .triton import mlstm_triton

        h, final = mlstm_triton(q, k, v, i, f, state, chunk_size=chunk_size, eps=eps)
    else:
        st = initial_state(state, B, NH, dqk, dv, state_dtype(q.dtype), q.device)
        if name == "recurrent":
            h, final = mlstm_recurrent(q, k, v, i, f, st, eps=eps)
        elif name == "parallel":
            h, final = mlstm_parallel(q, k, v, i, f, st, eps=eps)
        else:
            h, final = mlstm_chunkwise(q, k, v, i, f, st, chunk_size=chunk_size, eps=eps)
    h = h.to(v.dtype)
    return (h, mLSTMState(*final)) if return_state else h


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
    name = resolve_backend(backend, q.device)
    if name == "triton":
        from .triton_step import mlstm_step_triton

        h, new = mlstm_step_triton(q, k, v, i, f, state, eps=eps)
    else:
        st = initial_state(state, B, NH, dqk, v.shape[-1], state_dtype(q.dtype), q.device)
        h, new = mlstm_step(q, k, v, i, f, st, eps=eps)
    return h.to(v.dtype), mLSTMState(*new)


__all__ = [
    "mlstm_decode",
    "BACKENDS",
    "M_FLOOR",
    "mLSTMState",
    "mlstm",
    "mlstm_chunkwise",
    "mlstm_parallel",
    "mlstm_recurrent",
    "mlstm_step",
    "resolve_backend",
    "triton_available",
]
