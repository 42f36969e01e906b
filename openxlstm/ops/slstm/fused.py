"""The sLSTM with a hand-written backward pass (plain PyTorch, any device): the fast CPU path.

The forward runs the time loop without recording an autograd graph and keeps the states; the backward
walks the sequence in reverse (backpropagation through time) with one small matmul per step and computes
the weight gradients for all steps at once. Same maths as ``recurrent.py`` (which the tests compare it to).
Both loops are PyTorch custom ops (``openxlstm::slstm_fused_fwd`` / ``_bwd``): torch.compile sees one
operation each instead of unrolling S time steps into its graph.
"""

from __future__ import annotations

import torch

from .common import sLSTMState
from .recurrent import log_forget, recurrent_preact


Tensor = torch.Tensor


@torch.library.custom_op("openxlstm::slstm_fused_fwd", mutates_args=())
def _forward_op(x: Tensor, R: Tensor, b: Tensor, h0: Tensor, c0: Tensor, n0: Tensor, m0: Tensor,
                exp_forget: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, S, E = x.shape[0], x.shape[1], h0.shape[1]
    with torch.no_grad():
        return _forward(x.view(B, S, 4, E), R, b.view(4, E), sLSTMState(h0, c0, n0, m0),
                        "exp" if exp_forget else "sigmoid")


@_forward_op.register_fake
def _(x, R, b, h0, c0, n0, m0, exp_forget):
    B, S, E = x.shape[0], x.shape[1], h0.shape[1]
    hs = x.new_empty(S + 1, B, E)
    return hs, torch.empty_like(hs), torch.empty_like(hs), torch.empty_like(hs), x.new_empty(S, 5, B, E)


def _forward(x, R, b, state: sLSTMState, forget_gate: str):
    """Run the recurrence; returns all states (S+1, B, E) x4 and the gate activations needed by backward."""
    B, S = x.shape[:2]
    E = state.h.shape[1]
    hs = x.new_empty(S + 1, B, E)
    cs, ns, ms = torch.empty_like(hs), torch.empty_like(hs), torch.empty_like(hs)
    acts = x.new_empty(S, 5, B, E)  # i', f', tanh z, sigmoid o, d log f / d f
    hs[0], cs[0], ns[0], ms[0] = state
    h, c, n, m = state
    for t in range(S):
        pre = x[:, t] + recurrent_preact(h, R) + b
        i, f, z, o = pre.unbind(1)
        logf = log_forget(f, forget_gate)
        m_new = torch.where(n == 0, i, torch.maximum(i, logf + m))
        i_act = torch.exp(i - m_new)
        f_act = torch.exp(logf + m - m_new)
        tz = torch.tanh(z)
        so = torch.sigmoid(o)
        c = f_act * c + i_act * tz
        n = f_act * n + i_act
        h = so * c / n
        m = m_new
        hs[t + 1], cs[t + 1], ns[t + 1], ms[t + 1] = h, c, n, m
        a = acts[t]
        a[0], a[1], a[2], a[3] = i_act, f_act, tz, so
        a[4] = torch.sigmoid(-f) if forget_gate == "sigmoid" else 1.0
    return hs, cs, ns, ms, acts


@torch.library.custom_op("openxlstm::slstm_fused_bwd", mutates_args=())
def _backward_op(R: Tensor, hs: Tensor, cs: Tensor, ns: Tensor, acts: Tensor, d_out: Tensor, d_h: Tensor,
                 d_c: Tensor, d_n: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backpropagation through time: (dx (B, S, 4E), dR, db, dh0, dc0, dn0) from the saved states."""
    S, B, E = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    NH, d = R.shape[0], R.shape[1]
    dh_rec, dc, dn = d_h.clone(memory_format=torch.contiguous_format), d_c.contiguous().clone(), d_n.contiguous().clone()
    dpre = hs.new_empty(S, B, 4, E)
    R_t = R.reshape(NH, d, 4 * d)  # [head, input, (gate, output)]
    for t in range(S - 1, -1, -1):
        i_act, f_act, tz, so, dlogf_df = acts[t]
        c, n = cs[t + 1], ns[t + 1]
        dh = d_out[:, t] + dh_rec
        inv_n = 1.0 / n
        d_so = dh * c * inv_n
        dc = dc + dh * so * inv_n
        dn = dn - dh * so * c * inv_n * inv_n
        g = dpre[t]
        g[:, 0] = (dc * tz + dn) * i_act  # d i
        g[:, 1] = (dc * cs[t] + dn * ns[t]) * f_act * dlogf_df  # d f
        g[:, 2] = dc * i_act * (1.0 - tz * tz)  # d z
        g[:, 3] = d_so * so * (1.0 - so)  # d o
        dc = dc * f_act
        dn = dn * f_act
        # dh_{t-1}[b, h, i] = sum_{g, o} R[h, i, g, o] * dpre[b, g, h, o]
        g_heads = g.view(B, 4, NH, d).permute(2, 0, 1, 3).reshape(NH, B, 4 * d)
        dh_rec = torch.bmm(g_heads, R_t.transpose(1, 2)).permute(1, 0, 2).reshape(B, E)
    h_prev = hs[:-1].reshape(S * B, NH, d)
    g_all = dpre.reshape(S * B, 4, NH, d)
    dR = torch.einsum("khi,kgho->higo", h_prev, g_all).contiguous()
    db = dpre.sum(dim=(0, 1)).reshape(4 * E)
    dx = dpre.view(S, B, 4 * E).transpose(0, 1).contiguous()  # (B, S, 4E)
    return dx, dR, db, dh_rec, dc, dn


@_backward_op.register_fake
def _(R, hs, cs, ns, acts, d_out, d_h, d_c, d_n):
    S, B, E = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    return (hs.new_empty(B, S, 4 * E), R.new_empty(R.shape), hs.new_empty(4 * E),
            hs.new_empty(B, E), hs.new_empty(B, E), hs.new_empty(B, E))


class _sLSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, R, b, h0, c0, n0, m0, forget_gate):
        hs, cs, ns, ms, acts = torch.ops.openxlstm.slstm_fused_fwd(x, R, b, h0, c0, n0, m0, forget_gate == "exp")
        ctx.save_for_backward(R, hs, cs, ns, acts)
        m_last = ms[-1].clone()
        ctx.mark_non_differentiable(m_last)
        return hs[1:].transpose(0, 1).contiguous(), hs[-1].clone(), cs[-1].clone(), ns[-1].clone(), m_last

    @staticmethod
    def backward(ctx, d_out, d_h, d_c, d_n, d_m):
        R, hs, cs, ns, acts = ctx.saved_tensors
        S, B, E = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
        zeros = hs.new_zeros(B, E)
        d_out = d_out if d_out is not None else hs.new_zeros(B, S, E)
        dx, dR, db, dh0, dc0, dn0 = torch.ops.openxlstm.slstm_fused_bwd(
            R, hs, cs, ns, acts, d_out, zeros if d_h is None else d_h, zeros if d_c is None else d_c,
            zeros if d_n is None else d_n)
        return dx, dR, db, dh0, dc0, dn0, None, None


def slstm_fused(x, R, b, state: sLSTMState, forget_gate: str = "sigmoid") -> tuple[torch.Tensor, sLSTMState]:
    """x: (B, S, 4*E) in the state dtype; R: (NH, d, 4, d); b: (4*E,). Returns h (B, S, E), final state."""
    out, h, c, n, m = _sLSTMFunction.apply(x, R, b, *state[:3], state.m.detach(), forget_gate)
    return out, sLSTMState(h, c, n, m)


__all__ = ["slstm_fused"]
