"""Shared conventions of the sLSTM backends: state layout and input checks.

Layouts: x (B, S, 4*E) gate pre-activations from the input, gate-major [i | f | z | o], each E = NH * d wide
with heads contiguous; R (NH, d, 4, d) recurrent weights [head, input unit, gate, output unit];
b (4*E,) bias in the order of x. State (h, c, n, m), each (B, E), float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class sLSTMState(NamedTuple):
    """Recurrent state of the sLSTM cell: hidden h, cell c, normalizer n, stabilizer m, each (B, E)."""

    h: torch.Tensor
    c: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor


FORGET_GATES = ("sigmoid", "exp")


def check_inputs(x, R, b, state, forget_gate) -> tuple[int, int, int, int, int]:
    """Validate and return (B, S, E, NH, d); errors name the tensor and the expected shape."""
    for name, t in (("x", x), ("R", R), ("b", b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"slstm: {name} must be a floating-point torch.Tensor")
    if R.dim() != 4 or R.shape[2] != 4 or R.shape[1] != R.shape[3]:
        raise ValueError(f"slstm: R must have shape (NH, d, 4, d), got {tuple(R.shape)}")
    NH, d = R.shape[0], R.shape[1]
    E = NH * d
    if x.dim() != 3 or x.shape[2] != 4 * E:
        raise ValueError(f"slstm: x must have shape (B, S, 4*E) = (B, S, {4 * E}), got {tuple(x.shape)}")
    B, S = x.shape[:2]
    if S < 1:
        raise ValueError("slstm: the sequence length S must be at least 1")
    if tuple(b.shape) != (4 * E,):
        raise ValueError(f"slstm: b must have shape (4*E,) = ({4 * E},), got {tuple(b.shape)}")
    if forget_gate not in FORGET_GATES:
        raise ValueError(f"slstm: forget_gate must be one of {FORGET_GATES}, got {forget_gate!r}")
    if state is not None:
        if len(state) != 4:
            raise ValueError("slstm: state must be a tuple (h, c, n, m)")
        for name, t in zip("hcnm", state):
            if tuple(t.shape) != (B, E):
                raise ValueError(f"slstm: state {name} must have shape (B, E) = {(B, E)}, got {tuple(t.shape)}")
    return B, S, E, NH, d


def initial_state(state: Optional[tuple], B: int, E: int, dtype, device) -> sLSTMState:
    """The caller's state as fresh tensors in the state dtype, or zeros."""
    if state is None:
        return sLSTMState(*(torch.zeros(B, E, dtype=dtype, device=device) for _ in range(4)))
    return sLSTMState(*(t.to(device=device, dtype=dtype) for t in state))
