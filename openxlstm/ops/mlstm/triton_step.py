"""One fused Triton kernel for an mLSTM decode step (one token per sequence, inference only).

Each program owns one (batch, head) and a tile of BV value columns; it streams the state C row-tile by
row-tile (BK rows of d_qk), so the whole state is read once and the new state written once: the step is
memory-bandwidth bound. The normalizer n and the stabilizer m are tiny and recomputed by every program of
a head (the program of the first column tile stores them). Conventions as in ``common.py``: q scaled by
1/sqrt(d_qk), m_t = max(log f_t + m_{t-1}, i_t), output stabilizer max(m_t, M_FLOOR), gate maths in float32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import M_FLOOR, initial_state, mLSTMState
from .recurrent import mlstm_step
from .. import triton_utils
from ..triton_utils import logsigmoid, pow2


@triton.jit
def _mlstm_step_kernel(
    Q, K, V, I, F, C0, N0, M0, H, C1, N1, M1,
    DQK, DV, scale, eps,
    HAS_STATE: tl.constexpr, M_FLOOR: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pv = tl.program_id(1)
    ig = tl.load(I + bh).to(tl.float32)
    logf = logsigmoid(tl.load(F + bh).to(tl.float32))
    if HAS_STATE:
        m_prev = tl.load(M0 + bh).to(tl.float32)
    else:
        m_prev = 0.0
    m_new = tl.maximum(logf + m_prev, ig)
    fa = tl.exp(logf + m_prev - m_new)
    ia = tl.exp(ig - m_new)
    m_hat = tl.maximum(m_new, M_FLOOR)

    offs_v = pv * BV + tl.arange(0, BV)
    mask_v = offs_v < DV
    vv = tl.load(V + bh * DV + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    num = tl.zeros([BV], dtype=tl.float32)
    qn = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, DQK, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < DQK
        qq = tl.load(Q + bh * DQK + offs_k, mask=mask_k, other=0.0).to(tl.float32) * scale
        kk = tl.load(K + bh * DQK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        c_off = bh * DQK * DV + offs_k[:, None] * DV + offs_v[None, :]
        c_mask = mask_k[:, None] & mask_v[None, :]
        if HAS_STATE:
            c_old = tl.load(C0 + c_off, mask=c_mask, other=0.0)
            n_old = tl.load(N0 + bh * DQK + offs_k, mask=mask_k, other=0.0)
        else:
            c_old = tl.zeros([BK, BV], dtype=tl.float32)
            n_old = tl.zeros([BK], dtype=tl.float32)
        c_new = fa * c_old + ia * (kk[:, None] * vv[None, :])
        tl.store(C1 + c_off, c_new, mask=c_mask)
        num += tl.sum(qq[:, None] * c_new, axis=0)
        n_new = fa * n_old + ia * kk
        if pv == 0:
            tl.store(N1 + bh * DQK + offs_k, n_new, mask=mask_k)
        qn += qq * n_new
    sc = tl.exp(m_new - m_hat)
    qn_tot = tl.sum(qn, axis=0) * sc
    den = tl.maximum(tl.abs(qn_tot), tl.exp(-m_hat)) + eps
    tl.store(H + bh * DV + offs_v, num * sc / den, mask=mask_v)
    if pv == 0:
        tl.store(M1 + bh, m_new)


Tensor = torch.Tensor


@torch.library.custom_op("openxlstm::mlstm_step", mutates_args=())
def _step_op(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, C0: Optional[Tensor], n0: Optional[Tensor],
             m0: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The kernel launch: h (B, NH, d_v) float32 and the new float32 state; one op for torch.compile and
    CUDA graphs."""
    B, NH, dqk = q.shape
    dv = v.shape[-1]
    dev = q.device
    q, k, v, i, f = (t.contiguous() for t in (q, k, v, i, f))
    has_state = C0 is not None
    if has_state:
        C0, n0, m0 = (t.to(device=dev, dtype=torch.float32).contiguous() for t in (C0, n0, m0))
    else:
        C0 = n0 = m0 = q  # never read (HAS_STATE=False)
    C1 = triton_utils.empty(B, NH, dqk, dv, device=dev, dtype=torch.float32)
    n1 = triton_utils.empty(B, NH, dqk, device=dev, dtype=torch.float32)
    m1 = triton_utils.empty(B, NH, device=dev, dtype=torch.float32)
    h = triton_utils.empty(B, NH, dv, device=dev, dtype=torch.float32)
    BK = pow2(dqk, lo=16, hi=32)
    # Enough programs to fill the GPU at batch 1: narrow value tiles when there are few heads.
    BV = pow2(dv, lo=16, hi=32 if B * NH < 64 else 64)
    grid = (B * NH, triton.cdiv(dv, BV))
    _mlstm_step_kernel[grid](
        q, k, v, i, f, C0, n0, m0, h, C1, n1, m1,
        dqk, dv, dqk**-0.5, eps,
        HAS_STATE=has_state, M_FLOOR=M_FLOOR, BK=BK, BV=BV,
    )
    return h, C1, n1, m1


@_step_op.register_fake
def _(q, k, v, i, f, C0, n0, m0, eps):
    B, NH, dqk = q.shape
    dv = v.shape[-1]
    f32 = torch.float32
    return (q.new_empty(B, NH, dv, dtype=f32), q.new_empty(B, NH, dqk, dv, dtype=f32), q.new_empty(B, NH, dqk, dtype=f32),
            q.new_empty(B, NH, dtype=f32))


def mlstm_step_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: Optional[tuple],
    eps: float = 1e-6,
) -> tuple[torch.Tensor, mLSTMState]:
    """One mLSTM step. q, k (B, NH, d_qk); v (B, NH, d_v); i, f (B, NH); state (C, n, m) or None (zeros).

    Returns h (B, NH, d_v) in v.dtype and a new float32 state (C (B, NH, d_qk, d_v), n (B, NH, d_qk),
    m (B, NH)); the caller's state tensors are only read. No autograd (inference). Float64 inputs keep
    their float64 conventions through the plain-PyTorch step.
    """
    B, NH, dqk = q.shape
    dv = v.shape[-1]
    if q.dtype == torch.float64:
        return mlstm_step(q, k, v, i, f, initial_state(state, B, NH, dqk, dv, torch.float64, q.device), eps)
    C0, n0, m0 = (None, None, None) if state is None else state
    h, C1, n1, m1 = torch.ops.openxlstm.mlstm_step(q, k, v, i, f, C0, n0, m0, eps)
    return h.to(v.dtype), mLSTMState(C1, n1, m1)


__all__ = ["mlstm_step_triton"]
