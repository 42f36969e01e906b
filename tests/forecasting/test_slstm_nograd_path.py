"""The fused sLSTM backend's forward without a gradient to record (``slstm_fused_infer``, the path of every
forecast): the float64 recurrent reference's outputs and final states to float32 rounding, and bit for bit
what the differentiable path computes, with initial states (some normalizers zero), packed documents and
both forget gates."""

import pytest
import torch

from openxlstm.ops.slstm import slstm

B, S, NH, d = 3, 9, 2, 4
E = NH * d
CU = torch.tensor([0, 4, 9, 12, 18, 27])  # documents across and inside rows (every row start a boundary)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(B, S, 4 * E, generator=g)
    R = torch.randn(NH, d, 4, d, generator=g) / d**0.5
    b = torch.randn(4 * E, generator=g)
    state = [torch.randn(B, E, generator=g), torch.randn(B, E, generator=g), torch.rand(B, E, generator=g) + 0.5,
             torch.randn(B, E, generator=g)]
    state[1][0, :3] = 0.0
    state[2][0, :3] = 0.0
    return x, R, b, state


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_nograd_fused_equals_reference_and_grad_path(forget_gate, packed, with_state):
    x, R, b, state = inputs()
    state = state if with_state else None
    cu = CU if packed else None
    kw = dict(forget_gate=forget_gate, return_state=True, cu_seqlens=cu)
    with torch.no_grad():
        y, st = slstm(x, R, b, state, backend="fused", **kw)
    y_g, st_g = slstm(x.clone().requires_grad_(), R, b, state, backend="fused", **kw)
    ref, st_ref = slstm(x.double(), R.double(), b.double(), None if state is None else [t.double() for t in state],
                        backend="recurrent", **kw)
    assert torch.equal(y, y_g.detach())
    assert all(torch.equal(a, c.detach()) for a, c in zip(st, st_g))
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-6)
    for a, c in zip(st, st_ref):
        assert torch.allclose(a.double(), c, rtol=1e-5, atol=1e-6)
    assert not y.requires_grad and y_g.requires_grad


def test_nograd_path_compiles_as_one_op():
    """The path is a custom op with a fake implementation: torch.compile traces it whole (fullgraph)."""
    x, R, b, state = inputs(1)

    def f(x):
        return slstm(x, R, b, state, backend="fused")

    with torch.no_grad():
        out = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
        assert torch.equal(out, f(x))
