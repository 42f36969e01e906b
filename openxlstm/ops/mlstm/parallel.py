"""The mLSTM in its parallel (quadratic, attention-like) form.

With F_t = sum_{s<=t} log f_s, the weight of token s in row t is log D[t, s] = F_t - F_s + i_s (s <= t), and
the carried state enters row t with log weight F_t + m_0. Each row is stabilized by the recurrent
stabilizer m_t = max(F_t + m_0, max_s log D[t, s]) (identical to the recurrence), floored for the output.
O(S^2) time and memory: meant for short sequences and as a specification; see ``common.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import M_FLOOR, exp_flushed, mLSTMState


def mlstm_parallel(q, k, v, i, f, state: mLSTMState, eps: float = 1e-6) -> tuple[torch.Tensor, mLSTMState]:
    """q, k: (B, NH, S, d_qk); v: (B, NH, S, d_v); i, f: (B, NH, S). Returns h (state dtype) and final state."""
    C0, n0, m0 = state
    dt = C0.dtype
    q, k, v, i, f = (t.to(dt) for t in (q, k, v, i, f))
    S = q.shape[2]
    logf_cum = torch.cumsum(F.logsigmoid(f), dim=-1)  # (B, NH, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    log_d = logf_cum[..., :, None] - logf_cum[..., None, :] + i[..., None, :]  # (B, NH, S, S)
    log_d = torch.where(causal, log_d, float("-inf"))
    log_init = logf_cum + m0.detach()[..., None]  # (B, NH, S): log weight of the carried state
    m = torch.maximum(log_init, log_d.max(dim=-1).values).detach()  # (B, NH, S)
    m_hat = m.clamp(min=M_FLOOR)
    d = exp_flushed(log_d - m_hat[..., None])  # (B, NH, S, S)
    w_init = exp_flushed(log_init - m_hat)  # (B, NH, S)
    q_s = q * (q.shape[-1] ** -0.5)
    scores = (q_s @ k.transpose(-1, -2)) * d  # (B, NH, S, S)
    num = scores @ v + w_init[..., None] * (q_s @ C0)  # (B, NH, S, d_v)
    qn = scores.sum(-1) + w_init * (q_s @ n0[..., None]).squeeze(-1)  # (B, NH, S)
    den = torch.maximum(qn.abs(), torch.exp(-m_hat)) + eps
    h = num / den[..., None]

    m_last = m[..., -1]  # (B, NH)
    w_last = exp_flushed(log_d[..., -1, :] - m_last[..., None])  # (B, NH, S)
    decay = torch.exp(log_init[..., -1] - m_last)  # (B, NH)
    C = decay[..., None, None] * C0 + (k * w_last[..., None]).transpose(-1, -2) @ v
    n = decay[..., None] * n0 + (k * w_last[..., None]).sum(-2)
    return h, mLSTMState(C, n, m_last)


__all__ = ["mlstm_parallel"]
