"""The mLSTM in chunkwise form: linear in S, the training form, in plain PyTorch.

The sequence is split into chunks of L tokens (the last one padded with tokens that neither write nor
decay: input gate -1e30, log forget gate 0). Inside a chunk the outputs use the parallel form; across
chunks the state (C, n, m) is carried with the recurrence, so the stabilizer of every row equals the
recurrent m_t exactly and all three forms agree to rounding. Cumulative log forget gates are summed
within chunks only. See ``common.py`` for the conventions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import M_FLOOR, exp_flushed, mLSTMState

_PAD_I = -1e30  # input-gate value of padding tokens: exp(_PAD_I - m) == 0 in any float dtype we compute in


def mlstm_chunkwise(
    q, k, v, i, f, state: mLSTMState, chunk_size: int = 64, eps: float = 1e-6
) -> tuple[torch.Tensor, mLSTMState]:
    """q, k: (B, NH, S, d_qk); v: (B, NH, S, d_v); i, f: (B, NH, S). Returns h (state dtype), final state."""
    C0, n0, m0 = state
    dt = C0.dtype
    q, k, v, i, f = (t.to(dt) for t in (q, k, v, i, f))
    B, NH, S, dqk = q.shape
    dv = v.shape[-1]
    L = max(1, min(chunk_size, S))
    NC = -(-S // L)
    pad = NC * L - S
    logf = F.logsigmoid(f)
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        logf = F.pad(logf, (0, pad), value=0.0)
        i = F.pad(i, (0, pad), value=_PAD_I)
    q = q.view(B, NH, NC, L, dqk) * (dqk**-0.5)
    k = k.view(B, NH, NC, L, dqk)
    v = v.view(B, NH, NC, L, dv)
    i = i.view(B, NH, NC, L)
    b = torch.cumsum(logf.view(B, NH, NC, L), dim=-1)  # (B, NH, NC, L) log decay from chunk start to t
    g = b[..., -1]  # (B, NH, NC) log decay of the whole chunk

    # The normalizer n rides along with C as an extra value column: v1 = [v, 1], C1 = [C, n] (d_qk, d_v + 1),
    # so every matmul below yields the numerator and q.n together.
    v1 = torch.cat([v, v.new_ones(B, NH, NC, L, 1)], dim=-1)  # (B, NH, NC, L, d_v + 1)

    # Chunk-level state updates: contribution of each chunk's keys/values, stabilized by its own max.
    u = g[..., None] - b + i  # (B, NH, NC, L) log weight of token s in the state at chunk end
    mu = u.detach().max(dim=-1).values  # (B, NH, NC)
    kv1 = (k * exp_flushed(u - mu[..., None])[..., None]).transpose(-1, -2) @ v1  # (B, NH, NC, d_qk, d_v + 1)

    # Sequential recurrence over chunks: the state at the start of every chunk, and the final state.
    starts, ms = [], []
    C1, m = torch.cat([C0, n0[..., None]], dim=-1), m0.detach()  # (B, NH, d_qk, d_v + 1), (B, NH)
    g_det = g.detach()
    for c in range(NC):
        starts.append(C1)
        ms.append(m)
        m_next = torch.maximum(g_det[..., c] + m, mu[..., c])
        decay = torch.exp(g[..., c] + m - m_next)
        scale = torch.exp(mu[..., c] - m_next)
        C1 = decay[..., None, None] * C1 + scale[..., None, None] * kv1[:, :, c]
        m = m_next
    C1_start = torch.stack(starts, dim=2)  # (B, NH, NC, d_qk, d_v + 1)
    m_start = torch.stack(ms, dim=2)  # (B, NH, NC)

    # Outputs: intra-chunk parallel form plus the carried state, on a common per-row stabilizer.
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    log_d = torch.where(causal, b[..., :, None] - b[..., None, :] + i[..., None, :], float("-inf"))
    log_init = b + m_start[..., None]  # (B, NH, NC, L)
    m_row = torch.maximum(log_init.detach(), log_d.detach().max(dim=-1).values)
    m_hat = m_row.clamp(min=M_FLOOR)
    scores = (q @ k.transpose(-1, -2)) * exp_flushed(log_d - m_hat[..., None])  # (B, NH, NC, L, L)
    out = scores @ v1 + (q * exp_flushed(log_init - m_hat)[..., None]) @ C1_start  # (B, NH, NC, L, d_v + 1)
    num, qn = out[..., :dv], out[..., dv]
    den = torch.maximum(qn.abs(), torch.exp(-m_hat)) + eps
    h = (num / den[..., None]).reshape(B, NH, NC * L, dv)[:, :, :S]
    C, n = C1[..., :dv], C1[..., dv]
    return h, mLSTMState(C, n, m)


__all__ = ["mlstm_chunkwise"]
