"""The mLSTM in chunkwise form: linear in S, the training form, in plain PyTorch.

The sequence is split into chunks of L tokens (the last one padded with tokens that neither write nor
decay: input gate -1e30, log forget gate 0). Inside a chunk the outputs use the parallel form; across
chunks the state (C, n, m) is carried with the recurrence, so the stabilizer of every row equals the
recurrent m_t exactly and all three forms agree to rounding. Cumulative log forget gates are summed
within chunks only, and restart after segment starts (document starts, hard resets: see ``common.py``): a
token attends only to keys of its own segment, sees the carried state only if no segment started in the
chunk before it, and a chunk whose end lies in a fresh segment hands on only that segment's state.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .common import M_FLOOR, NEG_INF, exp_flushed, mLSTMState, segment_starts

_PAD_I = -1e30  # input-gate value of padding tokens: exp(_PAD_I - m) == 0 in any float dtype we compute in


def mlstm_chunkwise(
    q, k, v, i, f, state: mLSTMState, chunk_size: int = 64, eps: float = 1e-6, starts: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, mLSTMState]:
    """q, k: (B, NH, S, d_qk); v: (B, NH, S, d_v); i, f: (B, NH, S); starts: (B, S) bool document starts or
    None. Returns h (state dtype), final state."""
    C0, n0, m0 = state
    dt = C0.dtype
    q, k, v = (t.to(dt) for t in (q, k, v))
    # gates often arrive as transposed views of (B, S, NH) projections; their contiguous copies are small, and
    # torch.compile's traced backward otherwise views their gradient with the wrong strides (fullgraph fails)
    i, f = (t.to(dt).contiguous() for t in (i, f))
    B, NH, S, dqk = q.shape
    dv = v.shape[-1]
    L = max(1, min(chunk_size, S))
    NC = -(-S // L)
    pad = NC * L - S
    logf = F.logsigmoid(f)
    rst = segment_starts(logf, starts)  # (B, NH, S): segment starts (document starts, hard resets)
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        logf = F.pad(logf, (0, pad), value=0.0)
        i = F.pad(i, (0, pad), value=_PAD_I)
        rst = F.pad(rst, (0, pad), value=False)
    q = q.view(B, NH, NC, L, dqk) * (dqk**-0.5)
    k = k.view(B, NH, NC, L, dqk)
    v = v.view(B, NH, NC, L, dv)
    i = i.view(B, NH, NC, L)
    logf = logf.view(B, NH, NC, L)
    rst = rst.view(B, NH, NC, L)

    # Log decays inside each chunk, restarted after every segment start P (whose own log f is left out:
    # a hard reset's -inf never enters a difference): b_t = sum of log f over (P, t], or over [chunk start, t]
    # for the segment that continues the carried state.
    cs = torch.cumsum(torch.where(rst, 0.0, logf), dim=-1)  # (B, NH, NC, L)
    P = torch.where(rst, torch.arange(L, device=q.device), -1).cummax(-1).values  # latest start in the chunk, -1: none
    fresh_seg = P >= 0  # the token's segment started in this chunk (it does not see the carried state)
    Pc = P.clamp(min=0)
    b = cs - torch.where(fresh_seg, cs.gather(-1, Pc), 0.0)
    # a fresh segment's zero state enters only the stabilizer, with log weight log f_P + b_t (m = 0)
    fresh = torch.where(fresh_seg, logf.gather(-1, Pc) + b, NEG_INF).detach()
    seg = rst.cumsum(-1)  # (B, NH, NC, L) segment number within the chunk, 0: the carried state's
    g = b[..., -1]  # (B, NH, NC) log decay of the chunk end's segment
    keep = ~fresh_seg[..., -1]  # (B, NH, NC): the chunk end still carries the state of the chunk start

    # The normalizer n rides along with C as an extra value column: v1 = [v, 1], C1 = [C, n] (d_qk, d_v + 1),
    # so every matmul below yields the numerator and q.n together.
    v1 = torch.cat([v, v.new_ones(B, NH, NC, L, 1)], dim=-1)  # (B, NH, NC, L, d_v + 1)

    # Chunk-level state updates: contribution of the end segment's keys/values, stabilized by its own max.
    u = torch.where(seg == seg[..., -1:], g[..., None] - b + i, NEG_INF)  # (B, NH, NC, L) weight at chunk end
    mu = u.detach().max(dim=-1).values  # (B, NH, NC)
    kv1 = (k * exp_flushed(u - mu[..., None])[..., None]).transpose(-1, -2) @ v1  # (B, NH, NC, d_qk, d_v + 1)

    # Sequential recurrence over chunks: the state at the start of every chunk, and the final state.
    starts_c, ms = [], []
    C1, m = torch.cat([C0, n0[..., None]], dim=-1), m0.detach()  # (B, NH, d_qk, d_v + 1), (B, NH)
    g_det, fresh_end = g.detach(), fresh[..., -1]
    for c in range(NC):
        starts_c.append(C1)
        ms.append(m)
        carried = torch.where(keep[..., c], g_det[..., c] + m, fresh_end[..., c])
        m_next = torch.maximum(carried, mu[..., c])
        decay = torch.exp(torch.where(keep[..., c], g[..., c] + m - m_next, NEG_INF))
        scale = torch.exp(mu[..., c] - m_next)
        C1 = decay[..., None, None] * C1 + scale[..., None, None] * kv1[:, :, c]
        m = m_next
    C1_start = torch.stack(starts_c, dim=2)  # (B, NH, NC, d_qk, d_v + 1)
    m_start = torch.stack(ms, dim=2)  # (B, NH, NC)

    # Outputs: intra-chunk parallel form (within segments) plus the carried state, on a common per-row stabilizer.
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril() & (seg[..., :, None] == seg[..., None, :])
    log_d = torch.where(causal, b[..., :, None] - b[..., None, :] + i[..., None, :], NEG_INF)
    log_init = torch.where(fresh_seg, NEG_INF, b + m_start[..., None])  # (B, NH, NC, L)
    m_row = torch.maximum(torch.maximum(log_init.detach(), fresh), log_d.detach().max(dim=-1).values)
    m_hat = m_row.clamp(min=M_FLOOR)
    scores = (q @ k.transpose(-1, -2)) * exp_flushed(log_d - m_hat[..., None])  # (B, NH, NC, L, L)
    out = scores @ v1 + (q * exp_flushed(log_init - m_hat)[..., None]) @ C1_start  # (B, NH, NC, L, d_v + 1)
    num, qn = out[..., :dv], out[..., dv]
    den = torch.maximum(qn.abs(), torch.exp(-m_hat)) + eps
    h = (num / den[..., None]).reshape(B, NH, NC * L, dv)[:, :, :S]
    C, n = C1[..., :dv], C1[..., dv]
    return h, mLSTMState(C, n, m)


__all__ = ["mlstm_chunkwise"]
