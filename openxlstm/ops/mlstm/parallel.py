"""The mLSTM in its parallel (quadratic, attention-like) form.

With F_t = sum_{s<=t} log f_s, the weight of token s in row t is log D[t, s] = F_t - F_s + i_s (s <= t), and
the carried state enters row t with log weight F_t + m_0. Each row is stabilized by the recurrent
stabilizer m_t = max(F_t + m_0, max_s log D[t, s]) (identical to the recurrence), floored for the output.
O(S^2) time and memory: meant for short sequences and as a specification; see ``common.py``.

Segments (document starts and hard resets, see ``common.py``): F restarts after every segment start P (the
start's own log f is left out of the differences, so a -inf never meets another), D is block-diagonal
over segments, and the start state of a segment enters with log weight log f_P + F_t + m_init: the passed
state (m_init = m_0) in the row's first segment, a zero state (m_init = 0, only its stabilizer term) after.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .common import M_FLOOR, NEG_INF, exp_flushed, mLSTMState, segment_starts


def mlstm_parallel(q, k, v, i, f, state: mLSTMState, eps: float = 1e-6,
                   starts: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, mLSTMState]:
    """q, k: (B, NH, S, d_qk); v: (B, NH, S, d_v); i, f: (B, NH, S); starts: (B, S) bool document starts or
    None. Returns h (state dtype) and the final state."""
    C0, n0, m0 = state
    dt = C0.dtype
    q, k, v, i, f = (t.to(dt) for t in (q, k, v, i, f))
    S = q.shape[2]
    logf = F.logsigmoid(f)  # (B, NH, S)
    seg_start = segment_starts(logf, starts)
    seg_start[..., 0] = True  # the row start begins the first segment (the passed state's)
    idx = torch.arange(S, device=q.device)
    P = torch.where(seg_start, idx, 0).cummax(-1).values  # (B, NH, S) start of each token's segment
    seg = seg_start.cumsum(-1)  # (B, NH, S) segment number, 1 for the row's first
    cum = torch.cumsum(torch.where(seg_start, 0.0, logf), dim=-1)
    logf_cum = cum - cum.gather(-1, P)  # sum of log f over (P, t]
    same = (seg[..., :, None] == seg[..., None, :]) & torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    log_d = torch.where(same, logf_cum[..., :, None] - logf_cum[..., None, :] + i[..., None, :], NEG_INF)  # (B, NH, S, S)
    first = seg == 1
    log_init = logf.gather(-1, P) + logf_cum + torch.where(first, m0.detach()[..., None], 0.0)  # (B, NH, S)
    m = torch.maximum(log_init, log_d.max(dim=-1).values).detach()  # (B, NH, S)
    m_hat = m.clamp(min=M_FLOOR)
    d = exp_flushed(log_d - m_hat[..., None])  # (B, NH, S, S)
    w_init = exp_flushed(torch.where(first, log_init - m_hat, NEG_INF))  # (B, NH, S): only the passed state is nonzero
    q_s = q * (q.shape[-1] ** -0.5)
    scores = (q_s @ k.transpose(-1, -2)) * d  # (B, NH, S, S)
    num = scores @ v + w_init[..., None] * (q_s @ C0)  # (B, NH, S, d_v)
    qn = scores.sum(-1) + w_init * (q_s @ n0[..., None]).squeeze(-1)  # (B, NH, S)
    den = torch.maximum(qn.abs(), torch.exp(-m_hat)) + eps
    h = num / den[..., None]

    m_last = m[..., -1]  # (B, NH)
    w_last = exp_flushed(log_d[..., -1, :] - m_last[..., None])  # (B, NH, S)
    decay = torch.exp(torch.where(first[..., -1], log_init[..., -1] - m_last, NEG_INF))  # (B, NH)
    C = decay[..., None, None] * C0 + (k * w_last[..., None]).transpose(-1, -2) @ v
    n = decay[..., None] * n0 + (k * w_last[..., None]).sum(-2)
    return h, mLSTMState(C, n, m_last)


__all__ = ["mlstm_parallel"]
