"""The sLSTM recurrence in plain PyTorch: the specification of the cell (autograd through the loop).

Per head h of width d (E = NH * d), block-diagonal recurrent weights R[h] map h_{t-1} to the four gates:

    [i, f, z, o]_t = x_t + R h_{t-1} + b          (x_t: gate pre-activations from the input)
    m_t = max(log f_t + m_{t-1}, i_t)   (m_t = i_t where n_{t-1} == 0, decided per element)
    c_t = f' c_{t-1} + i' tanh(z_t),  n_t = f' n_{t-1} + i',  h_t = sigmoid(o_t) * c_t / n_t
    i' = exp(i_t - m_t),  f' = exp(log f_t + m_{t-1} - m_t),  log f = logsigmoid(f) or f (exponential gate)

Inside the cell no gradient flows through m (the outputs h do not depend on it). The returned state is the
stored one (c, n scaled by exp(-m)) with the gradient of those stored values: m carries the gradient of its
recurrence (i_t where the input gate won the max, log f_t + m_{t-1} where the forget gate did) and c, n the
matching -c dm, -n dm terms; a passed-in m receives <dc, c> + <dn, n> + its share of the recurrence. A loss on
a continuation gets the same gradients either way (the m terms cancel); a loss on c, n, m its true one.

Packed documents (``cu_seqlens``, ``openxlstm.ops.varlen``): at every document start except a row's first
token the state (h, c, n, m) becomes zeros before the token is read, exactly as if the document ran alone.

``slstm_step`` is one step of it; ``slstm_decode`` is that step for generation (the sLSTM layer's path for
a single token without gradient): input and state dtypes handled as ``slstm`` does, nothing else.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..backends import state_dtype
from .common import check_inputs, initial_state, sLSTMState


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


def recurrent_preact_heads(h: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """R h for block-diagonal R (NH, d, 4, d) and h (B, E): returns (B, 4, NH, d), a strided view of the
    product (no copy into the (B, 4, E) layout)."""
    NH, d = R.shape[0], R.shape[1]
    return torch.einsum("bhi,higo->bgho", h.view(h.shape[0], NH, d), R)


def recurrent_preact(h: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """R h for block-diagonal R (NH, d, 4, d) and h (B, E): returns (B, 4, E)."""
    return recurrent_preact_heads(h, R).reshape(h.shape[0], 4, -1)


def step_preact(x: torch.Tensor, R: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The total pre-activations x_t + R h_{t-1} + b of one step: x (B, 4*E), h (B, E) -> (B, 4, E)."""
    B, (NH, d) = x.shape[0], R.shape[:2]
    pre = x.view(B, 4, NH, d) + recurrent_preact_heads(h, R) + b.view(4, NH, d)  # laid out as x: no copy
    return pre.reshape(B, 4, NH * d)


def slstm_step(x: torch.Tensor, R: torch.Tensor, b: torch.Tensor, state: sLSTMState,
               forget_gate: str = "sigmoid") -> tuple[torch.Tensor, sLSTMState]:
    """One time step of the cell. x: (B, 4*E) input pre-activations in the state dtype; R: (NH, d, 4, d);
    b: (4*E,); state: (h, c, n, m), each (B, E). Returns h (B, E) and the new state."""
    new = slstm_pointwise(step_preact(x, R, b, state.h), state, forget_gate)
    return new.h, new


def slstm_recurrent(x, R, b, state: sLSTMState, forget_gate: str = "sigmoid",
                    starts: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, sLSTMState]:
    """x: (B, S, 4*E) in the state dtype; R: (NH, d, 4, d); b: (4*E,); starts: (B, S) bool document starts or
    None. Returns h (B, S, E) and the final state, with the gradients of the module docstring."""
    hs = []
    m_true = state.m  # the stabilizer with its gradient (the recurrence below keeps m constant)
    if m_true.requires_grad:  # a passed m enters as exp(m) on c and n
        scale = torch.exp(m_true - m_true.detach())
        state = state._replace(c=state.c * scale, n=state.n * scale)
    for t in range(x.shape[1]):
        if starts is not None and t > 0:
            keep = ~starts[:, t, None]  # (B, 1)
            state = sLSTMState(*(torch.where(keep, s, 0.0) for s in state))
            m_true = torch.where(keep, m_true, 0.0)
        pre = step_preact(x[:, t], R, b, state.h)
        new = slstm_pointwise(pre, state, forget_gate)
        i, logf = pre[:, 0], log_forget(pre[:, 1], forget_gate)
        m_true = torch.where(state.n.detach() == 0, i, torch.maximum(i, logf + m_true))
        state = new
        hs.append(new.h)
    delta = m_true - m_true.detach()  # value 0: the stored c, n vary as exp(-m)
    final = state._replace(c=state.c * torch.exp(-delta), n=state.n * torch.exp(-delta), m=state.m.detach() + delta)
    return torch.stack(hs, dim=1), final


def slstm_decode(x: torch.Tensor, R: torch.Tensor, b: torch.Tensor, state: Optional[tuple] = None, *,
                 forget_gate: str = "sigmoid") -> tuple[torch.Tensor, sLSTMState]:
    """One generation step for a batch of single tokens, without the whole-sequence machinery.

    x: (B, 4*E) gate pre-activations from the input (any float dtype); R, b as in ``slstm``; state: optional
    (h, c, n, m), each (B, E). Returns h (B, E) in the dtype of x and the new sLSTMState (float32, float64
    for float64 x), equal to ``slstm(x[:, None], R, b, state, return_state=True)`` bit for bit on the
    PyTorch backends. Plain PyTorch: 22 non-view aten ops (the fused sequence path took 48 for one token),
    no autograd Function, no host reads, so it compiles into one graph (and a CUDA graph).
    """
    B, _, E, _, _ = check_inputs(x[:, None], R, b, state, forget_gate)
    sdt = state_dtype(x.dtype)
    st = initial_state(state, B, E, sdt, x.device)
    h, new = slstm_step(x.to(sdt), R.to(sdt), b.to(sdt), st, forget_gate)
    return h.to(x.dtype), new


__all__ = ["slstm_recurrent", "slstm_step", "slstm_decode", "slstm_pointwise", "recurrent_preact",
           "recurrent_preact_heads", "log_forget"]
