"""The sLSTM recurrence in plain PyTorch: the specification of the cell (autograd through the loop).

Per head h of width d (E = NH * d), block-diagonal recurrent weights R[h] map h_{t-1} to the four gates:

    [i, f, z, o]_t = x_t + R h_{t-1} + b          (x_t: gate pre-activations from the input)
    m_t = max(log f_t + m_{t-1}, i_t)   (m_t = i_t where n_{t-1} == 0, decided per element)
    c_t = f' c_{t-1} + i' tanh(z_t),  n_t = f' n_{t-1} + i',  h_t = sigmoid(o_t) * c_t / n_t
    i' = exp(i_t - m_t),  f' = exp(log f_t + m_{t-1} - m_t),  log f = logsigmoid(f) or f (exponential gate)

No gradient flows through m (the output does not depend on it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import sLSTMState


def log_forget(f: torch.Tensor, forget_gate: str) -> torch.Tensor:
    """log of the forget gate activation for a pre-activation f."""
    return F.logsigmoid(f) if forget_gate == "sigmoid" else f


def slstm_pointwise(pre: torch.Tensor, state: sLSTMState, forget_gate: str) -> sLSTMState:
    """The gate and state update for one step. pre: (B, 4, E) total pre-activations; state: (B, E) each."""
    _, c, n, m = state
    i, f, z, o = pre.unbind(1)
    logf = log_forget(f, forget_gate)
    m_det = m.detach()
    m_new = torch.where(n.detach() == 0, i.detach(), torch.maximum(i.detach(), logf.detach() + m_det))
    i_act = torch.exp(i - m_new)
    f_act = torch.exp(logf + m_det - m_new)
    c_new = f_act * c + i_act * torch.tanh(z)
    n_new = f_act * n + i_act
    h_new = torch.sigmoid(o) * c_new / n_new
    return sLSTMState(h_new, c_new, n_new, m_new)


def recurrent_preact(h: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """R h for block-diagonal R (NH, d, 4, d) and h (B, E): returns (B, 4, E)."""
    NH, d = R.shape[0], R.shape[1]
    B = h.shape[0]
    ry = torch.einsum("bhi,higo->bgho", h.view(B, NH, d), R)  # (B, 4, NH, d)
    return ry.reshape(B, 4, NH * d)


def slstm_recurrent(x, R, b, state: sLSTMState, forget_gate: str = "sigmoid") -> tuple[torch.Tensor, sLSTMState]:
    """x: (B, S, 4*E) in the state dtype; R: (NH, d, 4, d); b: (4*E,). Returns h (B, S, E) and final state."""
    B, S = x.shape[:2]
    x = x.view(B, S, 4, -1)
    b = b.view(4, -1)
    hs = []
    for t in range(x.shape[1]):
        pre = x[:, t] + recurrent_preact(state.h, R) + b
        state = slstm_pointwise(pre, state, forget_gate)
        hs.append(state.h)
    return torch.stack(hs, dim=1), state


__all__ = ["slstm_recurrent", "slstm_pointwise", "recurrent_preact", "log_forget"]
