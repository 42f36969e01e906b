"""Shared conventions of every mLSTM backend: input checks, state layout, the stabilizer floor.

Conventions (all backends follow them exactly, so they agree to rounding):

* q, k: (B, NH, S, d_qk); v: (B, NH, S, d_v); i, f: (B, NH, S) gate pre-activations.
* The 1/sqrt(d_qk) scale is applied to q. The state therefore holds unscaled keys:
  C (B, NH, d_qk, d_v) = sum of weighted k v^T, n (B, NH, d_qk) = sum of weighted k, both divided by exp(m).
* The state stabilizer follows the recurrence m_t = max(log f_t + m_{t-1}, i_t) from m_0 (0 by default).
* The output of step t is stabilized by m_hat_t = max(m_t, M_FLOOR): a lower floor on the stabilizer keeps
  exp(-m_hat) finite (and gate gradients free of NaN) for any gate values; since numerator and denominator
  are scaled by the same exp(-m_hat), the floor only changes where eps enters.
* No gradient flows through m (it is a constant of the computation).
* Gate maths and states are float32 (float64 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

M_FLOOR = -10.0


class mLSTMState(NamedTuple):
    """Recurrent state of the mLSTM cell: C (B, NH, d_qk, d_v), n (B, NH, d_qk), m (B, NH)."""

    C: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and gate maths run in float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
