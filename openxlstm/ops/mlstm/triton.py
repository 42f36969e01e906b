"""The mLSTM in chunkwise form as Triton kernels (forward and backward), for CUDA.

Same maths and conventions as ``chunkwise.py`` (see ``common.py``): q is scaled by 1/sqrt(d_qk); the state
stabilizer follows m_t = max(log f_t + m_{t-1}, i_t) from m_0; outputs use m_hat_t = max(m_t, M_FLOOR) and
the denominator max(|q.n|, exp(-m_hat)) + eps; no gradient flows through m; gates and states in float32.

Two levels of chunking (as TFLA): the recurrent state is materialized only every L tokens (L = 256 by
default: few states to write and read), and inside a chunk the attention-like part runs in sub-blocks of
LB tokens (flash-attention style loops over key blocks below the diagonal), so the tiles stay small for any
L. Inputs may be strided views (B, NH, S, d) of larger tensors (the last dimension contiguous): nothing is
copied.

Gates first (``_gate_prep``, a few float32 PyTorch ops over (B*NH, S)): per token the input gate i, the log
decay b_t = sum of log f over the chunk up to t, and cm_t = max_{s<=t in chunk}(i_s - b_s), which gives every
row's stabilizer without a pass over the keys: m_t = b_t + max(m_chunk_start, cm_t).

Segments (document starts from ``cu_seqlens`` and hard resets log f = -inf; see ``common.py``): b restarts
after a segment start P (sum over (P, t], the start's own log f left out), cm is a max over the token's own
segment, SEG numbers the segments of a row (keys attend within theirs) and FO holds, per token, +inf where its
segment continues the chunk's carried state, else the fresh start's stabilizer offset log f_P: then the
carried state is invisible and m_t = b_t + max(log f_P, cm_t) (the zero state's m = 0 enters the max).

Forward
  1. ``_fwd_states``: a sequential loop over chunks per (batch*head, d_qk tile, d_v tile): the state at every
     chunk start, CS (BH, NC+1, d_qk, d_v) float32, NS (BH, NC+1, d_qk), MS (BH, NC+1).
  2. ``_fwd_out``: one program per (batch*head, query sub-block, d_v tile): the carried state's part plus
     the intra-chunk part over key sub-blocks up to the diagonal. h is returned in the input dtype and, for
     the backward, in float32 (beta below is a dot product with cancellations); per token it also keeps m_hat
     and q.n (STATS), from which the denominator and its sign follow.

Backward (a_t = dh_t / den_t and beta_t = -(dh_t . h_t) / den_t * sign_t are the gradients of the
numerator and of q.n; the normalizer n behaves like one more value column carrying beta)
  1. ``_fwd_states`` again: the chunk states are recomputed, not stored by the forward.
  2. ``_bwd_states``: the reverse loop over chunks: dCS[c] = decay_c dCS[c+1] + sum_t w_t q_t a_t^T (dC0 =
     dCS[0]), plus partial sums of <dCS[c+1], CS[c+1]>: the gradient of the chunk's total log decay.
  3. ``_bwd_dq`` (query sub-blocks), ``_bwd_dk`` and ``_bwd_dv`` (key sub-blocks): the chunk-local gradients.
  4. Gate gradients from the identities d i_s = k_s . dk_s and d b_t = q_t . dq_t - k_t . dk_t (every
     log-weight enters as the sum of a row term and a column term), reverse cumsums inside chunks, plus the
     whole-chunk decay term; then d f = d log f * sigmoid(-f).

The tile sizes are autotuned per shape on a GPU (a handful of configurations per kernel) and fixed under
the interpreter. Both passes are PyTorch custom ops (``openxlstm::mlstm_chunkwise_fwd`` / ``_bwd``), so
``torch.compile`` sees each as one opaque operation.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import triton_utils
from ..varlen import doc_starts
from .common import M_FLOOR, mLSTMState, segment_starts
from ..triton_utils import autotune, dot_config, mm, mm32, mm_wide, pow2

_PAD_I = -1e30
DEFAULT_CHUNK = 256


def chunk_length(chunk_size: Optional[int], S: int) -> int:
    """The state chunk L: a power of two in [64, 256] (default 256), not above S rounded up to 64; at least
    as long as every sub-block LB the launch configurations use. Under the interpreter (small test shapes,
    sub-block 16) the floor is 16."""
    lo = 16 if triton_utils.INTERPRET and not triton_utils.GPU_CONFIGS else 64
    return min(pow2(chunk_size or DEFAULT_CHUNK, lo, 256), pow2(S, lo))


class Gates(NamedTuple):
    """Per-token gate arrays, each (B*NH, NC*L) contiguous (see the module docstring): ig, b, cm, fo float32,
    seg int32."""

    ig: torch.Tensor
    b: torch.Tensor
    cm: torch.Tensor
    fo: torch.Tensor
    seg: torch.Tensor


def _gate_prep(i: torch.Tensor, f: torch.Tensor, L: int, starts: Optional[torch.Tensor] = None) -> Gates:
    """i, f (B, NH, S), document starts (B, S) bool or None -> Gates. Padding tokens neither write
    (i = -1e30) nor decay (log f = 0)."""
    B, NH, S = i.shape
    BH, NC = B * NH, triton.cdiv(S, L)
    pad = NC * L - S
    ig = F.pad(i.float().reshape(BH, S), (0, pad), value=_PAD_I).view(BH, NC, L)
    logf = F.pad(F.logsigmoid(f.float()), (0, pad))  # (B, NH, NC*L)
    rst = segment_starts(logf, None if starts is None else F.pad(starts, (0, pad))).reshape(BH, NC, L)
    logf = logf.reshape(BH, NC, L)
    cs = torch.where(rst, 0.0, logf).cumsum(-1)
    P = torch.where(rst, torch.arange(L, device=i.device), -1).cummax(-1).values  # latest start in the chunk
    fresh, Pc = P >= 0, P.clamp(min=0)
    b = cs - torch.where(fresh, cs.gather(-1, Pc), 0.0)
    fo = torch.where(fresh, logf.gather(-1, Pc), float("inf"))
    seg = rst.view(BH, NC * L).cumsum(-1, dtype=torch.int32).view(BH, NC, L)
    cm = _segment_cummax(ig - b, seg)
    return Gates(*(t.reshape(BH, NC * L).contiguous() for t in (ig, b, cm, fo, seg)))


def _segment_cummax(x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Inclusive running max along the last dimension that restarts where ``seg`` changes (segments are
    contiguous runs): log2(L) doubling steps, each taking the max with the value d places back when it lies
    in the same segment."""
    d, L = 1, x.shape[-1]
    while d < L:
        back = F.pad(x[..., :-d], (d, 0), value=float("-inf"))
        same = F.pad(seg[..., :-d], (d, 0), value=-1) == seg
        x = torch.where(same, torch.maximum(x, back), x)
        d *= 2
    return x


def _segment_reverse_cumsum(x: torch.Tensor, rst: torch.Tensor) -> torch.Tensor:
    """sum_{t >= r, t in r's segment} x_t along the last dimension (segments start where ``rst`` is True)."""
    L = x.shape[-1]
    rev = x.flip(-1).cumsum(-1).flip(-1)  # sum_{t >= r}
    idx = torch.arange(L, device=x.device)
    nxt = torch.where(rst, idx, L).flip(-1).cummin(-1).values.flip(-1)  # first start at or after r
    nxt = F.pad(nxt[..., 1:], (0, 1), value=L)  # first start after r
    return rev - F.pad(rev, (0, 1)).gather(-1, nxt)


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_states(
    K, V, IG, Bc, CM, FO, SEG, C0, N0, M0, CS, NS, MS,
    skb, skh, sks, svb, svh, svs,
    S, NH, DQK, DV, NC,
    HAS_STATE: tl.constexpr, L: tl.constexpr, LB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HALF_DOT: tl.constexpr, WIDE_HALF: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pk = tl.program_id(1)
    pv = tl.program_id(2)
    kbase = K + (bh // NH) * skb + (bh % NH) * skh
    vbase = V + (bh // NH) * svb + (bh % NH) * svh
    offs_k = pk * BK + tl.arange(0, BK)
    offs_v = pv * BV + tl.arange(0, BV)
    mk = offs_k < DQK
    mv = offs_v < DV
    tb = tl.arange(0, LB)
    c_off = offs_k[:, None] * DV + offs_v[None, :]
    c_mask = mk[:, None] & mv[None, :]
    gbase = bh * NC * L
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
        last = gbase + c * L + L - 1
        g = tl.load(Bc + last)
        fo = tl.load(FO + last)
        keep = fo == float("inf")  # the chunk end's segment carries the state of the chunk start
        m_next = g + tl.maximum(tl.where(keep, m, fo), tl.load(CM + last))
        decay = tl.where(keep, tl.exp(g + m - m_next), 0.0)
        C = decay * C
        n = decay * n
        seg_end = tl.load(SEG + last)
        for sb in range(0, L, LB):
            tok = c * L + sb + tb
            e = tl.exp(g - tl.load(Bc + gbase + tok) + tl.load(IG + gbase + tok) - m_next)  # (LB,)
            e = tl.where(tl.load(SEG + gbase + tok) == seg_end, e, 0.0)
            mr = tok < S
            kt = tl.load(kbase + tok[:, None] * sks + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            vt = tl.load(vbase + tok[:, None] * svs + offs_v[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
            ke = kt.to(tl.float32) * e[:, None]
            C += mm(tl.trans(ke), vt, HALF_DOT, DOT_DT, PREC)
            n += tl.sum(ke, 0)
        m = m_next
    base = bh * (NC + 1) + NC
    tl.store(CS + base * DQK * DV + c_off, C, mask=c_mask)
    if pv == 0:
        tl.store(NS + base * DQK + offs_k, n, mask=mk)
        if pk == 0:
            tl.store(MS + base, m)


@triton.jit
def _decay(b_r, b_s, ig_s, mh_r, rows, cols, seg_r, seg_s):
    """D[r, s] = exp(b_r - b_s + i_s - m_hat_r) for s <= r in the same segment, else 0: (LB, LB) float32."""
    logd = b_r[:, None] - b_s[None, :] + ig_s[None, :] - mh_r[:, None]
    keep = (rows[:, None] >= cols[None, :]) & (seg_r[:, None] == seg_s[None, :])
    return tl.exp(tl.where(keep, logd, float("-inf")))


@triton.jit
def _qk(qbase, kbase, rows, cols, sqs, sks, S, DQK, LB: tl.constexpr, BK: tl.constexpr,
        HALF_DOT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """(LB, LB) float32: q_rows . k_cols over all of d_qk, in tiles of BK."""
    acc = tl.zeros([LB, LB], dtype=tl.float32)
    mr = rows < S
    mc = cols < S
    for k0 in range(0, DQK, BK):
        offs = k0 + tl.arange(0, BK)
        mk = offs < DQK
        qt = tl.load(qbase + rows[:, None] * sqs + offs[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        kt = tl.load(kbase + cols[:, None] * sks + offs[None, :], mask=mc[:, None] & mk[None, :], other=0.0)
        acc += mm(qt, tl.trans(kt), HALF_DOT, DOT_DT, PREC)
    return acc


@triton.jit
def _av(abase, vbase, rows, cols, den, sas, svs, S, DV, LB: tl.constexpr, BV: tl.constexpr,
        HALF_DOT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """(LB, LB) float32: (dh_rows / den_rows) . v_cols over all of d_v, in tiles of BV."""
    acc = tl.zeros([LB, LB], dtype=tl.float32)
    mr = rows < S
    mc = cols < S
    for v0 in range(0, DV, BV):
        offs = v0 + tl.arange(0, BV)
        mv = offs < DV
        at = tl.load(abase + rows[:, None] * sas + offs[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        vt = tl.load(vbase + cols[:, None] * svs + offs[None, :], mask=mc[:, None] & mv[None, :], other=0.0)
        acc += mm(at, tl.trans(vt), HALF_DOT, DOT_DT, PREC)
    return acc / den[:, None]


@triton.jit
def _fwd_out(
    Q, K, V, IG, Bc, CM, FO, SEG, CS, NS, MS, H, H32, STATS,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, shb, shh, shs,
    S, NH, DQK, DV, NC, scale, eps,
    M_FLOOR: tl.constexpr, L: tl.constexpr, LB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HALF_DOT: tl.constexpr, WIDE_HALF: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    pv = tl.program_id(2)
    NQB: tl.constexpr = L // LB
    c = pid // NQB
    j = pid % NQB
    qbase = Q + (bh // NH) * sqb + (bh % NH) * sqh
    kbase = K + (bh // NH) * skb + (bh % NH) * skh
    vbase = V + (bh // NH) * svb + (bh % NH) * svh
    hoff = (bh // NH) * shb + (bh % NH) * shh
    gbase = bh * NC * L
    rows = c * L + j * LB + tl.arange(0, LB)
    mr = rows < S
    offs_v = pv * BV + tl.arange(0, BV)
    mv = offs_v < DV
    b_r = tl.load(Bc + gbase + rows)
    seg_r = tl.load(SEG + gbase + rows)
    cst = bh * (NC + 1) + c
    m0 = tl.load(MS + cst)
    fo = tl.load(FO + gbase + rows)
    carry = fo == float("inf")  # the row sees the carried state (no segment started before it in the chunk)
    mh = tl.maximum(b_r + tl.maximum(tl.where(carry, m0, fo), tl.load(CM + gbase + rows)), M_FLOOR)
    w = tl.where(carry, tl.exp(b_r + m0 - mh), 0.0) * scale

    # the carried state: q_r (C_start, n_start), weighted by w
    num = tl.zeros([LB, BV], dtype=tl.float32)
    qn = tl.zeros([LB], dtype=tl.float32)
    for k0 in range(0, DQK, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < DQK
        qt = tl.load(qbase + rows[:, None] * sqs + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        Ct = tl.load(CS + cst * DQK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :],
                     other=0.0)
        nt = tl.load(NS + cst * DQK + offs_k, mask=mk, other=0.0)
        num += mm32(qt, Ct, PREC)
        qn += tl.sum(qt.to(tl.float32) * nt[None, :], 1)
    num = num * w[:, None]
    qn = qn * w

    # the chunk's own tokens, one key sub-block at a time up to the diagonal
    for kb in range(0, j + 1):
        cols = c * L + kb * LB + tl.arange(0, LB)
        D = _decay(b_r, tl.load(Bc + gbase + cols), tl.load(IG + gbase + cols), mh, rows, cols, seg_r,
                   tl.load(SEG + gbase + cols))
        Sm = _qk(qbase, kbase, rows, cols, sqs, sks, S, DQK, LB, BK, HALF_DOT, DOT_DT, PREC) * scale * D
        vt = tl.load(vbase + cols[:, None] * svs + offs_v[None, :], mask=(cols < S)[:, None] & mv[None, :], other=0.0)
        num += mm_wide(Sm, vt, WIDE_HALF, PREC)
        qn += tl.sum(Sm, 1)

    floor = tl.exp(-mh)
    den = tl.maximum(tl.abs(qn), floor) + eps
    hv = num / den[:, None]
    out = hoff + rows[:, None] * shs + offs_v[None, :]
    tl.store(H + out, hv.to(H.dtype.element_ty), mask=mr[:, None] & mv[None, :])
    tl.store(H32 + out, hv, mask=mr[:, None] & mv[None, :])
    if pv == 0:
        st = bh * 2 * NC * L + rows
        tl.store(STATS + st, mh)
        tl.store(STATS + st + NC * L, qn)


@triton.jit
def _den_sign(STATS, bh, rows, NCL, eps):
    """(den, sign) of the rows: den = max(|q.n|, exp(-m_hat)) + eps, sign of q.n where it wins, else 0."""
    st = bh * 2 * NCL + rows
    mh = tl.load(STATS + st)
    qn = tl.load(STATS + st + NCL)
    floor = tl.exp(-mh)
    den = tl.maximum(tl.abs(qn), floor) + eps
    sgn = tl.where(qn > floor, 1.0, tl.where(qn < -floor, -1.0, 0.0))
    return mh, den, sgn


@triton.jit
def _bwd_states(
    Q, Bc, FO, DH, BETA, STATS, MS, CS, NS, DCT, DNT, DCS, DNS, DG,
    sqb, sqh, sqs, sdb, sdh, sds,
    S, NH, DQK, DV, NC, BH, scale, eps,
    HAS_DFINAL: tl.constexpr, L: tl.constexpr, LB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pk = tl.program_id(1)
    pv = tl.program_id(2)
    npv = tl.num_programs(2)
    qbase = Q + (bh // NH) * sqb + (bh % NH) * sqh
    dbase = DH + (bh // NH) * sdb + (bh % NH) * sdh
    gbase = bh * NC * L
    offs_k = pk * BK + tl.arange(0, BK)
    offs_v = pv * BV + tl.arange(0, BV)
    mk = offs_k < DQK
    mv = offs_v < DV
    tb = tl.arange(0, LB)
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
        part = tl.sum(tl.sum(dC * tl.load(CS + nxt * DQK * DV + c_off, mask=c_mask, other=0.0), 1), 0)
        if pv == 0:
            tl.store(DNS + nxt * DQK + offs_k, dn, mask=mk)
            part += tl.sum(dn * tl.load(NS + nxt * DQK + offs_k, mask=mk, other=0.0), 0)
        tl.store(DG + ((pk * npv + pv) * BH + bh) * NC + c, part)
        m_start = tl.load(MS + nxt - 1)
        last = gbase + c * L + L - 1
        decay = tl.exp(tl.load(Bc + last) + m_start - tl.load(MS + nxt))
        decay = tl.where(tl.load(FO + last) == float("inf"), decay, 0.0)
        dC = decay * dC
        dn = decay * dn
        for sb in range(0, L, LB):
            rows = c * L + sb + tb
            mr = rows < S
            mh, den, sgn = _den_sign(STATS, bh, rows, NC * L, eps)
            w = tl.exp(tl.load(Bc + gbase + rows) + m_start - mh) * scale
            w = tl.where(tl.load(FO + gbase + rows) == float("inf"), w, 0.0)
            qt = tl.load(qbase + rows[:, None] * sqs + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            a = tl.load(dbase + rows[:, None] * sds + offs_v[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
            qw = qt.to(tl.float32) * w[:, None]
            dC += mm32(tl.trans(qw), a.to(tl.float32) / den[:, None], PREC)
            dn += tl.sum(qw * tl.load(BETA + gbase + rows)[:, None], 0)
    tl.store(DCS + bh * (NC + 1) * DQK * DV + c_off, dC, mask=c_mask)
    if pv == 0:
        tl.store(DNS + bh * (NC + 1) * DQK + offs_k, dn, mask=mk)


@triton.jit
def _bwd_dq(
    Q, K, V, IG, Bc, FO, SEG, DH, BETA, STATS, MS, CS, NS, DQ, QDQ,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, sob, soh, sos,
    S, NH, DQK, DV, NC, scale, eps,
    L: tl.constexpr, LB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HALF_DOT: tl.constexpr, WIDE_HALF: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    """dq of one query sub-block and one d_qk tile; also the partial q . dq of the tile (QDQ)."""
    bh = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    pk = tl.program_id(2)
    NQB: tl.constexpr = L // LB
    c = pid // NQB
    j = pid % NQB
    kbase = K + (bh // NH) * skb + (bh % NH) * skh
    vbase = V + (bh // NH) * svb + (bh % NH) * svh
    dbase = DH + (bh // NH) * sdb + (bh % NH) * sdh
    gbase = bh * NC * L
    rows = c * L + j * LB + tl.arange(0, LB)
    mr = rows < S
    offs_k = pk * BK + tl.arange(0, BK)
    mk = offs_k < DQK
    mh, den, sgn = _den_sign(STATS, bh, rows, NC * L, eps)
    beta = tl.load(BETA + gbase + rows)
    b_r = tl.load(Bc + gbase + rows)
    seg_r = tl.load(SEG + gbase + rows)
    cst = bh * (NC + 1) + c
    w = tl.exp(b_r + tl.load(MS + cst) - mh) * scale
    w = tl.where(tl.load(FO + gbase + rows) == float("inf"), w, 0.0)

    # the carried state: w (a C^T + beta n^T)
    dq = tl.zeros([LB, BK], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        mv = offs_v < DV
        a = tl.load(dbase + rows[:, None] * sds + offs_v[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        Ct = tl.load(CS + cst * DQK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :],
                     other=0.0)
        dq += mm32(a.to(tl.float32) / den[:, None], tl.trans(Ct), PREC)
    n_start = tl.load(NS + cst * DQK + offs_k, mask=mk, other=0.0)
    dq = (dq + beta[:, None] * n_start[None, :]) * w[:, None]

    for kb in range(0, j + 1):
        cols = c * L + kb * LB + tl.arange(0, LB)
        D = _decay(b_r, tl.load(Bc + gbase + cols), tl.load(IG + gbase + cols), mh, rows, cols, seg_r,
                   tl.load(SEG + gbase + cols))
        dS = _av(dbase, vbase, rows, cols, den, sds, svs, S, DV, LB, BV, HALF_DOT, DOT_DT, PREC)
        dSD = (dS + beta[:, None]) * D * scale
        kt = tl.load(kbase + cols[:, None] * sks + offs_k[None, :], mask=(cols < S)[:, None] & mk[None, :], other=0.0)
        dq += mm_wide(dSD, kt, WIDE_HALF, PREC)
    qbase = Q + (bh // NH) * sqb + (bh % NH) * sqh
    qt = tl.load(qbase + rows[:, None] * sqs + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
    tl.store(QDQ + (pk * tl.num_programs(0) + bh) * NC * L + rows, tl.sum(qt.to(tl.float32) * dq, 1))
    out = (bh // NH) * sob + (bh % NH) * soh + rows[:, None] * sos + offs_k[None, :]
    tl.store(DQ + out, dq.to(DQ.dtype.element_ty), mask=mr[:, None] & mk[None, :])


@triton.jit
def _key_block(Bc, IG, SEG, MS, bh, c, kb, NC, S, L: tl.constexpr, LB: tl.constexpr):
    """The key sub-block kb of chunk c in the backward: its positions (cols), their mask, cumulative log
    forget gates, input gates and segment ids, the index of the next chunk's state (nxt), and e, each key's
    weight in the chunk-end state (0 for keys outside the chunk end's segment)."""
    gbase = bh * NC * L
    cols = c * L + kb * LB + tl.arange(0, LB)
    b_s = tl.load(Bc + gbase + cols)
    ig_s = tl.load(IG + gbase + cols)
    seg_s = tl.load(SEG + gbase + cols)
    nxt = bh * (NC + 1) + c + 1
    last = gbase + c * L + L - 1
    e = tl.exp(tl.load(Bc + last) - b_s + ig_s - tl.load(MS + nxt))
    e = tl.where(seg_s == tl.load(SEG + last), e, 0.0)  # only the chunk end's segment enters its state
    return cols, cols < S, b_s, ig_s, seg_s, nxt, e


@triton.jit
def _bwd_dk(
    Q, K, V, IG, Bc, SEG, DH, BETA, STATS, MS, DCS, DNS, DK, KDK,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, sob, soh, sos,
    S, NH, DQK, DV, NC, scale, eps,
    L: tl.constexpr, LB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HALF_DOT: tl.constexpr, WIDE_HALF: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    """dk of one key sub-block and one d_qk tile; also the partial k . dk of the tile (KDK)."""
    bh = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    pk = tl.program_id(2)
    NQB: tl.constexpr = L // LB
    c = pid // NQB
    kb = pid % NQB
    qbase = Q + (bh // NH) * sqb + (bh % NH) * sqh
    kbase = K + (bh // NH) * skb + (bh % NH) * skh
    vbase = V + (bh // NH) * svb + (bh % NH) * svh
    dbase = DH + (bh // NH) * sdb + (bh % NH) * sdh
    gbase = bh * NC * L
    cols, mc, b_s, ig_s, seg_s, nxt, e = _key_block(Bc, IG, SEG, MS, bh, c, kb, NC, S, L, LB)
    offs_k = pk * BK + tl.arange(0, BK)
    mk = offs_k < DQK

    # the state at the chunk's end: e (v dC^T + dn)
    dk = tl.zeros([LB, BK], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        mv = offs_v < DV
        vt = tl.load(vbase + cols[:, None] * svs + offs_v[None, :], mask=mc[:, None] & mv[None, :], other=0.0)
        dCt = tl.load(DCS + nxt * DQK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :],
                      other=0.0)
        dk += mm32(vt, tl.trans(dCt), PREC)
    dn_next = tl.load(DNS + nxt * DQK + offs_k, mask=mk, other=0.0)
    dk = (dk + dn_next[None, :]) * e[:, None]

    for j in range(kb, NQB):
        rows = c * L + j * LB + tl.arange(0, LB)
        mh, den, sgn = _den_sign(STATS, bh, rows, NC * L, eps)
        D = _decay(tl.load(Bc + gbase + rows), b_s, ig_s, mh, rows, cols, tl.load(SEG + gbase + rows), seg_s)
        dS = _av(dbase, vbase, rows, cols, den, sds, svs, S, DV, LB, BV, HALF_DOT, DOT_DT, PREC)
        dSD = (dS + tl.load(BETA + gbase + rows)[:, None]) * D * scale
        qt = tl.load(qbase + rows[:, None] * sqs + offs_k[None, :], mask=(rows < S)[:, None] & mk[None, :], other=0.0)
        dk += mm_wide(tl.trans(dSD), qt, WIDE_HALF, PREC)
    kt = tl.load(kbase + cols[:, None] * sks + offs_k[None, :], mask=mc[:, None] & mk[None, :], other=0.0)
    tl.store(KDK + (pk * tl.num_programs(0) + bh) * NC * L + cols, tl.sum(kt.to(tl.float32) * dk, 1))
    out = (bh // NH) * sob + (bh % NH) * soh + cols[:, None] * sos + offs_k[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=mc[:, None] & mk[None, :])


@triton.jit
def _bwd_dv(
    Q, K, IG, Bc, SEG, DH, STATS, MS, DCS, DVO,
    sqb, sqh, sqs, skb, skh, sks, sdb, sdh, sds, sob, soh, sos,
    S, NH, DQK, DV, NC, scale, eps,
    L: tl.constexpr, LB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HALF_DOT: tl.constexpr, WIDE_HALF: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    """dv of one key sub-block and one d_v tile."""
    bh = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    pv = tl.program_id(2)
    NQB: tl.constexpr = L // LB
    c = pid // NQB
    kb = pid % NQB
    qbase = Q + (bh // NH) * sqb + (bh % NH) * sqh
    kbase = K + (bh // NH) * skb + (bh % NH) * skh
    dbase = DH + (bh // NH) * sdb + (bh % NH) * sdh
    gbase = bh * NC * L
    cols, mc, b_s, ig_s, seg_s, nxt, e = _key_block(Bc, IG, SEG, MS, bh, c, kb, NC, S, L, LB)
    offs_v = pv * BV + tl.arange(0, BV)
    mv = offs_v < DV

    # the state at the chunk's end: e (k dC)
    dv = tl.zeros([LB, BV], dtype=tl.float32)
    for k0 in range(0, DQK, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < DQK
        kt = tl.load(kbase + cols[:, None] * sks + offs_k[None, :], mask=mc[:, None] & mk[None, :], other=0.0)
        dCt = tl.load(DCS + nxt * DQK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :],
                      other=0.0)
        dv += mm32(kt, dCt, PREC)
    dv = dv * e[:, None]

    for j in range(kb, NQB):
        rows = c * L + j * LB + tl.arange(0, LB)
        mh, den, sgn = _den_sign(STATS, bh, rows, NC * L, eps)
        D = _decay(tl.load(Bc + gbase + rows), b_s, ig_s, mh, rows, cols, tl.load(SEG + gbase + rows), seg_s)
        Sm = _qk(qbase, kbase, rows, cols, sqs, sks, S, DQK, LB, BK, HALF_DOT, DOT_DT, PREC) * scale * D
        a = tl.load(dbase + rows[:, None] * sds + offs_v[None, :], mask=(rows < S)[:, None] & mv[None, :], other=0.0)
        a = (a.to(tl.float32) / den[:, None])
        dv += mm_wide(tl.trans(Sm), a, WIDE_HALF, PREC)
    out = (bh // NH) * sob + (bh % NH) * soh + cols[:, None] * sos + offs_v[None, :]
    tl.store(DVO + out, dv.to(DVO.dtype.element_ty), mask=mc[:, None] & mv[None, :])


# ----------------------------------------------------------------------------------------------------------
# launch configurations: fixed under the interpreter, autotuned on a GPU
# ----------------------------------------------------------------------------------------------------------

def _k_tile(dqk: int) -> int:
    """The d_qk tile of the kernels that write per-tile partial sums (fixed, so that their count is known)."""
    return 32 if triton_utils.INTERPRET and not triton_utils.GPU_CONFIGS else min(pow2(dqk), 128)


def _state_tiles(dqk: int, dv: int) -> dict:
    if triton_utils.INTERPRET and not triton_utils.GPU_CONFIGS:
        return {"BK": 32, "BV": 32}
    return {"BK": min(pow2(dqk), 64), "BV": min(pow2(dv), 64)}


def _fits(meta: dict, dqk: int, dv: int, L: int) -> bool:
    return (meta.get("BK", 16) <= pow2(dqk) and meta.get("BV", 16) <= pow2(dv) and meta.get("LB", 16) <= L)


def _pruner(configs, named_args, **kwargs):
    """The configurations whose tiles fit the shape (a sub-block never longer than the chunk)."""
    args = {**named_args, **kwargs}
    keep = [c for c in configs if _fits(c.kwargs, args["DQK"], args["DV"], args["L"])]
    return keep or [c for c in configs if c.kwargs.get("LB", 0) <= args["L"]][:1] or configs[:1]


def _configs(*rows) -> list:
    """Configurations from (tile dict, num_warps, num_stages) rows; the first is the default. Chosen from
    the sm_90 register reports of every candidate (tests/test_triton_compile.py with EVERY_CONFIG=1):
    4-warp variants of the larger tiles spill, these do not in bfloat16."""
    return [triton.Config(dict(t), num_warps=w, num_stages=s) for t, w, s in rows]


_KEY = ["DQK", "DV", "L", "HALF_DOT", "PREC"]
_fwd_states_k = autotune(
    _fwd_states, _configs(({"BK": 64, "BV": 64}, 8, 2), ({"BK": 64, "BV": 64}, 4, 2), ({"BK": 64, "BV": 128}, 8, 2),
                          ({"BK": 128, "BV": 64}, 8, 2)), _KEY, _pruner, {"BK": 32, "BV": 32})
_bwd_states_k = autotune(_bwd_states, _configs(({}, 8, 2), ({}, 8, 1)), _KEY, _pruner, {})
_fwd_out_k = autotune(
    _fwd_out, _configs(({"LB": 64, "BK": 64, "BV": 128}, 8, 2), ({"LB": 64, "BK": 64, "BV": 64}, 8, 2),
                       ({"LB": 32, "BK": 64, "BV": 128}, 8, 2), ({"LB": 64, "BK": 64, "BV": 128}, 8, 3)),
    _KEY, _pruner, {"LB": 16, "BK": 32, "BV": 32})
_bwd_dq_k = autotune(_bwd_dq, _configs(({"LB": 64, "BV": 64}, 8, 2), ({"LB": 32, "BV": 64}, 8, 2)), _KEY, _pruner,
                     {"LB": 16, "BV": 32})
_bwd_dk_k = autotune(_bwd_dk, _configs(({"LB": 64, "BV": 64}, 8, 2), ({"LB": 32, "BV": 64}, 8, 2)), _KEY, _pruner,
                     {"LB": 16, "BV": 32})
_bwd_dv_k = autotune(
    _bwd_dv, _configs(({"LB": 64, "BK": 64, "BV": 64}, 8, 2), ({"LB": 64, "BK": 64, "BV": 128}, 8, 2),
                      ({"LB": 32, "BK": 64, "BV": 64}, 8, 2), ({"LB": 32, "BK": 64, "BV": 64}, 4, 2)),
    _KEY, _pruner, {"LB": 16, "BK": 32, "BV": 32})


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, seq) strides of a (B, NH, S, d) tensor whose last dimension is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)


def _lastdim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _flat_state(t: Optional[torch.Tensor], *shape) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(torch.float32).reshape(*shape).contiguous()


def _run_states(k, v, gates: Gates, C0, n0, m0, L, cfg):
    """The state at every chunk start: CS (BH, NC+1, d_qk, d_v), NS (BH, NC+1, d_qk), MS (BH, NC+1)."""
    B, NH, S, dqk = k.shape
    dv = v.shape[-1]
    BH, NC = B * NH, gates.ig.shape[1] // L
    dev, f32 = k.device, torch.float32
    CS = triton_utils.empty(BH, NC + 1, dqk, dv, device=dev, dtype=f32)
    NS = triton_utils.empty(BH, NC + 1, dqk, device=dev, dtype=f32)
    MS = triton_utils.empty(BH, NC + 1, device=dev, dtype=f32)
    has_state = C0 is not None
    grid = lambda meta: (BH, triton.cdiv(dqk, meta["BK"]), triton.cdiv(dv, meta["BV"]))  # noqa: E731
    _fwd_states_k[grid](
        k, v, *gates, C0 if has_state else CS, n0 if has_state else CS, m0 if has_state else CS, CS, NS, MS,
        *_strides(k), *_strides(v), S, NH, dqk, dv, NC,
        HAS_STATE=has_state, L=L, LB=min(L, 64), **cfg,
    )
    return CS, NS, MS


def mlstm_triton_forward(q, k, v, i, f, C0=None, n0=None, m0=None, chunk_size: Optional[int] = None,
                         eps: float = 1e-6, cu_seqlens: Optional[torch.Tensor] = None):
    """The forward pass without autograd. Shapes as ``mlstm_triton``.

    Returns h (B, NH, S, d_v) in v.dtype, h32 (the same in float32, for the backward), the final C, n, m
    (float32) and STATS (B*NH, 2, NC*L): per token m_hat and q.n, for the backward.
    """
    q, k, v = (_lastdim_contiguous(t) for t in (q, k, v))
    B, NH, S, dqk = q.shape
    dv = v.shape[-1]
    L = chunk_length(chunk_size, S)
    BH = B * NH
    gates = _gate_prep(i, f, L, doc_starts(cu_seqlens, B, S, "mlstm", q.device))
    NC = gates.ig.shape[1] // L
    cfg = dot_config(q.dtype)
    CS, NS, MS = _run_states(k, v, gates, _flat_state(C0, BH, dqk, dv), _flat_state(n0, BH, dqk),
                             _flat_state(m0, BH), L, cfg)
    dev = q.device
    h = triton_utils.empty(B, S, NH, dv, device=dev, dtype=v.dtype).transpose(1, 2)  # (B, NH, S, d_v) view
    h32 = triton_utils.empty(B, S, NH, dv, device=dev, dtype=torch.float32).transpose(1, 2)
    stats = triton_utils.empty(BH, 2, NC * L, device=dev, dtype=torch.float32)
    grid = lambda meta: (BH, NC * (L // meta["LB"]), triton.cdiv(dv, meta["BV"]))  # noqa: E731
    _fwd_out_k[grid](
        q, k, v, *gates, CS, NS, MS, h, h32, stats,
        *_strides(q), *_strides(k), *_strides(v), *_strides(h), S, NH, dqk, dv, NC, dqk**-0.5, eps,
        M_FLOOR=M_FLOOR, L=L, **cfg,
    )
    return (h, h32, CS[:, NC].reshape(B, NH, dqk, dv).clone(), NS[:, NC].reshape(B, NH, dqk).clone(),
            MS[:, NC].reshape(B, NH).clone(), stats)


def mlstm_triton_backward(q, k, v, i, f, C0, n0, m0, h32, stats, dh, dC=None, dn=None,
                          chunk_size: Optional[int] = None, eps: float = 1e-6,
                          cu_seqlens: Optional[torch.Tensor] = None):
    """Gradients (dq, dk, dv, di, df, dC0, dn0) of the forward above; the chunk states are recomputed.

    dh (B, NH, S, d_v) may be any float dtype and strided; dC, dn (gradients of the final C and n) may be
    None. dC0 and dn0 are None without an initial state. Gradients come back in the dtypes of the inputs
    (di, df in the dtypes of i, f).
    """
    q, k, v, dh = (_lastdim_contiguous(t) for t in (q, k, v, dh))
    B, NH, S, dqk = q.shape
    dv = v.shape[-1]
    L = chunk_length(chunk_size, S)
    BH = B * NH
    gates = _gate_prep(i, f, L, doc_starts(cu_seqlens, B, S, "mlstm", q.device))
    ig, b, _, fo, seg = gates
    NC = ig.shape[1] // L
    NCL = NC * L
    cfg = dot_config(q.dtype)
    has_state = C0 is not None
    CS, NS, MS = _run_states(k, v, gates, _flat_state(C0, BH, dqk, dv), _flat_state(n0, BH, dqk),
                             _flat_state(m0, BH), L, cfg)
    dev, f32 = q.device, torch.float32
    scale = dqk**-0.5

    # beta_t = -(dh_t . h_t) / den_t * sign_t, (BH, NC*L) float32
    mh, qn = stats[:, 0], stats[:, 1]
    floor = torch.exp(-mh)
    den = torch.maximum(qn.abs(), floor) + eps
    sgn = torch.where(qn > floor, 1.0, torch.where(qn < -floor, -1.0, 0.0))
    dot = (dh.float() * h32).sum(-1).reshape(BH, S)
    beta = (-F.pad(dot, (0, NCL - S)) / den * sgn).contiguous()

    has_dfinal = dC is not None or dn is not None
    dCT = torch.zeros(BH, dqk, dv, device=dev, dtype=f32) if dC is None else _flat_state(dC, BH, dqk, dv)
    dnT = torch.zeros(BH, dqk, device=dev, dtype=f32) if dn is None else _flat_state(dn, BH, dqk)
    DCS = triton_utils.empty(*CS.shape, device=dev, dtype=f32)
    DNS = triton_utils.empty(*NS.shape, device=dev, dtype=f32)
    st = _state_tiles(dqk, dv)
    npk, npv = triton.cdiv(dqk, st["BK"]), triton.cdiv(dv, st["BV"])
    DG = triton_utils.empty(npk * npv, BH, NC, device=dev, dtype=f32)
    _bwd_states_k[(BH, npk, npv)](
        q, b, fo, dh, beta, stats, MS, CS, NS, dCT, dnT, DCS, DNS, DG,
        *_strides(q), *_strides(dh), S, NH, dqk, dv, NC, BH, scale, eps,
        HAS_DFINAL=has_dfinal, L=L, LB=min(L, 64), PREC=cfg["PREC"], **st,
    )

    dq = triton_utils.empty(B, NH, S, dqk, device=dev, dtype=q.dtype)
    dk = triton_utils.empty(B, NH, S, dqk, device=dev, dtype=k.dtype)
    dvv = triton_utils.empty(B, NH, S, dv, device=dev, dtype=v.dtype)
    BK = _k_tile(dqk)
    npk = triton.cdiv(dqk, BK)
    QDQ = triton_utils.empty(npk, BH, NCL, device=dev, dtype=f32)
    KDK = triton_utils.empty(npk, BH, NCL, device=dev, dtype=f32)
    grid_k = lambda meta: (BH, NC * (L // meta["LB"]), npk)  # noqa: E731
    grid_v = lambda meta: (BH, NC * (L // meta["LB"]), triton.cdiv(dv, meta["BV"]))  # noqa: E731
    common = (S, NH, dqk, dv, NC, scale, eps)
    _bwd_dq_k[grid_k](
        q, k, v, ig, b, fo, seg, dh, beta, stats, MS, CS, NS, dq, QDQ,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dh), *_strides(dq), *common, L=L, BK=BK, **cfg,
    )
    del CS, NS
    _bwd_dk_k[grid_k](
        q, k, v, ig, b, seg, dh, beta, stats, MS, DCS, DNS, dk, KDK,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dh), *_strides(dk), *common, L=L, BK=BK, **cfg,
    )
    _bwd_dv_k[grid_v](
        q, k, ig, b, seg, dh, stats, MS, DCS, dvv,
        *_strides(q), *_strides(k), *_strides(dh), *_strides(dvv), *common, L=L, **cfg,
    )

    # gate gradients: d i_s = k_s . dk_s, d b_t = q_t . dq_t - k_t . dk_t, b_t = sum of log f over (P, t] (or
    # the chunk up to t), plus the chunk end's decay term for its segment; none at segment starts
    kdk = KDK.sum(0)  # (BH, NC*L)
    db = (QDQ.sum(0) - kdk).view(BH, NC, L)
    seg = seg.view(BH, NC, L)
    rst = seg != F.pad(seg.view(BH, NCL)[:, :-1], (1, 0)).view(BH, NC, L)  # segment starts
    end_seg = seg == seg[..., -1:]
    dlogf = _segment_reverse_cumsum(db, rst) + torch.where(end_seg, DG.sum(0)[..., None], 0.0)
    dlogf = torch.where(rst, 0.0, dlogf)
    di = kdk[:, :S].reshape(B, NH, S)
    df = dlogf.view(BH, NCL)[:, :S].reshape(B, NH, S) * torch.sigmoid(-f.float())
    dC0 = DCS[:, 0].reshape(B, NH, dqk, dv).contiguous() if has_state else None
    dn0 = DNS[:, 0].reshape(B, NH, dqk).contiguous() if has_state else None
    return dq, dk, dvv, di.to(i.dtype).contiguous(), df.to(f.dtype).contiguous(), dC0, dn0


# ----------------------------------------------------------------------------------------------------------
# PyTorch custom ops (opaque to torch.compile) and the differentiable entry point
# ----------------------------------------------------------------------------------------------------------

Tensor = torch.Tensor


@torch.library.custom_op("openxlstm::mlstm_chunkwise_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, C0: Optional[Tensor], n0: Optional[Tensor],
            m0: Optional[Tensor], chunk_size: int, eps: float,
            cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """h and h32 come back token-major, (B, S, NH, d_v) contiguous (every output of a custom op is)."""
    h, h32, C, n, m, stats = mlstm_triton_forward(q, k, v, i, f, C0, n0, m0, chunk_size or None, eps, cu_seqlens)
    return h.transpose(1, 2), h32.transpose(1, 2), C, n, m, stats


@_fwd_op.register_fake
def _(q, k, v, i, f, C0, n0, m0, chunk_size, eps, cu_seqlens=None):
    B, NH, S, dqk = q.shape
    dv = v.shape[-1]
    L = chunk_length(chunk_size or None, S)
    NCL = triton.cdiv(S, L) * L
    f32 = torch.float32
    return (q.new_empty(B, S, NH, dv, dtype=v.dtype), q.new_empty(B, S, NH, dv, dtype=f32),
            q.new_empty(B, NH, dqk, dv, dtype=f32), q.new_empty(B, NH, dqk, dtype=f32), q.new_empty(B, NH, dtype=f32),
            q.new_empty(B * NH, 2, NCL, dtype=f32))


@torch.library.custom_op("openxlstm::mlstm_chunkwise_bwd", mutates_args=())
def _bwd_op(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, C0: Optional[Tensor], n0: Optional[Tensor],
            m0: Optional[Tensor], h32: Tensor, stats: Tensor, dh: Tensor, dC: Optional[Tensor], dn: Optional[Tensor],
            chunk_size: int, eps: float,
            cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, di, df, dC0, dn0 = mlstm_triton_backward(q, k, v, i, f, C0, n0, m0, h32, stats, dh, dC, dn,
                                                          chunk_size or None, eps, cu_seqlens)
    if dC0 is None:  # custom ops return tensors: empty ones stand for "no initial state"
        dC0, dn0 = q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, di, df, dC0, dn0


@_bwd_op.register_fake
def _(q, k, v, i, f, C0, n0, m0, h32, stats, dh, dC, dn, chunk_size, eps, cu_seqlens=None):
    f32 = torch.float32
    dC0 = q.new_empty(C0.shape, dtype=f32) if C0 is not None else q.new_empty(0, dtype=f32)
    dn0 = q.new_empty(n0.shape, dtype=f32) if n0 is not None else q.new_empty(0, dtype=f32)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), i.new_empty(i.shape),
            f.new_empty(f.shape), dC0, dn0)


def _setup_context(ctx, inputs, output):
    q, k, v, i, f, C0, n0, m0, chunk_size, eps, cu_seqlens = inputs
    _, h32, _, _, _, stats = output
    ctx.save_for_backward(q, k, v, i, f, C0, n0, m0, h32, stats, cu_seqlens)
    ctx.meta = (chunk_size, eps, C0 is not None)


def _backward(ctx, dh_t, _dh32, dC, dn, _dm, _dstats):
    q, k, v, i, f, C0, n0, m0, h32_t, stats, cu_seqlens = ctx.saved_tensors
    chunk_size, eps, has_state = ctx.meta
    dh = torch.zeros_like(h32_t, dtype=v.dtype) if dh_t is None else dh_t
    dq, dk, dv, di, df, dC0, dn0 = torch.ops.openxlstm.mlstm_chunkwise_bwd(
        q, k, v, i, f, C0, n0, m0, h32_t.transpose(1, 2), stats, dh.transpose(1, 2), dC, dn, chunk_size, eps,
        cu_seqlens)
    if not has_state:
        dC0 = dn0 = None
    return dq, dk, dv, di, df, dC0, dn0, None, None, None, None


torch.library.register_autograd("openxlstm::mlstm_chunkwise_fwd", _backward, setup_context=_setup_context)


def mlstm_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: Optional[tuple] = None,
    chunk_size: Optional[int] = None,
    eps: float = 1e-6,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, mLSTMState]:
    """The mLSTM over a sequence with the chunkwise Triton kernels (differentiable).

    q, k: (B, NH, S, d_qk); v: (B, NH, S, d_v); i, f: (B, NH, S) (strided views are fine); state: None or
    (C (B, NH, d_qk, d_v), n (B, NH, d_qk), m (B, NH)), read as float32 and never modified; gradients reach C
    and n (not m). chunk_size (the state chunk L) is rounded to a power of two in [16, 256], default 256:
    the result does not depend on it beyond rounding. cu_seqlens: packed documents (``openxlstm.ops.varlen``).
    Returns h (B, NH, S, d_v) in v.dtype and the final float32 state (m a constant: ``mlstm`` adds its
    gradient). Float64 inputs keep their float64 conventions: they go to the plain-PyTorch chunkwise form.
    """
    if q.dtype == torch.float64:
        from .chunkwise import mlstm_chunkwise
        from .common import initial_state

        st = initial_state(state, *q.shape[:2], q.shape[3], v.shape[3], torch.float64, q.device)
        starts = doc_starts(cu_seqlens, q.shape[0], q.shape[2], "mlstm", q.device)
        return mlstm_chunkwise(q, k, v, i, f, st, chunk_size or 64, eps, starts)
    C0 = n0 = m0 = None
    if state is not None:
        C0, n0, m0 = (t.to(device=q.device, dtype=torch.float32) for t in state)
        m0 = m0.detach()
    h_t, _, C, n, m, _ = torch.ops.openxlstm.mlstm_chunkwise_fwd(q, k, v, i, f, C0, n0, m0, chunk_size or 0, eps,
                                                                  cu_seqlens)
    return h_t.transpose(1, 2), mLSTMState(C, n, m)


__all__ = ["mlstm_triton", "mlstm_triton_forward", "mlstm_triton_backward", "chunk_length", "DEFAULT_CHUNK"]


def compile_specs(half: bool, every_config: bool = False) -> list[tuple]:
    """(kernel, constexprs, names of the half-precision pointer arguments, num_warps, num_stages) of each
    kernel as the GPU launches it at d_qk 128, d_v 256, for compiling ahead of time for sm_90 without a GPU
    (tests/test_triton_compile.py): the first autotuning configuration of each, or all of them."""
    cfg = {"HALF_DOT": half, "WIDE_HALF": half, "DOT_DT": tl.bfloat16 if half else tl.float32,
           "PREC": "tf32" if half else "ieee"}
    halves = {"Q", "K", "V", "DH", "H", "DQ", "DK", "DVO"} if half else set()
    L, dqk, dv = 256, 128, 256
    specs = []
    for kernel, extra, dims in (
        (_fwd_states_k, dict(HAS_STATE=True, LB=64, **cfg), {}),
        (_bwd_states_k, dict(HAS_DFINAL=True, LB=64, PREC=cfg["PREC"], **_state_tiles(dqk, dv)), {}),
        (_fwd_out_k, dict(M_FLOOR=M_FLOOR, **cfg), {}),
        (_bwd_dq_k, dict(BK=_k_tile(dqk), **cfg), {}),
        (_bwd_dk_k, dict(BK=_k_tile(dqk), **cfg), {}),
        (_bwd_dv_k, dict(**cfg), {}),
    ):
        configs = _pruner(kernel.configs, {"DQK": dqk, "DV": dv}, L=L)
        for c in configs if every_config else configs[:1]:
            specs.append((kernel.fn, {"L": L, **extra, **c.kwargs}, halves, c.num_warps, c.num_stages))
    return specs
