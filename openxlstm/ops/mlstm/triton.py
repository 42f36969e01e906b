"""The mLSTM in chunkwise form as Triton kernels (forward and backward), for CUDA.

Same maths and conventions as ``chunkwise.py`` (see ``common.py``): q is scaled by 1/sqrt(d_qk); the state
stabilizer follows m_t = max(log f_t + m_{t-1}, i_t) from m_0; outputs use m_hat_t = max(m_t, M_FLOOR) and
the denominator max(|q.n|, exp(-m_hat)) + eps; no gradient flows through m; gates and states in float32.

Layout: the sequence is cut into NC chunks of L tokens (L a power of two >= 16, so that every ``tl.dot``
has sides >= 16); the last chunk is padded by masks with tokens that neither write (i = -1e30) nor decay
(log f = 0). Inside a chunk the log decay b_t = sum of log f over the chunk up to t is a float32 cumsum.

Forward
  1. ``_fwd_states``: a sequential loop over chunks per (batch*head, d_qk tile, d_v tile) that writes the
     state at every chunk start, CS (BH, NC+1, d_qk, d_v), NS (BH, NC+1, d_qk), MS (BH, NC+1).
  2. ``_fwd_out``: one program per (batch*head, chunk, d_v tile): the parallel (attention-like) form
     inside the chunk plus the carried state, on the recurrent stabilizer of every row. It also keeps, per
     token, m_hat, the denominator and sign(q.n) where |q.n| wins the max (zero elsewhere). h is written
     in float32 and kept for the backward (beta below is a dot product with cancellations, which half-
     precision h would spoil); the caller gets it in v.dtype.

Backward (a_t = dh_t / den_t and beta_t = -(dh_t . h_t) / den_t * sign_t are the gradients of the
numerator and of q.n; the normalizer n behaves like one more value column carrying beta)
  1. ``_bwd_states``: the reverse loop over chunks: dCS[c] = decay_c dCS[c+1] + sum_t w_t q_t a_t^T
     (dC0 = dCS[0]), plus partial sums of <dCS[c+1], CS[c+1]> for the gate gradient of the chunk decay.
  2. ``_bwd_dqdk`` (per d_qk tile) and ``_bwd_dv`` (per d_v tile): the chunk-local gradients.
  3. Gate gradients from the identities d i_s = k_s . dk_s and d b_t = q_t . dq_t - k_t . dk_t (every
     log-weight enters as the sum of a row term and a column term), reverse cumsums inside chunks, plus the
     whole-chunk decay term; then d f = d log f * sigmoid(-f).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .chunkwise import mlstm_chunkwise
from .common import M_FLOOR, initial_state, mLSTMState
from . import triton_utils
from .triton_utils import dot_config, logsigmoid, mm, mm32, pow2

@triton.jit
def _chunk_gates(I, Fg, bh, c, S, L: tl.constexpr):
    """Gates of chunk c of sequence bh: (i, b = cumsum log f, g = total log f), float32, (L,), (L,), ()."""
    offs = c * L + tl.arange(0, L)
    mask = offs < S
    ig = tl.load(I + bh * S + offs, mask=mask, other=0.0).to(tl.float32)
    ig = tl.where(mask, ig, -1e30)
    fg = tl.load(Fg + bh * S + offs, mask=mask, other=0.0).to(tl.float32)
    logf = tl.where(mask, logsigmoid(fg), 0.0)
    b = tl.cumsum(logf, 0)
    g = tl.sum(logf, 0)
    return ig, b, g


@triton.jit
def _fwd_states(
    K, V, I, Fg, C0, N0, M0, CS, NS, MS,
    S, DQK, DV, NC,
    HAS_STATE: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HALF_DOT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pk = tl.program_id(1)
    pv = tl.program_id(2)
    offs_k = pk * BK + tl.arange(0, BK)
    offs_v = pv * BV + tl.arange(0, BV)
    mk = offs_k < DQK
    mv = offs_v < DV
    tt = tl.arange(0, L)
    c_off = offs_k[:, None] * DV + offs_v[None, :]
    c_mask = mk[:, None] & mv[None, :]
    if HAS_STATE:
        C = tl.load(C0 + bh * DQK * DV + c_off, mask=c_mask, other=0.0).to(tl.float32)
        n = tl.load(N0 + bh * DQK + offs_k, mask=mk, other=0.0).to(tl.float32)
        m = tl.load(M0 + bh).to(tl.float32)
    else:
        C = tl.zeros([BK, BV], dtype=tl.float32)
        n = tl.zeros([BK], dtype=tl.float32)
        m = tl.full([], 0.0, tl.float32)
    for c in range(NC):
        base = bh * (NC + 1) + c
        tl.store(CS + base * DQK * DV + c_off, C, mask=c_mask)
        if pv == 0:
            tl.store(NS + base * DQK + offs_k, n, mask=mk)
            if pk == 0:
                tl.store(MS + base, m)
        ig, b, g = _chunk_gates(I, Fg, bh, c, S, L)
        u = g - b + ig
        m_next = tl.maximum(g + m, tl.max(u, 0))
        e = tl.exp(u - m_next)
        decay = tl.exp(g + m - m_next)
        rows = c * L + tt
        mr = rows < S
        kt = tl.load(K + (bh * S + rows)[:, None] * DQK + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        vt = tl.load(V + (bh * S + rows)[:, None] * DV + offs_v[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        ke = kt.to(tl.float32) * e[:, None]
        C = decay * C + mm(tl.trans(ke), vt, HALF_DOT, DOT_DT, PREC)
        n = decay * n + tl.sum(ke, 0)
        m = m_next
    base = bh * (NC + 1) + NC
    tl.store(CS + base * DQK * DV + c_off, C, mask=c_mask)
    if pv == 0:
        tl.store(NS + base * DQK + offs_k, n, mask=mk)
        if pk == 0:
            tl.store(MS + base, m)


@triton.jit
def _chunk_decay_matrix(ig, b, mh, L: tl.constexpr):
    """D[t, s] = exp(b_t - b_s + i_s - m_hat_t) for s <= t, else 0: (L, L) float32."""
    tt = tl.arange(0, L)
    logd = b[:, None] - b[None, :] + ig[None, :]
    logd = tl.where(tt[:, None] >= tt[None, :], logd, float("-inf"))
    return tl.exp(logd - mh[:, None])


@triton.jit
def _fwd_out(
    Q, K, V, I, Fg, CS, NS, MS, H, MH, DEN, SGN,
    S, DQK, DV, NC, scale, eps,
    M_FLOOR: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HALF_DOT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    pv = tl.program_id(2)
    tt = tl.arange(0, L)
    rows = c * L + tt
    mr = rows < S
    offs_v = pv * BV + tl.arange(0, BV)
    mv = offs_v < DV
    ig, b, g = _chunk_gates(I, Fg, bh, c, S, L)
    base = bh * (NC + 1) + c
    m0 = tl.load(MS + base)
    logd = b[:, None] - b[None, :] + ig[None, :]
    logd = tl.where(tt[:, None] >= tt[None, :], logd, float("-inf"))
    log_init = b + m0
    mh = tl.maximum(tl.maximum(log_init, tl.max(logd, 1)), M_FLOOR)
    D = tl.exp(logd - mh[:, None])
    w = tl.exp(log_init - mh) * scale

    qk = tl.zeros([L, L], dtype=tl.float32)
    qC = tl.zeros([L, BV], dtype=tl.float32)
    qn0 = tl.zeros([L], dtype=tl.float32)
    for k0 in range(0, DQK, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < DQK
        qt = tl.load(Q + (bh * S + rows)[:, None] * DQK + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        kt = tl.load(K + (bh * S + rows)[:, None] * DQK + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        Ct = tl.load(CS + base * DQK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        nt = tl.load(NS + base * DQK + offs_k, mask=mk, other=0.0)
        qk += mm(qt, tl.trans(kt), HALF_DOT, DOT_DT, PREC)
        qC += mm32(qt, Ct, PREC)
        qn0 += tl.sum(qt.to(tl.float32) * nt[None, :], 1)
    Sm = qk * scale * D
    vt = tl.load(V + (bh * S + rows)[:, None] * DV + offs_v[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
    num = mm(Sm, vt, HALF_DOT, DOT_DT, PREC) + w[:, None] * qC
    qn = tl.sum(Sm, 1) + w * qn0
    floor = tl.exp(-mh)
    den = tl.maximum(tl.abs(qn), floor) + eps
    hv = num / den[:, None]
    tl.store(H + (bh * S + rows)[:, None] * DV + offs_v[None, :], hv.to(H.dtype.element_ty), mask=mr[:, None] & mv[None, :])
    if pv == 0:
        sgn = tl.where(qn > floor, 1.0, tl.where(qn < -floor, -1.0, 0.0))
        tok = bh * NC * L + rows
        tl.store(MH + tok, mh)
        tl.store(DEN + tok, den)
        tl.store(SGN + tok, sgn)


@triton.jit
def _bwd_states(
    Q, I, Fg, DH, BETA, MH, DEN, MS, CS, NS, DCT, DNT, DCS, DNS, DG,
    S, DQK, DV, NC, BH, scale,
    HAS_DFINAL: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pk = tl.program_id(1)
    pv = tl.program_id(2)
    npv = tl.num_programs(2)
    offs_k = pk * BK + tl.arange(0, BK)
    offs_v = pv * BV + tl.arange(0, BV)
    mk = offs_k < DQK
    mv = offs_v < DV
    tt = tl.arange(0, L)
    c_off = offs_k[:, None] * DV + offs_v[None, :]
    c_mask = mk[:, None] & mv[None, :]
    if HAS_DFINAL:
        dC = tl.load(DCT + bh * DQK * DV + c_off, mask=c_mask, other=0.0).to(tl.float32)
        dn = tl.load(DNT + bh * DQK + offs_k, mask=mk, other=0.0).to(tl.float32)
    else:
        dC = tl.zeros([BK, BV], dtype=tl.float32)
        dn = tl.zeros([BK], dtype=tl.float32)
    for cc in range(NC):
        c = NC - 1 - cc
        nxt = bh * (NC + 1) + c + 1
        tl.store(DCS + nxt * DQK * DV + c_off, dC, mask=c_mask)
        Cn = tl.load(CS + nxt * DQK * DV + c_off, mask=c_mask, other=0.0)
        part = tl.sum(tl.sum(dC * Cn, 1), 0)
        if pv == 0:
            tl.store(DNS + nxt * DQK + offs_k, dn, mask=mk)
            nn = tl.load(NS + nxt * DQK + offs_k, mask=mk, other=0.0)
            part += tl.sum(dn * nn, 0)
        tl.store(DG + ((pk * npv + pv) * BH + bh) * NC + c, part)
        ig, b, g = _chunk_gates(I, Fg, bh, c, S, L)
        m_start = tl.load(MS + nxt - 1)
        m_next = tl.load(MS + nxt)
        rows = c * L + tt
        mr = rows < S
        tok = bh * NC * L + rows
        mh = tl.load(MH + tok)
        den = tl.load(DEN + tok)
        beta = tl.load(BETA + tok)
        decay = tl.exp(g + m_start - m_next)
        w = tl.exp(b + m_start - mh) * scale
        qt = tl.load(Q + (bh * S + rows)[:, None] * DQK + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        a = tl.load(DH + (bh * S + rows)[:, None] * DV + offs_v[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        a = a.to(tl.float32) / den[:, None]
        qw = qt.to(tl.float32) * w[:, None]
        dC = decay * dC + mm32(tl.trans(qw), a, PREC)
        dn = decay * dn + tl.sum(qw * beta[:, None], 0)
    tl.store(DCS + bh * (NC + 1) * DQK * DV + c_off, dC, mask=c_mask)
    if pv == 0:
        tl.store(DNS + bh * (NC + 1) * DQK + offs_k, dn, mask=mk)


@triton.jit
def _bwd_dqdk(
    Q, K, V, I, Fg, DH, BETA, MH, DEN, MS, CS, NS, DCS, DNS, DQ, DK,
    S, DQK, DV, NC, scale,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HALF_DOT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    pk = tl.program_id(2)
    tt = tl.arange(0, L)
    rows = c * L + tt
    mr = rows < S
    offs_k = pk * BK + tl.arange(0, BK)
    mk = offs_k < DQK
    ig, b, g = _chunk_gates(I, Fg, bh, c, S, L)
    base = bh * (NC + 1) + c
    m_start = tl.load(MS + base)
    m_next = tl.load(MS + base + 1)
    tok = bh * NC * L + rows
    mh = tl.load(MH + tok)
    den = tl.load(DEN + tok)
    beta = tl.load(BETA + tok)
    D = _chunk_decay_matrix(ig, b, mh, L)
    w = tl.exp(b + m_start - mh) * scale
    e = tl.exp(g - b + ig - m_next)

    dS = tl.zeros([L, L], dtype=tl.float32)
    dqs = tl.zeros([L, BK], dtype=tl.float32)
    dks = tl.zeros([L, BK], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        mv = offs_v < DV
        a = tl.load(DH + (bh * S + rows)[:, None] * DV + offs_v[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        a = a.to(tl.float32) / den[:, None]
        vt = tl.load(V + (bh * S + rows)[:, None] * DV + offs_v[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        c_off = offs_k[:, None] * DV + offs_v[None, :]
        c_mask = mk[:, None] & mv[None, :]
        Ct = tl.load(CS + base * DQK * DV + c_off, mask=c_mask, other=0.0)
        dCt = tl.load(DCS + (base + 1) * DQK * DV + c_off, mask=c_mask, other=0.0)
        dS += mm(a, tl.trans(vt), HALF_DOT, DOT_DT, PREC)
        dqs += mm32(a, tl.trans(Ct), PREC)
        dks += mm32(vt, tl.trans(dCt), PREC)
    dSD = (dS + beta[:, None]) * D
    qt = tl.load(Q + (bh * S + rows)[:, None] * DQK + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
    kt = tl.load(K + (bh * S + rows)[:, None] * DQK + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
    n_start = tl.load(NS + base * DQK + offs_k, mask=mk, other=0.0)
    dn_next = tl.load(DNS + (base + 1) * DQK + offs_k, mask=mk, other=0.0)
    dq = mm(dSD, kt, HALF_DOT, DOT_DT, PREC) * scale + w[:, None] * (dqs + beta[:, None] * n_start[None, :])
    dk = mm(tl.trans(dSD), qt, HALF_DOT, DOT_DT, PREC) * scale + e[:, None] * (dks + dn_next[None, :])
    out = (bh * S + rows)[:, None] * DQK + offs_k[None, :]
    tl.store(DQ + out, dq, mask=mr[:, None] & mk[None, :])
    tl.store(DK + out, dk, mask=mr[:, None] & mk[None, :])


@triton.jit
def _bwd_dv(
    Q, K, I, Fg, DH, MH, DEN, MS, DCS, DV_,
    S, DQK, DV, NC, scale,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HALF_DOT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    pv = tl.program_id(2)
    tt = tl.arange(0, L)
    rows = c * L + tt
    mr = rows < S
    offs_v = pv * BV + tl.arange(0, BV)
    mv = offs_v < DV
    ig, b, g = _chunk_gates(I, Fg, bh, c, S, L)
    base = bh * (NC + 1) + c
    m_next = tl.load(MS + base + 1)
    tok = bh * NC * L + rows
    mh = tl.load(MH + tok)
    den = tl.load(DEN + tok)
    D = _chunk_decay_matrix(ig, b, mh, L)
    e = tl.exp(g - b + ig - m_next)

    qk = tl.zeros([L, L], dtype=tl.float32)
    kdC = tl.zeros([L, BV], dtype=tl.float32)
    for k0 in range(0, DQK, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < DQK
        qt = tl.load(Q + (bh * S + rows)[:, None] * DQK + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        kt = tl.load(K + (bh * S + rows)[:, None] * DQK + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        dCt = tl.load(DCS + (base + 1) * DQK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        qk += mm(qt, tl.trans(kt), HALF_DOT, DOT_DT, PREC)
        kdC += mm32(kt, dCt, PREC)
    Sm = qk * scale * D
    a = tl.load(DH + (bh * S + rows)[:, None] * DV + offs_v[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
    a = a.to(tl.float32) / den[:, None]
    dv = mm(tl.trans(Sm), a, HALF_DOT, DOT_DT, PREC) + e[:, None] * kdC
    tl.store(DV_ + (bh * S + rows)[:, None] * DV + offs_v[None, :], dv, mask=mr[:, None] & mv[None, :])


def _tiles(dqk: int, dv: int) -> tuple[int, int]:
    """Head-dim tiles (powers of two in [16, 64])."""
    return pow2(dqk, 16, 64), pow2(dv, 16, 64)


def _warps(L: int) -> int:
    """Warps per program: with 64-token chunks the (L, L) and (L, 64) float32 tiles need 8 to stay in
    registers (sm_90 ptxas reports: 4 warps spill in every kernel, 8 warps spill little or nothing)."""
    return 8 if L >= 64 else 4


def _loop_tile(tile: int, L: int) -> int:
    """Head-dim tile of the inner loops of ``_fwd_out`` (over d_qk) and ``_bwd_dqdk`` (over d_v): 32 for
    L >= 64, which removes their register spills on sm_90 at no cost in traffic."""
    return min(tile, 32) if L >= 64 else tile


class _MLSTMTritonFn(torch.autograd.Function):
    """Autograd wrapper: inputs q, k, v (B*NH, S, d) contiguous, i, f (B*NH, S), optional C0, n0, m0."""

    @staticmethod
    def forward(ctx, q, k, v, i, f, C0, n0, m0, L, eps):
        BH, S, dqk = q.shape
        dv = v.shape[-1]
        dev = q.device
        NC = triton.cdiv(S, L)
        BK, BV = _tiles(dqk, dv)
        cfg = dot_config(q.dtype)
        has_state = C0 is not None
        f32 = torch.float32
        CS = triton_utils.empty(BH, NC + 1, dqk, dv, device=dev, dtype=f32)
        NS = triton_utils.empty(BH, NC + 1, dqk, device=dev, dtype=f32)
        MS = triton_utils.empty(BH, NC + 1, device=dev, dtype=f32)
        dummy = CS
        _fwd_states[(BH, triton.cdiv(dqk, BK), triton.cdiv(dv, BV))](
            k, v, i, f,
            C0 if has_state else dummy, n0 if has_state else dummy, m0 if has_state else dummy,
            CS, NS, MS, S, dqk, dv, NC,
            HAS_STATE=has_state, L=L, BK=BK, BV=BV, num_warps=_warps(L), **cfg,
        )
        h = triton_utils.empty(BH, S, dv, device=dev, dtype=f32)
        MH = triton_utils.empty(BH, NC * L, device=dev, dtype=f32)
        DEN = triton_utils.empty(*MH.shape, device=MH.device, dtype=MH.dtype)
        SGN = triton_utils.empty(*MH.shape, device=MH.device, dtype=MH.dtype)
        scale = dqk**-0.5
        _fwd_out[(BH, NC, triton.cdiv(dv, BV))](
            q, k, v, i, f, CS, NS, MS, h, MH, DEN, SGN,
            S, dqk, dv, NC, scale, eps,
            M_FLOOR=M_FLOOR, L=L, BK=_loop_tile(BK, L), BV=BV, num_warps=_warps(L), **cfg,
        )
        ctx.save_for_backward(q, k, v, i, f, h, CS, NS, MS, MH, DEN, SGN)
        ctx.meta = (L, has_state)
        m_final = MS[:, NC].clone()
        ctx.mark_non_differentiable(m_final)
        return h.to(v.dtype), CS[:, NC].clone(), NS[:, NC].clone(), m_final

    @staticmethod
    def backward(ctx, dh, dC_final, dn_final, _dm):
        q, k, v, i, f, h, CS, NS, MS, MH, DEN, SGN = ctx.saved_tensors
        L, has_state = ctx.meta
        BH, S, dqk = q.shape
        dv = v.shape[-1]
        dev = q.device
        NC = triton.cdiv(S, L)
        BK, BV = _tiles(dqk, dv)
        NPK, NPV = triton.cdiv(dqk, BK), triton.cdiv(dv, BV)
        cfg = dot_config(q.dtype)
        f32 = torch.float32
        scale = dqk**-0.5
        dh = torch.zeros_like(h) if dh is None else dh.contiguous()
        beta = -(dh.float() * h.float()).sum(-1)
        beta = F.pad(beta, (0, NC * L - S)) / DEN * SGN  # (BH, NC*L)
        has_dfinal = dC_final is not None or dn_final is not None
        dCT = (torch.zeros_like(CS[:, 0]) if dC_final is None else dC_final.float()).contiguous()
        dnT = (torch.zeros_like(NS[:, 0]) if dn_final is None else dn_final.float()).contiguous()
        DCS = triton_utils.empty(*CS.shape, device=CS.device, dtype=CS.dtype)
        DNS = triton_utils.empty(*NS.shape, device=NS.device, dtype=NS.dtype)
        DG = triton_utils.empty(NPK * NPV, BH, NC, device=dev, dtype=f32)
        _bwd_states[(BH, NPK, NPV)](
            q, i, f, dh, beta, MH, DEN, MS, CS, NS, dCT, dnT, DCS, DNS, DG,
            S, dqk, dv, NC, BH, scale,
            HAS_DFINAL=has_dfinal, L=L, BK=BK, BV=BV, PREC=cfg["PREC"], num_warps=_warps(L),
        )
        dq = triton_utils.empty(BH, S, dqk, device=dev, dtype=f32)
        dk = triton_utils.empty(*dq.shape, device=dq.device, dtype=dq.dtype)
        dvv = triton_utils.empty(BH, S, dv, device=dev, dtype=f32)
        _bwd_dqdk[(BH, NC, NPK)](
            q, k, v, i, f, dh, beta, MH, DEN, MS, CS, NS, DCS, DNS, dq, dk,
            S, dqk, dv, NC, scale, L=L, BK=BK, BV=_loop_tile(BV, L), num_warps=_warps(L), **cfg,
        )
        _bwd_dv[(BH, NC, NPV)](
            q, k, i, f, dh, MH, DEN, MS, DCS, dvv,
            S, dqk, dv, NC, scale, L=L, BK=BK, BV=BV, num_warps=_warps(L), **cfg,
        )
        di = (k.float() * dk).sum(-1)  # (BH, S)
        db = (q.float() * dq).sum(-1) - di
        db = F.pad(db, (0, NC * L - S)).view(BH, NC, L)
        dlogf = db.flip(-1).cumsum(-1).flip(-1) + DG.sum(0)[..., None]
        df = dlogf.view(BH, NC * L)[:, :S] * torch.sigmoid(-f.float())
        dC0 = DCS[:, 0] if has_state else None
        dn0 = DNS[:, 0] if has_state else None
        return (dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype), di.to(i.dtype), df.to(f.dtype),
                dC0, dn0, None, None, None)


def mlstm_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: Optional[tuple] = None,
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, mLSTMState]:
    """The mLSTM over a sequence with the chunkwise Triton kernels (differentiable).

    q, k: (B, NH, S, d_qk); v: (B, NH, S, d_v); i, f: (B, NH, S); state: None or (C (B, NH, d_qk, d_v),
    n (B, NH, d_qk), m (B, NH)), read as float32 and never modified; gradients reach C and n (not m).
    chunk_size is rounded to a power of two in [16, 128] (and not above S rounded up): the result does not
    depend on it beyond rounding. Returns h (B, NH, S, d_v) in v.dtype and the final float32 state.
    Float64 inputs keep their float64 conventions: they go to the plain-PyTorch chunkwise form.
    """
    if q.dtype == torch.float64:
        return mlstm_chunkwise(q, k, v, i, f, initial_state(state, *q.shape[:2], q.shape[3], v.shape[3],
                                                            torch.float64, q.device), chunk_size, eps)
    B, NH, S, dqk = q.shape
    dv = v.shape[-1]
    L = min(pow2(chunk_size, 16, 128), pow2(S, 16))
    flat = lambda t, *shape: t.reshape(B * NH, *shape).contiguous()  # noqa: E731
    if state is not None:
        C0, n0, m0 = (t.to(device=q.device, dtype=torch.float32) for t in state)
        C0, n0, m0 = flat(C0, dqk, dv), flat(n0, dqk), flat(m0.detach())
    else:
        C0 = n0 = m0 = None
    h, C, n, m = _MLSTMTritonFn.apply(
        flat(q, S, dqk), flat(k, S, dqk), flat(v, S, dv), flat(i, S), flat(f, S), C0, n0, m0, L, eps
    )
    return h.view(B, NH, S, dv), mLSTMState(C.view(B, NH, dqk, dv), n.view(B, NH, dqk), m.view(B, NH))


__all__ = ["mlstm_triton"]
