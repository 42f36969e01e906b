"""The mLSTM layer between its two projections, as an op on explicit tensors.

    xz (B, S, 2I) = [x_m | z]                     (the output of the layer's up-projection)
    x_c = SiLU(causal_conv(x_m))                  (no conv: x_c = x_m)
    q, k = BD(x_c), v = BD(x_m)                   block-diagonal projections, heads of I / NH units
    i, f = Linear(3I -> NH)([q, k, v])             per-head gate pre-activations
    h = mLSTM(q, k, v, i, f)                      (B, NH, S, I / NH)
    a = (norm_heads(h) + skip * x_c) * SiLU(z)    (B, S, I), the input of the down-projection

``mlstm_layer_core`` runs a sequence; under autograd it keeps for backward only xz, the weights and, for the
Triton cell, its float32 output and per-token statistics: the conv, projections, gates and output gating
are recomputed in backward, where they cost little, and the final C, n are recomputed only when a loss
reads the returned state. Only the gradients autograd asks for are computed, so any weight may be frozen.
``mlstm_layer_step`` is one token per sequence with the cell's fused step (decoding).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..backends import resolve_backend
from ..blockdiag import block_diagonal_linear
from ..conv import causal_conv1d, causal_conv1d_step
from ..varlen import doc_starts
from . import mlstm, mlstm_backward, mlstm_decode, mlstm_forward_saving
from .common import state_stabilizer


class mLSTMLayerState(NamedTuple):
    """conv: (B, K-1, I) last inputs of the conv (None without conv); C, n, m: the cell state."""

    conv: Optional[torch.Tensor]
    C: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor


class mLSTMCoreWeights(NamedTuple):
    """The weights used between the projections (None where the layer has none): conv (I, K) and (I,); q, k, v
    block-diagonal (nb, I/nb, I/nb) and biases (I,); gates (NH, 3I) and (NH,); the head norm's (I,); skip (I,)."""

    conv_weight: Optional[torch.Tensor]
    conv_bias: Optional[torch.Tensor]
    q_weight: torch.Tensor
    q_bias: Optional[torch.Tensor]
    k_weight: torch.Tensor
    k_bias: Optional[torch.Tensor]
    v_weight: torch.Tensor
    v_bias: Optional[torch.Tensor]
    igate_weight: torch.Tensor
    igate_bias: torch.Tensor
    fgate_weight: torch.Tensor
    fgate_bias: torch.Tensor
    norm_weight: torch.Tensor
    norm_bias: Optional[torch.Tensor]
    skip: torch.Tensor


def qkv_gates(xz: torch.Tensor, w: mLSTMCoreWeights, num_heads: int, conv_state: Optional[torch.Tensor],
              cu_seqlens: Optional[torch.Tensor] = None, step: bool = False):
    """xz (B, S, 2I) -> q, k, v (B, NH, S, I/NH) (views), i, f (B, NH, S), x_c, z (B, S, I), new conv state;
    ``step``: one token per row, without autograd (the conv's step)."""
    B, S, _ = xz.shape
    x_m, z = xz.chunk(2, dim=-1)
    if w.conv_weight is not None and step:
        x_c, conv_state = causal_conv1d_step(x_m, w.conv_weight, w.conv_bias, conv_state)
        x_c = F.silu(x_c)
    elif w.conv_weight is not None:
        x_c, conv_state = causal_conv1d(x_m, w.conv_weight, w.conv_bias, conv_state, return_state=True,
                                        cu_seqlens=cu_seqlens)
        x_c = F.silu(x_c)
    else:
        x_c, conv_state = x_m, None
    q = block_diagonal_linear(x_c, w.q_weight, w.q_bias)  # (B, S, I)
    k = block_diagonal_linear(x_c, w.k_weight, w.k_bias)
    v = block_diagonal_linear(x_m, w.v_weight, w.v_bias)
    qkv = torch.cat([q, k, v], dim=-1)  # (B, S, 3I)
    i, f = F.linear(qkv, w.igate_weight, w.igate_bias), F.linear(qkv, w.fgate_weight, w.fgate_bias)  # (B, S, NH)

    def heads(t):  # (B, S, I) -> (B, NH, S, I/NH), a view
        return t.view(B, S, num_heads, -1).transpose(1, 2)

    return heads(q), heads(k), heads(v), i.transpose(1, 2), f.transpose(1, 2), x_c, z, conv_state


def core_output(h: torch.Tensor, x_c: torch.Tensor, z: torch.Tensor, w: mLSTMCoreWeights, norm_eps: float):
    """h (B, NH, S, d) -> (norm_heads(h) + skip * x_c) * SiLU(z), (B, S, I): each head normalized over its d
    units (no affine), then the per-unit weight (and bias)."""
    d = h.shape[-1]
    y = F.layer_norm(h.transpose(1, 2), (d,), eps=norm_eps).flatten(-2) * w.norm_weight  # (B, S, I)
    if w.norm_bias is not None:
        y = y + w.norm_bias
    return (y + w.skip * x_c) * F.silu(z)


def mlstm_layer_core(xz: torch.Tensor, w: mLSTMCoreWeights, state: Optional[mLSTMLayerState], *, num_heads: int,
                     norm_eps: float, backend: str = "auto", chunk_size: Optional[int] = None,
                     cu_seqlens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, mLSTMLayerState]:
    """The core over a sequence: xz (B, S, 2I) -> (a (B, S, I), new mLSTMLayerState); ``state`` continues a
    sequence (never modified); cu_seqlens: packed documents (``openxlstm.ops.varlen``). Gradients reach xz,
    the weights and the passed state, with the stabilizer's terms of ``common.py`` (a loss on the returned C,
    n, m gets its true gradient). Under torch.compile, or without gradients, it runs as plain ops."""
    name = resolve_backend("mlstm", backend, xz.device)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        st = (None,) * 4 if state is None else tuple(state)
        a, *new = _Core.apply(num_heads, norm_eps, name, chunk_size, state is not None, cu_seqlens, xz, *st, *w)
        return a, mLSTMLayerState(*new)
    q, k, v, i, f, x_c, z, conv_state = qkv_gates(xz, w, num_heads, None if state is None else state.conv,
                                                  cu_seqlens)
    h, cell = mlstm(q, k, v, i, f, None if state is None else (state.C, state.n, state.m), backend=name,
                    chunk_size=chunk_size, return_state=True, cu_seqlens=cu_seqlens)
    return core_output(h, x_c, z, w, norm_eps), mLSTMLayerState(conv_state, *cell)


def mlstm_layer_step(xz: torch.Tensor, w: mLSTMCoreWeights, state: Optional[mLSTMLayerState], *, num_heads: int,
                     norm_eps: float, backend: str = "auto") -> tuple[torch.Tensor, mLSTMLayerState]:
    """One token per sequence: xz (B, 1, 2I) -> (a (B, 1, I), new state), with the cell's fused step."""
    B = xz.shape[0]
    q, k, v, i, f, x_c, z, conv_state = qkv_gates(xz, w, num_heads, None if state is None else state.conv,
                                                  step=not torch.is_grad_enabled())
    h, cell = mlstm_decode(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[..., 0], f[..., 0],
                           None if state is None else (state.C, state.n, state.m), backend=backend)
    return core_output(h.view(B, num_heads, 1, -1), x_c, z, w, norm_eps), mLSTMLayerState(conv_state, *cell)


_FIRST_TENSOR = 6  # the arguments of _Core.forward before xz


class _Core(torch.autograd.Function):
    """``mlstm_layer_core`` with recomputation in backward. Inputs: num_heads, norm_eps, backend (resolved),
    chunk_size, has_state, cu_seqlens, xz, the state's conv, C, n, m (None without a state), the weights;
    outputs: a (B, S, I) and the new state's conv, C, n, m. Under autocast the backward recomputes under the
    same autocast settings, so the recomputed values equal the forward's."""

    @staticmethod
    def forward(ctx, num_heads, norm_eps, backend, chunk_size, has_state, cu_seqlens, xz, conv0, C0, n0, m0, *weights):
        w = mLSTMCoreWeights(*weights)
        dev = xz.device.type
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.set_materialize_grads(False)
        with torch.no_grad():
            q, k, v, i, f, x_c, z, conv_state = qkv_gates(xz, w, num_heads, conv0, cu_seqlens)
            h, final, saved = mlstm_forward_saving(q, k, v, i, f, (C0, n0, m0) if has_state else None,
                                                   backend=backend, chunk_size=chunk_size, cu_seqlens=cu_seqlens)
            a = core_output(h, x_c, z, w, norm_eps)
        h32, stats = (None, None) if saved is None else saved
        ctx.save_for_backward(xz, conv0, C0, n0, m0, h32, stats, cu_seqlens, *weights)  # not the final C, n
        ctx.num_heads, ctx.norm_eps, ctx.backend, ctx.chunk_size = num_heads, norm_eps, backend, chunk_size
        ctx.has_state, ctx.triton = has_state, saved is not None
        return (a, conv_state, *final)

    @staticmethod
    def backward(ctx, da, d_conv, dC, dn, dm):
        xz, conv0, C0, n0, m0, h32, stats, cu_seqlens, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad[_FIRST_TENSOR:]  # xz, conv0, C0, n0, m0, then the weights
        need_xz, need_conv = needs[0], needs[1] and conv0 is not None
        need_state = ctx.has_state and any(needs[2:5])
        need_w = [n and t is not None for n, t in zip(needs[5:], weights)]
        dev = xz.device.type
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
            xz_ = xz.detach().requires_grad_(need_xz)
            conv_ = None if conv0 is None else conv0.detach().requires_grad_(need_conv)
            ws = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(weights, need_w)]
            w = mLSTMCoreWeights(*ws)
            st = (None if not ctx.has_state else
                  tuple(t.detach().requires_grad_(need_state) for t in (C0, n0, m0)))
            q, k, v, i, f, x_c, z, conv_new = qkv_gates(xz_, w, ctx.num_heads, conv_, cu_seqlens)
            if da is None:
                da = torch.zeros_like(x_c)
            leaves = ([xz_] if need_xz else []) + ([conv_] if need_conv else []) + [t for t in ws if t is not None
                                                                                  and t.requires_grad]
            state_leaves = list(st) if need_state else []
            outs, grads = [], []
            if conv_new is not None and d_conv is not None:
                outs.append(conv_new)
                grads.append(d_conv)
            if not ctx.triton:  # PyTorch cell: run it again under autograd, one backward for everything
                h, final = mlstm(q, k, v, i, f, st, backend=ctx.backend, chunk_size=ctx.chunk_size,
                                 return_state=True, cu_seqlens=cu_seqlens)
                outs.append(core_output(h, x_c, z, w, ctx.norm_eps))
                grads.append(da)
                for t, g in zip(final, (dC, dn, dm)):
                    if g is not None:
                        outs.append(t)
                        grads.append(g)
                got = _grad(outs, leaves + state_leaves, grads)
                d_state = got[len(leaves):] if need_state else (None,) * 3
                got = got[:len(leaves)]
            else:
                got, d_state = _triton_backward(ctx, q, k, v, i, f, x_c, z, w, st, leaves, outs, grads, da, dC, dn,
                                                dm, C0, n0, m0, h32, stats, cu_seqlens, xz, need_state)
        got = iter(got)
        d_xz = next(got) if need_xz else None
        d_conv0 = next(got) if need_conv else None
        d_w = [next(got) if t is not None and t.requires_grad else None for t in ws]
        return (None,) * _FIRST_TENSOR + (d_xz, d_conv0, *d_state, *d_w)


def _triton_backward(ctx, q, k, v, i, f, x_c, z, w, st, leaves, outs, grads, da, dC, dn, dm, C0, n0, m0, h32, stats,
                     cu_seqlens, xz, need_state):
    """The Triton cell's backward: its saved output and statistics, its own kernels, then the stabilizer's path.
    Returns (gradients of ``leaves``, gradients of the passed C, n, m or Nones)."""
    h_leaf = h32.to(v.dtype).requires_grad_()
    outs.append(core_output(h_leaf, x_c, z, w, ctx.norm_eps))
    grads.append(da)
    got_out = _grad(outs, [h_leaf] + leaves, grads, retain_graph=True)
    dq, dk, dv, di, df, dC0, dn0 = mlstm_backward(
        q.detach(), k.detach(), v.detach(), i.detach(), f.detach(), None if not ctx.has_state else (C0, n0, m0),
        (h32, stats), got_out[0], dC, dn, chunk_size=ctx.chunk_size, cu_seqlens=cu_seqlens)
    cell_outs, cell_grads = [q, k, v, i, f], [dq, dk, dv, di, df]
    m_leaf = [st[2]] if need_state else []
    if any(g is not None for g in (dC, dn, dm)):  # a loss on the returned state (rare): recompute it
        _, (C_T, n_T, _), _ = mlstm_forward_saving(q.detach(), k.detach(), v.detach(), i.detach(), f.detach(),
                                                   None if st is None else (C0, n0, m0), backend=ctx.backend,
                                                   chunk_size=ctx.chunk_size, cu_seqlens=cu_seqlens)
        dm_true = _stabilizer_grad(dC, dn, dm, C_T, n_T)
        starts = doc_starts(cu_seqlens, xz.shape[0], xz.shape[1], "mlstm", xz.device)
        m_true = state_stabilizer(i.to(C_T.dtype), F.logsigmoid(f.to(C_T.dtype)), None if st is None else st[2],
                                  starts)
        cell_outs.append(m_true)
        cell_grads.append(dm_true)
    got_cell = _grad(cell_outs, leaves + m_leaf, cell_grads)
    got = [_add(a, b) for a, b in zip(got_out[1:], got_cell)]
    d_state = (None, None, None)
    if need_state:  # m0 enters as exp(m0) on C0 and n0, and in the stabilizer's max
        dm0 = (dC0 * C0).sum((-2, -1)) + (dn0 * n0).sum(-1)
        d_state = (dC0, dn0, _add(got_cell[-1], dm0))
    return got, d_state


def _grad(outs, inputs, grads, retain_graph=False):
    """torch.autograd.grad over the outputs that take part in the graph (None for inputs it does not reach)."""
    pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
    if not inputs or not pairs:
        return [None] * len(inputs)
    return list(torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], retain_graph=retain_graph,
                                    allow_unused=True))


def _stabilizer_grad(dC, dn, dm, C, n) -> torch.Tensor:
    """The gradient of the returned state's stabilizer m_true: dm - <dC, C> - <dn, n> (C, n carry exp(-m)),
    (B, NH); absent gradients count as zero."""
    out = torch.zeros_like(C[..., 0, 0]) if dm is None else dm.clone()
    if dC is not None:
        out = out - (dC * C).sum((-2, -1))
    if dn is not None:
        out = out - (dn * n).sum(-1)
    return out


def _add(a, b):
    if a is None:
        return b
    return a if b is None else a + b


__all__ = ["mLSTMLayerState", "mLSTMCoreWeights", "mlstm_layer_core", "mlstm_layer_step", "qkv_gates", "core_output"]
