"""Shared conventions of every mLSTM backend: input checks, state layout, the stabilizer floor.

Conventions (all backends follow them exactly, so they agree to rounding):

* q, k: (B, NH, S, d_qk); v: (B, NH, S, d_v); i, f: (B, NH, S) gate pre-activations.
* The 1/sqrt(d_qk) scale is applied to q. The state therefore holds unscaled keys:
  C (B, NH, d_qk, d_v) = sum of weighted k v^T, n (B, NH, d_qk) = sum of weighted k, both divided by exp(m).
* The state stabilizer follows the recurrence m_t = max(log f_t + m_{t-1}, i_t) from m_0 (0 by default).
* The output of step t is stabilized by m_hat_t = max(m_t, M_FLOOR): a lower floor on the stabilizer keeps
  exp(-m_hat) finite (and gate gradients free of NaN) for any gate values; since numerator and denominator
  are scaled by the same exp(-m_hat), the floor only changes where eps enters.
* Inside a call no gradient flows through m (it is a constant of the computation; see the last point for
  the returned state).
* Gate maths and states are float32 (float64 for float64 inputs) whatever the input dtype.
* Packed documents (``cu_seqlens``, see ``openxlstm.ops.varlen``): at every document start except a row's
  first token the state becomes the initial one (C = 0, n = 0, m = 0) before the token is read, so each
  document gives exactly what it gives alone. A forget-gate pre-activation of -inf (log f = -inf) is a hard
  reset: it wipes the state, and since then m_t = i_t whatever m_{t-1} was, it equals a fresh start exactly.
  The parallel and chunkwise forms treat both as segment starts: their cumulative log forget gates restart
  there (no -inf - -inf), keys attend only within their segment, and a fresh start's zero state still enters
  the stabilizer with log weight sum_{r in [start, t]} log f_r (as the initial m = 0 does in the recurrence).
* Returned states and their gradients: the state is returned as stored (C, n scaled by exp(-m)), and its
  gradients are those of the stored values: m carries the gradient of the running max that defines it (the
  input gate or forget gates on its arg-max path), and C, n the matching -C dm, -n dm terms
  (``attach_state_gradient``); a state passed in receives dm0 = <dC0, C0> + <dn0, n0> + its share of the max.
  Inside a call m stays a constant, so outputs h are unchanged; a loss on a continuation gets the same
  gradients as before (the m terms cancel), and a loss on the returned C, n, m gets the true ones.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

M_FLOOR = -10.0
NEG_INF = float("-inf")


class mLSTMState(NamedTuple):
    """Recurrent state of the mLSTM cell: C (B, NH, d_qk, d_v), n (B, NH, d_qk), m (B, NH)."""

    C: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor


def exp_flushed(x: torch.Tensor) -> torch.Tensor:
    """exp(x), with every result below the square root of the dtype's smallest normal number set to 0.

    The decay weights of long chunks reach subnormal magnitudes (exp(-90) in float32 after 128 steps of
    f = 0.5), and CPUs multiply subnormal floats many times slower: a chunkwise pass at chunk 128 ran several
    times slower than at chunk 64 for that reason alone. Flushing at sqrt(tiny) (1e-19 in float32, 1e-154 in
    float64) also keeps the products of these weights with ordinary values out of the subnormal range. The
    weights are stabilized so that the largest is about 1, so the dropped terms lie far below rounding.
    """
    cut = 0.5 * math.log(torch.finfo(x.dtype).tiny)
    return torch.exp(torch.where(x < cut, float("-inf"), x))


def _shape_error(name: str, got: tuple, expected: str) -> ValueError:
    return ValueError(f"mlstm: {name} must have shape {expected}, got {tuple(got)}")


def check_inputs(q, k, v, i, f, state) -> tuple[int, int, int, int, int]:
    """Validate shapes/dtypes and return (B, NH, S, d_qk, d_v); raise errors that name the tensor."""
    for name, t in (("q", q), ("k", k), ("v", v), ("i", i), ("f", f)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mlstm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"mlstm: {name} must be a floating-point tensor, got {t.dtype}")
    if q.dim() != 4:
        raise _shape_error("q", q.shape, "(B, NH, S, d_qk)")
    B, NH, S, dqk = q.shape
    if S < 1:
        raise ValueError("mlstm: the sequence length S must be at least 1")
    if k.shape != q.shape:
        raise _shape_error("k", k.shape, f"(B, NH, S, d_qk) = {(B, NH, S, dqk)} like q")
    if v.dim() != 4 or v.shape[:3] != (B, NH, S):
        raise _shape_error("v", v.shape, f"(B, NH, S, d_v) with (B, NH, S) = {(B, NH, S)}")
    dv = v.shape[3]
    for name, t in (("i", i), ("f", f)):
        if t.shape != (B, NH, S):
            raise _shape_error(name, t.shape, f"(B, NH, S) = {(B, NH, S)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"mlstm: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    devices = {t.device for t in (q, k, v, i, f)}
    if len(devices) != 1:
        raise ValueError(f"mlstm: all inputs must be on one device, got {sorted(map(str, devices))}")
    if state is not None:
        if len(state) != 3:
            raise ValueError("mlstm: state must be a tuple (C, n, m)")
        C, n, m = state
        if tuple(C.shape) != (B, NH, dqk, dv):
            raise _shape_error("state C", C.shape, f"(B, NH, d_qk, d_v) = {(B, NH, dqk, dv)}")
        if tuple(n.shape) != (B, NH, dqk):
            raise _shape_error("state n", n.shape, f"(B, NH, d_qk) = {(B, NH, dqk)}")
        if tuple(m.shape) != (B, NH):
            raise _shape_error("state m", m.shape, f"(B, NH) = {(B, NH)}")
    return B, NH, S, dqk, dv


def initial_state(
    state: Optional[tuple], B: int, NH: int, dqk: int, dv: int, dtype: torch.dtype, device: torch.device
) -> mLSTMState:
    """The caller's state cast to the state dtype (a copy, never the caller's tensors), or zeros."""
    if state is None:
        return mLSTMState(
            torch.zeros(B, NH, dqk, dv, dtype=dtype, device=device),
            torch.zeros(B, NH, dqk, dtype=dtype, device=device),
            torch.zeros(B, NH, dtype=dtype, device=device),
        )
    C, n, m = state
    return mLSTMState(C.to(device=device, dtype=dtype), n.to(device=device, dtype=dtype), m.to(device=device, dtype=dtype))


def segment_starts(logf: torch.Tensor, starts: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, NH, S) bool: where the parallel and chunkwise forms restart their cumulative log forget gates: the
    document starts ``starts`` (B, S) (None: none) and the hard resets, log f = -inf."""
    hard = logf == NEG_INF
    return hard if starts is None else hard | starts[:, None, :]


def state_stabilizer(i: torch.Tensor, logf: torch.Tensor, m0: Optional[torch.Tensor],
                     starts: Optional[torch.Tensor]) -> torch.Tensor:
    """The stabilizer m of the state after the last token, (B, NH), as a differentiable closed form.

    m_T = max(m_init + sum_{r in [P, T]} log f_r, max_{s in [P, T]} (i_s + sum_{r in (s, T]} log f_r)), with P
    the start of the last segment (a document start, a hard reset or the row start) and m_init the passed
    m0 in a row's first document (0 without a state), 0 after a reset. Its gradient is that of the max (the
    arg-max term); sums run backwards from T, so they stay within the last segment (no -inf - -inf).
    i, logf: (B, NH, S) in the state dtype; m0: (B, NH) or None; starts: (B, S) bool or None.
    """
    S = i.shape[-1]
    seg = segment_starts(logf.detach(), starts)
    idx = torch.arange(S, device=i.device)
    P = torch.where(seg, idx, 0).amax(-1, keepdim=True)  # (B, NH, 1) start of the last segment (0: the row start)
    rev = logf.flip(-1).cumsum(-1).flip(-1)  # (B, NH, S): sum_{r >= s} log f_r
    after = torch.cat([rev[..., 1:], torch.zeros_like(rev[..., :1])], dim=-1)  # sum_{r > s}
    cand = torch.where(idx >= P, i + after, NEG_INF).amax(-1)  # (B, NH): the tokens' terms
    first = ~seg[..., 1:].any(-1)  # (B, NH): the last segment is the row's first (it starts from m0)
    m_init = torch.zeros_like(cand) if m0 is None else torch.where(first, m0, 0.0)
    init = rev.gather(-1, P).squeeze(-1) + m_init  # sum_{r >= P} log f_r + m_init (-inf after a hard reset)
    return torch.maximum(init, cand)


def attach_state_gradient(state: mLSTMState, m_true: torch.Tensor) -> mLSTMState:
    """The state with the gradient of its stabilizer: m gets m_true's gradient (its value stays m), C and n
    the factor exp(-(m_true - m_true.detach())) (value 1). See the module docstring."""
    delta = m_true - m_true.detach()  # value 0
    scale = torch.exp(-delta)
    C, n, m = state
    return mLSTMState(C * scale[..., None, None], n * scale[..., None], m.detach() + delta)


def state_with_m_gradient(state: Optional[tuple]) -> Optional[tuple]:
    """A passed-in state whose m requires a gradient, as the kernels read it: C and n times exp(m - m.detach())
    (value 1), so that m receives <dC0, C0> + <dn0, n0>; m itself goes on as a constant."""
    if state is None or not state[2].requires_grad:
        return state
    C, n, m = state
    scale = torch.exp(m - m.detach())
    return (C * scale[..., None, None], n * scale[..., None], m)
