"""sLSTM: scalar memory with exponential gating and block-diagonal recurrent memory mixing.

``recurrent.py`` is the specification (autograd through a plain loop); ``fused.py`` the same maths with a
hand-written backward (the CPU path); a Triton kernel for CUDA lives beside them. See ``common.py``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import SLSTM_BACKENDS, resolve_backend, state_dtype
from ..varlen import doc_starts
from .common import FORGET_GATES, check_inputs, initial_state, sLSTMState
from .fused import slstm_fused
from .recurrent import slstm_recurrent

BACKENDS = SLSTM_BACKENDS


def slstm(
    x: torch.Tensor,
    R: torch.Tensor,
    b: torch.Tensor,
    state: Optional[tuple] = None,
    *,
    forget_gate: str = "sigmoid",
    backend: str = "auto",
    return_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """The sLSTM cell over a sequence.

    Args:
        x: (B, S, 4*E) gate pre-activations from the input, gate-major [i | f | z | o], heads contiguous.
        R: (NH, d, 4, d) block-diagonal recurrent weights, E = NH * d.
        b: (4*E,) gate biases in the order of x.
        state: optional (h, c, n, m), each (B, E).
        forget_gate: "sigmoid" (default) or "exp" (exponential forget gate).
        backend: "auto", "recurrent", "fused" or "triton" (CUDA).
        return_state: also return the final state.
        cu_seqlens: (D+1,) packed documents over the B*S tokens (``openxlstm.ops.varlen``): the state is
            zeros at every document start except each row's first (which starts from ``state``); the
            returned state is the last document's.

    Returns h (B, S, E) in the dtype of x, or (h, sLSTMState) with float32 states (float64 for float64 x).
    Gradients of the returned state are those of its stored values, m included (see ``recurrent.py``).
    """
    B, S, E, NH, d = check_inputs(x, R, b, state, forget_gate)
    starts = doc_starts(cu_seqlens, B, S, "slstm", x.device)
    name = resolve_backend("slstm", backend, x.device)
    sdt = state_dtype(x.dtype)
    st = initial_state(state, B, E, sdt, x.device)
    if name == "triton":
        from .triton import slstm_triton

        h, final = slstm_triton(x, R, b, st, forget_gate, cu_seqlens)
    elif name == "recurrent":
        h, final = slstm_recurrent(x.to(sdt), R.to(sdt), b.to(sdt), st, forget_gate, starts)
    else:
        h, final = slstm_fused(x.to(sdt), R.to(sdt), b.to(sdt), st, forget_gate, cu_seqlens)
    h = h.to(x.dtype)
    return (h, sLSTMState(*final)) if return_state else h


__all__ = ["BACKENDS", "FORGET_GATES", "sLSTMState", "slstm", "slstm_fused", "slstm_recurrent"]
