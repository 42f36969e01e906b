"""The mLSTM as a recurrence: one token at a time. The readable specification, and the decode step.

Cost O(d_qk * d_v) per token and head; the state is the whole memory. See ``common.py`` for conventions.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .common import M_FLOOR, mLSTMState


def mlstm_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: mLSTMState,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, mLSTMState]:
    """One recurrent step for a batch of single tokens.

    q, k: (B, NH, d_qk); v: (B, NH, d_v); i, f: (B, NH); state in the state dtype.
    Returns h (B, NH, d_v) in the state dtype and the new state (fresh tensors).
    """
    C, n, m = state
    dt = C.dtype
    q, k, v, i, f = (t.to(dt) for t in (q, k, v, i, f))
    logf = F.logsigmoid(f)  # (B, NH)
    m_new = torch.maximum(logf.detach() + m.detach(), i.detach())  # (B, NH), no gradient through m
    f_act = torch.exp(logf + m.detach() - m_new)  # (B, NH), <= 1
    i_act = torch.exp(i - m_new)  # (B, NH), <= 1
    C_new = f_act[..., None, None] * C + i_act[..., None, None] * (k[..., :, None] * v[..., None, :])
    n_new = f_act[..., None] * n + i_act[..., None] * k
    m_hat = m_new.clamp(min=M_FLOOR)
    scale = torch.exp(m_new - m_hat)  # (B, NH), <= 1
    q_s = q * (q.shape[-1] ** -0.5)
    num = torch.einsum("bhd,bhde->bhe", q_s, C_new) * scale[..., None]  # (B, NH, d_v)
    qn = (q_s * n_new).sum(-1) * scale  # (B, NH)
    den = torch.maximum(qn.abs(), torch.exp(-m_hat)) + eps
    return num / den[..., None], mLSTMState(C_new, n_new, m_new)


def mlstm_step_inference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                         state: mLSTMState, eps: float = 1e-6) -> tuple[torch.Tensor, mLSTMState]:
    """``mlstm_step`` for generation, without autograd, in fewer ops: the same maths, intermediate results
    updated in place (none of them is a caller's tensor), the output normalized without the separate
    rescaling of numerator and denominator. Shapes and dtypes as ``mlstm_step``."""
    C, n, m = state
    dt = C.dtype
    if not (q.dtype == k.dtype == v.dtype == i.dtype == f.dtype == dt):
        q, k, v, i, f = q.to(dt), k.to(dt), v.to(dt), i.to(dt), f.to(dt)
    a = F.logsigmoid(f).add_(m)  # (B, NH): log f + m_{t-1}
    m_new = torch.maximum(a, i)
    ik = k * (i - m_new).exp_()[..., None]  # (B, NH, d_qk): i' k
    fa = (a - m_new).exp_()  # f', <= 1
    C_new = torch.addcmul(C * fa[..., None, None], ik[..., :, None], v[..., None, :])
    n_new = torch.addcmul(ik, n, fa[..., None])
    # h = (q.C) s / (max(|q.n| s, exp(-m_hat)) + eps) with s = exp(m - m_hat): divided through by s, the floor
    # becomes exp(-m) and eps becomes eps / s
    q = q * (q.shape[-1] ** -0.5)
    num = torch.matmul(q[..., None, :], C_new).squeeze(-2)  # (B, NH, d_v)
    qn = torch.linalg.vecdot(q, n_new).abs_()  # (B, NH)
    inv_s = (m_new.clamp(min=M_FLOOR) - m_new).exp_()  # 1 / s >= 1
    den = torch.maximum(qn, m_new.neg().exp_()).add_(inv_s.mul_(eps))
    return num.div_(den[..., None]), mLSTMState(C_new, n_new, m_new)


def mlstm_recurrent(q, k, v, i, f, state: mLSTMState, eps: float = 1e-6,
                    starts: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, mLSTMState]:
    """Run ``mlstm_step`` over the sequence. Shapes as in ``openxlstm.ops.mlstm``; h in the state dtype.

    starts: (B, S) bool document starts (``ops.varlen.doc_starts``) or None: there the state becomes the
    initial one (zeros) before the token is read."""
    S = q.shape[2]
    hs = []
    for t in range(S):
        if starts is not None and t > 0:
            keep = ~starts[:, t]  # (B,)
            state = mLSTMState(*(torch.where(keep.view(-1, *[1] * (x.dim() - 1)), x, 0.0) for x in state))
        h, state = mlstm_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], state, eps)
        hs.append(h)
    return torch.stack(hs, dim=2), state


__all__ = ["mlstm_step", "mlstm_step_inference", "mlstm_recurrent"]
