"""The sLSTM as fused Triton kernels: the whole time loop in one launch, forward and backward, for CUDA.

Same maths as ``recurrent.py`` / ``fused.py`` (see ``common.py`` for layouts): per head of width d,
[i, f, z, o]_t = x_t + R h_{t-1} + b; m_t = max(log f_t + m_{t-1}, i_t), or m_t = i_t where n_{t-1} == 0
(per element); c_t = f' c_{t-1} + i' tanh(z_t), n_t = f' n_{t-1} + i', h_t = sigmoid(o_t) c_t / n_t;
no gradient through m. Gate maths and states are float32 whatever the dtype of x.

One program owns a tile of BB batch rows (BB >= 16, the smallest ``tl.dot`` side) and one head, and runs
every time step. Each step multiplies h_{t-1} (BB, d) by the head's R block (d, 4d), one gate at a time
in tiles of KC rows of R (the block stays hot in L1/L2; d up to 256 would not fit in registers), reading
h_{t-1} back from the sequence of hidden states the kernel writes (HS, (S+1, B, E) float32) after a CTA
barrier; loads of data written in the same launch bypass L1 (cache modifier ".cg"). Values that cross
threads or steps (pre-activations, c, n, m) go through the buffers the backward needs anyway (PRE, CS, NS,
MS), which keeps register pressure down (sm_90 ptxas: a register-resident step at d = 256 spills several
KB per thread; this layout a few hundred bytes; tuning on a GPU is pending).

The backward walks the sequence in reverse in the same layout: the per-step gate gradients (the gradient
of x) and dh_{t-1} = R (gate gradients), exchanged through a double buffer (2, B, E) and a barrier. The
weight gradients dR = sum_t h_{t-1} (gate gradients)^T and db are one batched matmul / sum afterwards.

Packed documents (HAS_RST, a (B, S) int8 array of document starts from ``cu_seqlens``): at a start the step
reads a zero state (masked loads) and the backward hands nothing back across it. The gradient of the
returned stabilizer (HAS_DM, see ``recurrent.py``) runs back along m's recurrence: to the input gate where
it won the max (m_t == i_t), else to the forget gate and on to m_{t-1}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from typing import Optional

from .. import triton_utils
from ..triton_utils import dot_config, logsigmoid, mm32, pow2, sigmoid, tanh
from ..varlen import doc_starts
from .common import sLSTMState
from .fused import slstm_fused, stabilizer_grad


@triton.jit
def _slstm_fwd(
    X, R, Bias, Y, HS, CS, NS, MS, PRE, RST,
    B, S, D, E,
    EXP_FORGET: tl.constexpr, HAS_RST: tl.constexpr, BB: tl.constexpr, DP: tl.constexpr, KC: tl.constexpr,
    PREC: tl.constexpr,
):
    pb = tl.program_id(0)
    head = tl.program_id(1)
    rows = pb * BB + tl.arange(0, BB)
    mb = rows < B
    offs_o = tl.arange(0, DP)
    mo = offs_o < D
    mask = mb[:, None] & mo[None, :]
    col = head * D + offs_o
    st = rows[:, None] * E + col[None, :]  # (BB, DP) offsets into a (B, E) state
    BE = B * E
    for t in range(S):
        t64 = tl.cast(t, tl.int64)
        HS_t = HS + t64 * BE
        PRE_t = PRE + t64 * BE * 4
        X_t = X + t64 * 4 * E
        mbk = mb  # rows that read the stored previous state (not a document start)
        if HAS_RST:
            mbk = mb & (tl.load(RST + rows * S + t, mask=mb, other=0) == 0)
        # Gate pre-activations one gate at a time (one accumulator live), parked in PRE.
        pre = rows[:, None] * (4 * E) + col[None, :]
        x_off = rows[:, None] * (S * 4 * E) + col[None, :]
        for g in tl.static_range(4):
            acc = tl.load(X_t + x_off + g * E, mask=mask, other=0.0).to(tl.float32)
            acc += tl.load(Bias + g * E + col, mask=mo, other=0.0).to(tl.float32)[None, :]
            for k0 in range(0, D, KC):
                offs_k = k0 + tl.arange(0, KC)
                mk = offs_k < D
                hk = tl.load(HS_t + rows[:, None] * E + head * D + offs_k[None, :],
                             mask=mbk[:, None] & mk[None, :], other=0.0, cache_modifier=".cg")
                rt = tl.load(R + ((head * D + offs_k[:, None]) * 4 + g) * D + offs_o[None, :],
                             mask=mk[:, None] & mo[None, :], other=0.0)
                acc += mm32(hk, rt, PREC)
            tl.store(PRE_t + pre + g * E, acc, mask=mask)
        tl.debug_barrier()
        p_i = tl.load(PRE_t + pre, mask=mask, other=0.0, cache_modifier=".cg")
        p_f = tl.load(PRE_t + pre + E, mask=mask, other=0.0, cache_modifier=".cg")
        prev = mbk[:, None] & mo[None, :]
        c = tl.load(CS + t64 * BE + st, mask=prev, other=0.0, cache_modifier=".cg")
        n = tl.load(NS + t64 * BE + st, mask=prev, other=0.0, cache_modifier=".cg")
        m = tl.load(MS + t64 * BE + st, mask=prev, other=0.0, cache_modifier=".cg")
        if EXP_FORGET:
            logf = p_f
        else:
            logf = logsigmoid(p_f)
        m_new = tl.where(n == 0.0, p_i, tl.maximum(p_i, logf + m))
        ia = tl.exp(p_i - m_new)
        fa = tl.exp(logf + m - m_new)
        tz = tanh(tl.load(PRE_t + pre + 2 * E, mask=mask, other=0.0, cache_modifier=".cg"))
        so = sigmoid(tl.load(PRE_t + pre + 3 * E, mask=mask, other=0.0, cache_modifier=".cg"))
        c = fa * c + ia * tz
        n = fa * n + ia
        h = so * c / n
        nxt = (t64 + 1) * BE
        tl.store(CS + nxt + st, c, mask=mask)
        tl.store(NS + nxt + st, n, mask=mask)
        tl.store(MS + nxt + st, m_new, mask=mask)
        tl.store(Y + t64 * E + rows[:, None] * (S * E) + col[None, :], h.to(Y.dtype.element_ty), mask=mask)
        tl.store(HS + nxt + st, h, mask=mask)
        tl.debug_barrier()


@triton.jit
def _slstm_bwd(
    R, DY, HS, CS, NS, MS, PRE, DX, DHR, DC, DN, DM, RST,
    B, S, D, E,
    EXP_FORGET: tl.constexpr, HAS_RST: tl.constexpr, HAS_DM: tl.constexpr, BB: tl.constexpr, DP: tl.constexpr,
    KC: tl.constexpr, PREC: tl.constexpr,
):
    pb = tl.program_id(0)
    head = tl.program_id(1)
    rows = pb * BB + tl.arange(0, BB)
    mb = rows < B
    offs_o = tl.arange(0, DP)
    mo = offs_o < D
    mask = mb[:, None] & mo[None, :]
    col = head * D + offs_o
    st = rows[:, None] * E + col[None, :]
    BE = B * E
    dc = tl.load(DC + st, mask=mask, other=0.0)
    dn = tl.load(DN + st, mask=mask, other=0.0)
    dm = tl.zeros([BB, DP], dtype=tl.float32)
    if HAS_DM:
        dm = tl.load(DM + st, mask=mask, other=0.0)
    for tt in range(S):
        t = S - 1 - tt
        t64 = tl.cast(t, tl.int64)
        keep = mb  # rows whose step read the stored previous state (not a document start)
        if HAS_RST:
            keep = mb & (tl.load(RST + rows * S + t, mask=mb, other=0) == 0)
        prev = keep[:, None] & mo[None, :]
        dh = tl.load(DHR + ((t + 1) % 2) * BE + st, mask=mask, other=0.0, cache_modifier=".cg")
        dh += tl.load(DY + t64 * E + rows[:, None] * (S * E) + col[None, :], mask=mask, other=0.0).to(tl.float32)
        PRE_t = PRE + t64 * BE * 4
        pre = rows[:, None] * (4 * E) + col[None, :]
        p_i = tl.load(PRE_t + pre, mask=mask, other=0.0)
        p_f = tl.load(PRE_t + pre + E, mask=mask, other=0.0)
        p_z = tl.load(PRE_t + pre + 2 * E, mask=mask, other=0.0)
        p_o = tl.load(PRE_t + pre + 3 * E, mask=mask, other=0.0)
        cur = (t64 + 1) * BE
        prv = t64 * BE
        c_t = tl.load(CS + cur + st, mask=mask, other=0.0)
        n_t = tl.load(NS + cur + st, mask=mask, other=1.0)
        m_t = tl.load(MS + cur + st, mask=mask, other=0.0)
        c_p = tl.load(CS + prv + st, mask=prev, other=0.0)
        n_p = tl.load(NS + prv + st, mask=prev, other=0.0)
        m_p = tl.load(MS + prv + st, mask=prev, other=0.0)
        if EXP_FORGET:
            logf = p_f
            dlogf = tl.full([BB, DP], 1.0, tl.float32)
        else:
            logf = logsigmoid(p_f)
            dlogf = sigmoid(-p_f)
        ia = tl.exp(p_i - m_t)
        fa = tl.exp(logf + m_p - m_t)
        tz = tanh(p_z)
        so = sigmoid(p_o)
        inv_n = 1.0 / n_t
        dc += dh * so * inv_n
        dn -= dh * so * c_t * inv_n * inv_n
        DX_t = DX + t64 * 4 * E
        x_off = rows[:, None] * (S * 4 * E) + col[None, :]
        d_i = (dc * tz + dn) * ia
        d_f = (dc * c_p + dn * n_p) * fa * dlogf
        if HAS_DM:  # m_t = i_t where the input gate won the max, else log f_t + m_{t-1}
            won = m_t == p_i
            d_i += tl.where(won, dm, 0.0)
            d_f += tl.where(won, 0.0, dm) * dlogf
            dm = tl.where(won | ~prev, 0.0, dm)
        tl.store(DX_t + x_off, tl.where(mask, d_i, 0.0), mask=mask)
        tl.store(DX_t + x_off + E, tl.where(mask, d_f, 0.0), mask=mask)
        tl.store(DX_t + x_off + 2 * E, tl.where(mask, dc * ia * (1.0 - tz * tz), 0.0), mask=mask)
        tl.store(DX_t + x_off + 3 * E, tl.where(mask, dh * c_t * inv_n * so * (1.0 - so), 0.0), mask=mask)
        dc = tl.where(prev, dc * fa, 0.0)
        dn = tl.where(prev, dn * fa, 0.0)
        tl.debug_barrier()
        # dh_{t-1}[:, k] = sum_g (gate gradients g) @ R[head, k, g, :]^T, in tiles of KC output units k;
        # the gate gradients are read back from DX one gate at a time (few registers live).
        for k0 in range(0, D, KC):
            offs_k = k0 + tl.arange(0, KC)
            mk = offs_k < D
            acc = tl.zeros([BB, KC], dtype=tl.float32)
            for g in tl.static_range(4):
                gg = tl.load(DX_t + x_off + g * E, mask=mask, other=0.0, cache_modifier=".cg")
                rt = tl.load(R + ((head * D + offs_k[None, :]) * 4 + g) * D + offs_o[:, None],
                             mask=mo[:, None] & mk[None, :], other=0.0)  # (DP, KC): R^T tile
                acc += mm32(gg, rt, PREC)
            tl.store(DHR + (t % 2) * BE + rows[:, None] * E + head * D + offs_k[None, :],
                     tl.where(keep[:, None], acc, 0.0), mask=mb[:, None] & mk[None, :])
        tl.debug_barrier()
    tl.store(DC + st, dc, mask=mask)
    tl.store(DN + st, dn, mask=mask)
    if HAS_DM:
        tl.store(DM + st, dm, mask=mask)


def _config(d: int, backward: bool) -> dict:
    """Launch parameters: batch tile BB (16: more batch tiles, more programs), padded head width DP, R tile
    KC, warps, no software pipelining.

    Chosen from sm_90 register reports (ptxas) of the two kernels: each (BB, DP) float32 value costs
    BB * DP / threads registers, and the pointwise phase keeps a dozen of them live, so wide heads need
    many warps; pipelining the R-tile loads (num_stages > 1) only adds registers to a latency-bound loop.
    """
    DP = pow2(d, 16)
    if DP <= 32:
        warps, KC = 4, DP
    elif DP <= 128:
        warps, KC = 8, 32
    elif backward:
        warps, KC = 8, 32
    else:
        warps, KC = 16, 16
    return {"BB": 16, "DP": DP, "KC": KC, "num_warps": warps, "num_stages": 1}


Tensor = torch.Tensor


def _starts_i8(cu_seqlens: Optional[Tensor], B: int, S: int, like: Tensor) -> tuple[Tensor, bool]:
    """(B, S) int8 document starts for the kernels (a dummy when there are none) and whether there are any."""
    starts = doc_starts(cu_seqlens, B, S, "slstm", like.device)
    return (like.new_zeros(1, dtype=torch.int8), False) if starts is None else (starts.to(torch.int8), True)


@torch.library.custom_op("openxlstm::slstm_triton_fwd", mutates_args=())
def _fwd_op(x: Tensor, R: Tensor, b: Tensor, h0: Tensor, c0: Tensor, n0: Tensor, m0: Tensor,
            exp_forget: bool, cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                              Tensor]:
    """y (B, S, E) in x.dtype, and HS, CS, NS, MS (S+1, B, E), PRE (S, B, 4, E) float32 for the backward."""
    B, S = x.shape[:2]
    NH, d = R.shape[0], R.shape[1]
    E = NH * d
    dev, f32 = x.device, torch.float32
    cfg = _config(d, backward=False)
    HS = triton_utils.empty(S + 1, B, E, device=dev, dtype=f32)
    CS, NS, MS = (triton_utils.empty(S + 1, B, E, device=dev, dtype=f32) for _ in range(3))
    for buf, init in ((HS, h0), (CS, c0), (NS, n0), (MS, m0)):
        buf[0] = init
    PRE = triton_utils.empty(S, B, 4, E, device=dev, dtype=f32)
    y = triton_utils.empty(B, S, E, device=dev, dtype=x.dtype)
    rst, has_rst = _starts_i8(cu_seqlens, B, S, x)
    _slstm_fwd[(triton.cdiv(B, cfg["BB"]), NH)](
        x, R, b, y, HS, CS, NS, MS, PRE, rst, B, S, d, E,
        EXP_FORGET=exp_forget, HAS_RST=has_rst, PREC=dot_config(x.dtype)["PREC"], **cfg,
    )
    return y, HS, CS, NS, MS, PRE


@_fwd_op.register_fake
def _(x, R, b, h0, c0, n0, m0, exp_forget, cu_seqlens=None):
    B, S = x.shape[:2]
    E = R.shape[0] * R.shape[1]
    st = x.new_empty(S + 1, B, E, dtype=torch.float32)
    return (x.new_empty(B, S, E), st, torch.empty_like(st), torch.empty_like(st), torch.empty_like(st),
            x.new_empty(S, B, 4, E, dtype=torch.float32))


@torch.library.custom_op("openxlstm::slstm_triton_bwd", mutates_args=())
def _bwd_op(R: Tensor, HS: Tensor, CS: Tensor, NS: Tensor, MS: Tensor, PRE: Tensor, dy: Tensor, dh_last: Tensor,
            dc_last: Tensor, dn_last: Tensor, exp_forget: bool, half: bool, dm_last: Optional[Tensor] = None,
            cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx (B, S, 4E), dR, db, dh0, dc0, dn0, dm0), all float32; dm_last: the gradient of the final stabilizer's
    recurrence (None: none, dm0 comes back as zeros)."""
    S1, B, E = HS.shape
    S = S1 - 1
    NH, d = R.shape[0], R.shape[1]
    dev, f32 = HS.device, torch.float32
    cfg = _config(d, backward=True)
    DHR = torch.zeros(2, B, E, device=dev, dtype=f32)
    DHR[S % 2] = dh_last
    DC = dc_last.float().clone()
    DN = dn_last.float().clone()
    DM = torch.zeros(B, E, device=dev, dtype=f32) if dm_last is None else dm_last.float().clone()
    DX = triton_utils.empty(B, S, 4 * E, device=dev, dtype=f32)
    rst, has_rst = _starts_i8(cu_seqlens, B, S, HS)
    _slstm_bwd[(triton.cdiv(B, cfg["BB"]), NH)](
        R, dy.contiguous(), HS, CS, NS, MS, PRE, DX, DHR, DC, DN, DM, rst, B, S, d, E,
        EXP_FORGET=exp_forget, HAS_RST=has_rst, HAS_DM=dm_last is not None, PREC="tf32" if half else "ieee", **cfg,
    )
    h_prev = HS[:S]  # (S, B, E): the h each step read (zeros at document starts)
    if has_rst:
        h_prev = torch.where(rst.T[..., None].bool(), 0.0, h_prev)
    dR = torch.einsum("tbhi,btgho->higo", h_prev.reshape(S, B, NH, d), DX.view(B, S, 4, NH, d)).contiguous()
    return DX, dR, DX.sum(dim=(0, 1)), DHR[0].clone(), DC.contiguous(), DN.contiguous(), DM


@_bwd_op.register_fake
def _(R, HS, CS, NS, MS, PRE, dy, dh_last, dc_last, dn_last, exp_forget, half, dm_last=None, cu_seqlens=None):
    S1, B, E = HS.shape
    f32 = torch.float32
    return (HS.new_empty(B, S1 - 1, 4 * E), R.new_empty(R.shape, dtype=f32), HS.new_empty(4 * E),
            HS.new_empty(B, E), HS.new_empty(B, E), HS.new_empty(B, E), HS.new_empty(B, E))


class _SLSTMTritonFn(torch.autograd.Function):
    """x (B, S, 4E), R (NH, d, 4, d), b (4E,), h0, c0, n0, m0 (B, E) float32 -> y, h, c, n, m."""

    @staticmethod
    def forward(ctx, x, R, b, h0, c0, n0, m0, forget_gate, cu_seqlens):
        S = x.shape[1]
        Rc = R.contiguous()
        y, HS, CS, NS, MS, PRE = torch.ops.openxlstm.slstm_triton_fwd(x, Rc, b.contiguous(), h0, c0, n0, m0,
                                                                     forget_gate == "exp", cu_seqlens)
        ctx.save_for_backward(Rc, HS, CS, NS, MS, PRE, cu_seqlens)
        ctx.meta = (forget_gate, x.dtype, R.dtype, b.dtype)
        ctx.set_materialize_grads(False)
        return y, HS[S].clone(), CS[S].clone(), NS[S].clone(), MS[S].clone()

    @staticmethod
    def backward(ctx, dy, dh_last, dc_last, dn_last, dm_last):
        Rc, HS, CS, NS, MS, PRE, cu_seqlens = ctx.saved_tensors
        forget_gate, x_dtype, R_dtype, b_dtype = ctx.meta
        S1, B, E = HS.shape
        zeros = HS.new_zeros(B, E)
        dy = HS.new_zeros(B, S1 - 1, E) if dy is None else dy
        dm = stabilizer_grad(dc_last, dn_last, dm_last, CS[-1], NS[-1])
        dx, dR, db, dh0, dc0, dn0, dm0 = torch.ops.openxlstm.slstm_triton_bwd(
            Rc, HS, CS, NS, MS, PRE, dy, zeros if dh_last is None else dh_last,
            zeros if dc_last is None else dc_last, zeros if dn_last is None else dn_last, forget_gate == "exp",
            x_dtype in (torch.bfloat16, torch.float16), dm, cu_seqlens)
        dm0 = dm0 + dc0 * CS[0] + dn0 * NS[0]  # m0 enters as exp(m0) on c0 and n0
        return dx.to(x_dtype), dR.to(R_dtype), db.to(b_dtype), dh0, dc0, dn0, dm0, None, None


def slstm_triton(x, R, b, state: sLSTMState, forget_gate: str = "sigmoid",
                 cu_seqlens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, sLSTMState]:
    """The sLSTM over a sequence with the fused Triton kernels (differentiable).

    x: (B, S, 4E) gate pre-activations [i | f | z | o] (float32 or half); R: (NH, d, 4, d); b: (4E,);
    state: (h, c, n, m), each (B, E), read as float32 and never modified; cu_seqlens: packed documents or
    None. Gradients reach x, R, b and the initial state (as in ``recurrent.py``). Returns h (B, S, E) in
    x.dtype and the final float32 state. Float64 inputs keep their float64 conventions through the
    plain-PyTorch fused backend.
    """
    if x.dtype == torch.float64:
        return slstm_fused(x, R.double(), b.double(), sLSTMState(*(t.double() for t in state)), forget_gate,
                           cu_seqlens)
    if x.numel() >= 2**31:
        raise ValueError("slstm_triton: x must have fewer than 2**31 elements (32-bit in-tile offsets); "
                         "split the batch")
    x = x.contiguous()
    h0, c0, n0, m0 = (t.to(device=x.device, dtype=torch.float32) for t in state)
    y, h, c, n, m = _SLSTMTritonFn.apply(x, R, b, h0, c0, n0, m0, forget_gate, cu_seqlens)
    return y, sLSTMState(h, c, n, m)


__all__ = ["slstm_triton"]
