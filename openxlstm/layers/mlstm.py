"""The mLSTM layer ("pre up-projection" block body, spec §2.2): up-project, conv, q/k/v, mLSTM, gate, down."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import xLSTMConfig
from ..ops.mlstm import mlstm, mlstm_backward, mlstm_decode, mlstm_forward_saving, resolve_backend
from ..ops.mlstm.common import state_stabilizer
from ..ops.packing import doc_starts
from .backends import Backends
from .common import BlockDiagonalLinear, CausalConv, MultiHeadNorm, small_init_, wang_init_


class mLSTMLayerState(NamedTuple):
    """conv: (B, K-1, I) last inputs of the conv (None without conv); C, n, m: the cell state."""

    conv: Optional[torch.Tensor]
    C: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor


class mLSTMLayer(nn.Module):
    def __init__(self, config: xLSTMConfig):
        super().__init__()
        E, I, NH = config.embedding_dim, config.mlstm_inner_dim, config.mlstm_num_heads
        self.config = config
        self.inner_dim, self.num_heads, self.head_dim = I, NH, I // NH
        self.proj_up = nn.Linear(E, 2 * I, bias=config.bias)
        self.conv = CausalConv(I, config.mlstm_conv_kernel) if config.mlstm_conv_kernel > 0 else None
        nb = I // config.mlstm_qkv_blocksize
        self.q_proj = BlockDiagonalLinear(I, nb, bias=config.bias)
        self.k_proj = BlockDiagonalLinear(I, nb, bias=config.bias)
        self.v_proj = BlockDiagonalLinear(I, nb, bias=config.bias)
        self.igate = nn.Linear(3 * I, NH)
        self.fgate = nn.Linear(3 * I, NH)
        self.outnorm = MultiHeadNorm(NH, I // NH, eps=config.norm_eps)
        self.skip = nn.Parameter(torch.ones(I))
        self.proj_down = nn.Linear(I, E, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self):
        """The reference initialization (spec §2.4)."""
        E, L = self.config.embedding_dim, self.config.num_blocks
        small_init_(self.proj_up.weight, E)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            small_init_(proj.weight, E)
        wang_init_(self.proj_down.weight, E, L)
        for lin in (self.proj_up, self.q_proj, self.k_proj, self.v_proj, self.proj_down):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.conv is not None:
            self.conv.reset_parameters()
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, mean=0.0, std=0.1)
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        nn.init.ones_(self.skip)
        self.outnorm.reset_parameters()

    def forward(self, x: torch.Tensor, state: Optional[mLSTMLayerState] = None, backends: Backends = Backends(),
                cu_seqlens: Optional[torch.Tensor] = None):
        """x: (B, S, E) (normalized) -> (y (B, S, E), new mLSTMLayerState); cu_seqlens: packed documents
        (``openxlstm.ops.packing``) for the conv and the cell."""
        xz = self.proj_up(x)  # (B, S, 2I): [x_m | z]
        if xz.shape[1] == 1 and backends.mlstm in ("auto", "recurrent", "triton"):
            a, new_state = self._step(xz, state, backends)
        elif torch.is_grad_enabled() and not torch.compiler.is_compiling():
            st = (None,) * 4 if state is None else tuple(state)
            a, *new = _mLSTMCore.apply(self, backends, state is not None, cu_seqlens, xz, *st, *self._core_params())
            new_state = mLSTMLayerState(*new)
        else:
            a, new_state = self._core(xz, state, partial(mlstm, backend=backends.mlstm, chunk_size=backends.chunk_size,
                                                         return_state=True, cu_seqlens=cu_seqlens), cu_seqlens)
        return self.dropout(self.proj_down(a)), new_state

    # the layer between its two projections -------------------------------------------------------------
    def _core_params(self) -> list[nn.Parameter]:
        """The parameters used between proj_up and proj_down, in a fixed order."""
        mods = [self.conv, self.q_proj, self.k_proj, self.v_proj, self.igate, self.fgate, self.outnorm]
        return [p for m in mods if m is not None for p in m.parameters()] + [self.skip]

    def _qkv_gates(self, xz, conv_state, cu_seqlens=None):
        """xz (B, S, 2I) -> q, k (B, NH, S, DH), v (B, NH, S, DH), i, f (B, NH, S), x_c, z (B, S, I), conv state."""
        B, S, _ = xz.shape
        x_m, z = xz.chunk(2, dim=-1)
        if self.conv is not None:
            x_c, conv_state = self.conv(x_m, conv_state, cu_seqlens)
            x_c = F.silu(x_c)
        else:
            x_c, conv_state = x_m, None
        q, k, v = self.q_proj(x_c), self.k_proj(x_c), self.v_proj(x_m)  # (B, S, I)
        qkv = torch.cat([q, k, v], dim=-1)
        i, f = self.igate(qkv), self.fgate(qkv)  # (B, S, NH)

        def heads(t):  # (B, S, I) -> (B, NH, S, DH), a view
            return t.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)

        return heads(q), heads(k), heads(v), i.transpose(1, 2), f.transpose(1, 2), x_c, z, conv_state

    def _out(self, h, x_c, z):
        """h (B, NH, S, DH) -> the input of proj_down (B, S, I): (norm(h) + skip * x_c) * silu(z)."""
        return (self.outnorm(h.transpose(1, 2)) + self.skip * x_c) * F.silu(z)

    def _core(self, xz, state, cell, cu_seqlens=None):
        """The whole core with ``cell(q, k, v, i, f, cell_state) -> (h, mLSTMState)``."""
        q, k, v, i, f, x_c, z, conv_state = self._qkv_gates(xz, None if state is None else state.conv, cu_seqlens)
        h, cell_state = cell(q, k, v, i, f, None if state is None else (state.C, state.n, state.m))
        return self._out(h, x_c, z), mLSTMLayerState(conv_state, *cell_state)

    def _step(self, xz, state, backends):
        """One token per sequence (decoding) with the fused step."""
        B = xz.shape[0]
        q, k, v, i, f, x_c, z, conv_state = self._qkv_gates(xz, None if state is None else state.conv)
        h, cell = mlstm_decode(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[..., 0], f[..., 0],
                               None if state is None else (state.C, state.n, state.m), backend=backends.mlstm)
        return self._out(h.view(B, self.num_heads, 1, self.head_dim), x_c, z), mLSTMLayerState(conv_state, *cell)


class _mLSTMCore(torch.autograd.Function):
    """The mLSTM layer between its projections, keeping for backward only xz (B, S, 2I), the cell's output and
    its small per-token statistics (Triton) or nothing more (PyTorch backends): everything else (conv, q/k/v
    projections, gates, the output norm and gating) is recomputed in backward, where it costs little. The
    final C and n are not kept either (a C per head and sequence): only a loss on the returned state needs
    them, and then the backward recomputes them.

    Inputs: layer, backends, has_state, cu_seqlens, xz, the state's conv, C, n, m (None without a state), then
    the core parameters; outputs: a (B, S, I) and the new state's conv, C, n, m. Gradients reach xz, the
    parameters and the carried state, with the stabilizer's terms of ``ops/mlstm/common.py`` (a loss on the
    returned C, n, m gets its true gradient). Under autocast the backward recomputes under the same autocast
    settings, so the recomputed values equal the forward's.
    """

    @staticmethod
    def forward(ctx, layer, backends, has_state, cu_seqlens, xz, conv0, C0, n0, m0, *params):
        state = mLSTMLayerState(conv0, C0, n0, m0) if has_state else None
        dev = xz.device.type
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.set_materialize_grads(False)
        name = resolve_backend(backends.mlstm, xz.device)
        cell_saved = {}

        def cell(q, k, v, i, f, cell_state):
            h, final, saved = mlstm_forward_saving(q, k, v, i, f, cell_state, backend=name,
                                                   chunk_size=backends.chunk_size, cu_seqlens=cu_seqlens)
            cell_saved["saved"] = saved
            return h, final

        with torch.no_grad():
            a, new_state = layer._core(xz, state, cell, cu_seqlens)
        saved = cell_saved["saved"]
        h32, stats = (None, None) if saved is None else saved
        ctx.save_for_backward(xz, conv0, C0, n0, m0, h32, stats, cu_seqlens)  # not the final C, n: see backward
        ctx.layer, ctx.backend, ctx.chunk_size = layer, name, backends.chunk_size
        ctx.has_state, ctx.triton = has_state, saved is not None
        return (a, *new_state)

    @staticmethod
    def backward(ctx, da, d_conv, dC, dn, dm):
        xz, conv0, C0, n0, m0, h32, stats, cu_seqlens = ctx.saved_tensors
        layer = ctx.layer
        params = layer._core_params()
        dev = xz.device.type
        enabled, dtype = ctx.autocast
        da = torch.zeros_like(xz[..., :layer.inner_dim]) if da is None else da
        with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
            xz_ = xz.detach().requires_grad_()
            conv_ = None if conv0 is None else conv0.detach().requires_grad_()
            st = None if not ctx.has_state else tuple(t.detach().requires_grad_() for t in (C0, n0, m0))
            q, k, v, i, f, x_c, z, conv_new = layer._qkv_gates(xz_, conv_, cu_seqlens)
            leaves = [xz_] + ([conv_] if conv_ is not None else []) + params
            outs, grads = [], []
            if conv_new is not None and d_conv is not None:
                outs.append(conv_new)
                grads.append(d_conv)
            if not ctx.triton:  # PyTorch cell: run it again under autograd, one backward for everything
                h, final = mlstm(q, k, v, i, f, st, backend=ctx.backend, chunk_size=ctx.chunk_size,
                                 return_state=True, cu_seqlens=cu_seqlens)
                outs.append(layer._out(h, x_c, z))
                grads.append(da)
                for t, g in zip(final, (dC, dn, dm)):
                    if g is not None:
                        outs.append(t)
                        grads.append(g)
                got = torch.autograd.grad(outs, leaves + list(st or ()), grads, allow_unused=True)
                d_state = got[len(leaves):] if st is not None else (None,) * 3
                got = got[:len(leaves)]
            else:  # Triton cell: its saved output and statistics, its own backward, then the stabilizer's path
                h_leaf = h32.to(v.dtype).requires_grad_()
                outs.append(layer._out(h_leaf, x_c, z))
                grads.append(da)
                got_out = torch.autograd.grad(outs, [h_leaf] + leaves, grads, retain_graph=True, allow_unused=True)
                dh = got_out[0]
                dq, dk, dv, di, df, dC0, dn0 = mlstm_backward(
                    q.detach(), k.detach(), v.detach(), i.detach(), f.detach(),
                    None if not ctx.has_state else (C0, n0, m0), (h32, stats), dh, dC, dn,
                    chunk_size=ctx.chunk_size, cu_seqlens=cu_seqlens)
                cell_outs, cell_grads = [q, k, v, i, f], [dq, dk, dv, di, df]
                m_leaf = [] if st is None else [st[2]]
                if any(g is not None for g in (dC, dn, dm)):  # a loss on the returned state (rare): recompute it
                    _, (C_T, n_T, _), _ = mlstm_forward_saving(q.detach(), k.detach(), v.detach(), i.detach(),
                                                               f.detach(), None if st is None else (C0, n0, m0),
                                                               backend=ctx.backend, chunk_size=ctx.chunk_size,
                                                               cu_seqlens=cu_seqlens)
                    dm_true = _stabilizer_grad(dC, dn, dm, C_T, n_T)
                    starts = doc_starts(cu_seqlens, xz.shape[0], xz.shape[1], "mlstm", xz.device)
                    m_true = state_stabilizer(i.to(C_T.dtype), F.logsigmoid(f.to(C_T.dtype)),
                                              None if st is None else st[2], starts)
                    cell_outs.append(m_true)
                    cell_grads.append(dm_true)
                got_cell = torch.autograd.grad(cell_outs, leaves + m_leaf, cell_grads, allow_unused=True)
                got = [_add(a, b) for a, b in zip(got_out[1:], got_cell)]
                d_state = (None, None, None)
                if st is not None:  # m0 enters as exp(m0) on C0 and n0, and in the stabilizer's max
                    dm0 = (dC0 * C0).sum((-2, -1)) + (dn0 * n0).sum(-1)
                    d_state = (dC0, dn0, _add(got_cell[-1], dm0))
        d_xz = got[0]
        d_conv0 = got[1] if conv_ is not None else None
        d_params = got[1 + (conv_ is not None):]
        return (None, None, None, None, d_xz, d_conv0, *d_state, *d_params)


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


__all__ = ["mLSTMLayer", "mLSTMLayerState"]
