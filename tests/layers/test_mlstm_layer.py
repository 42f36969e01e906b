"""The mLSTM layer's memory-saving core (recompute in backward) against the same layer run under plain
autograd: outputs, final states and every gradient (input, parameters, carried state with its stabilizer m),
for each backend, with and without packed documents."""

import pytest
import torch
from conftest import rel_err

from openxlstm import xLSTMConfig
from openxlstm.layers import Backends, mLSTMLayer, mLSTMLayerState
from openxlstm.layers.common import BlockDiagonalLinear
from openxlstm.ops.mlstm import mlstm
from openxlstm.ops.mlstm.layer_op import core_output, qkv_gates

CASES = [  # backend, dtype, S, with_state, conv kernel, packed documents
    ("chunkwise", torch.float64, 37, False, 4, False),
    ("chunkwise", torch.float64, 37, True, 4, False),
    ("chunkwise", torch.float64, 37, True, 4, True),
    ("parallel", torch.float64, 20, True, 0, False),
    ("recurrent", torch.float64, 9, True, 4, True),
    ("triton", torch.float32, 37, True, 4, False),
    ("triton", torch.float32, 37, True, 4, True),
    ("triton", torch.float32, 21, False, 0, False),
]


def _layer(dtype, conv):
    torch.manual_seed(0)
    cfg = xLSTMConfig(vocab_size=11, embedding_dim=32, num_blocks=2, mlstm_num_heads=2, mlstm_conv_kernel=conv,
                      bias=True)
    layer = mLSTMLayer(cfg).to(dtype)
    with torch.no_grad():  # gates that matter: the reference init has zero gate weights
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer


def _state(layer, B, dtype, conv):
    g = torch.Generator().manual_seed(7)
    I, NH, DH = layer.inner_dim, layer.num_heads, layer.head_dim
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    return mLSTMLayerState(
        torch.randn(B, conv - 1, I, generator=g, dtype=dtype) if conv else None,
        torch.randn(B, NH, DH, DH, generator=g, dtype=sdt), torch.randn(B, NH, DH, generator=g, dtype=sdt).abs(),
        torch.randn(B, NH, generator=g, dtype=sdt))


def _run(layer, x, state, backends, plain: bool, cu_seqlens=None):
    leaves = [x] + [t for t in (state or ()) if t is not None and t.dtype.is_floating_point]
    leaves = [t.detach().requires_grad_() for t in leaves]
    x_ = leaves[0]
    st = None
    if state is not None:
        it = iter(leaves[1:])
        st = mLSTMLayerState(*(None if t is None else next(it) for t in state))
    if plain:  # the same maths with autograd keeping everything
        w = layer.core_weights()
        q, k, v, i, f, x_c, z, conv = qkv_gates(layer.proj_up(x_), w, layer.num_heads, None if st is None else st.conv,
                                                cu_seqlens)
        h, cell = mlstm(q, k, v, i, f, None if st is None else (st.C, st.n, st.m), backend=backends.mlstm,
                        chunk_size=backends.chunk_size, return_state=True, cu_seqlens=cu_seqlens)
        y, new = layer.proj_down(core_output(h, x_c, z, w, layer.outnorm.eps)), mLSTMLayerState(conv, *cell)
    else:
        y, new = layer(x_, st, cu_seqlens, backends=backends)
    w = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)
    loss = (y * w).sum() + new.C.sum() * 0.1 + new.n.sum() * 0.2 + new.m.sum() * 0.4
    if new.conv is not None:
        loss = loss + new.conv.sum() * 0.3
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad(loss, leaves + params)
    return [y, new.C, new.n, new.m] + list(grads)


@pytest.mark.parametrize("backend,dtype,S,with_state,conv,packed", CASES)
def test_core_equals_plain_autograd(backend, dtype, S, with_state, conv, packed):
    layer = _layer(dtype, conv)
    B = 2
    x = torch.randn(B, S, 32, generator=torch.Generator().manual_seed(1), dtype=dtype)
    state = _state(layer, B, dtype, conv) if with_state else None
    backends = Backends(mlstm=backend, chunk_size=16)
    cu = torch.tensor([0, 1, 3, S, S + S // 2, 2 * S]) if packed else None
    fast = _run(layer, x, state, backends, plain=False, cu_seqlens=cu)
    ref = _run(layer, x, state, backends, plain=True, cu_seqlens=cu)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for j, (a, b) in enumerate(zip(fast, ref)):
        assert rel_err(a, b) <= tol, (j, rel_err(a, b))


def test_core_keeps_little_for_backward():
    """Saved for backward by the layer: xz (2I per token) and the cell's output at most, not the conv output,
    q, k, v, gates or norm outputs (about 9 I per token under plain autograd)."""
    layer = _layer(torch.float32, 4)
    x = torch.randn(2, 40, 32, requires_grad=True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        layer(x, None, backends=Backends(mlstm="chunkwise"))
    params = sum(p.numel() for p in layer.parameters())
    per_token = (sum(sizes) - params) / 80
    assert per_token <= 4 * layer.inner_dim, per_token


def test_block_diagonal_linear_saves_its_input_only():
    lin = BlockDiagonalLinear(32, 8).double()
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lin(x)
    assert all(t.data_ptr() in (x.data_ptr(), lin.weight.data_ptr()) for t in saved)
    ref = torch.einsum("...hi,hoi->...ho", x.view(3, 5, 8, 4), lin.weight).reshape(3, 5, 32)
    g = torch.randn_like(y)
    assert rel_err(y, ref) <= 1e-15
    for a, b in zip(torch.autograd.grad(y, (x, lin.weight), g), torch.autograd.grad(ref, (x, lin.weight), g)):
        assert rel_err(a, b) <= 1e-14
