"""sLSTM op (reference loop vs fused backward), causal conv, and parity with the xlstm package's cell."""

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from openxlstm.ops import causal_conv1d, slstm


def make(B, S, NH, d, dtype=torch.float64, seed=0, with_state=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    E = NH * d
    x = (torch.randn(B, S, 4 * E, generator=g, dtype=torch.float64) * scale).to(dtype)
    R = (torch.randn(NH, d, 4, d, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    b = torch.randn(4 * E, generator=g, dtype=torch.float64).to(dtype)
    state = None
    if with_state:
        sd = torch.float64 if dtype == torch.float64 else torch.float32
        h, c, m = (torch.randn(B, E, generator=g, dtype=torch.float64).to(sd) for _ in range(3))
        n = torch.rand(B, E, generator=g, dtype=torch.float64).to(sd) + 0.5
        state = (h, c, n, m)
    return x, R, b, state


def run(backend, x, R, b, state, forget_gate="sigmoid"):
    leaves = [t.clone().requires_grad_() for t in (x, R, b)]
    st = None if state is None else tuple(t.clone().requires_grad_(j < 3) for j, t in enumerate(state))
    h, fin = slstm(*leaves, st, forget_gate=forget_gate, backend=backend, return_state=True)
    out = {"h": h, "h_T": fin.h, "c_T": fin.c, "n_T": fin.n, "m_T": fin.m}
    w = torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype)
    loss = (h * w).sum() + fin.h.sum() + 0.3 * (fin.c / fin.n).sum()
    params = leaves + ([] if st is None else list(st[:3]))
    for name, g in zip(["dx", "dR", "db", "dh0", "dc0", "dn0"], torch.autograd.grad(loss, params)):
        out[name] = g
    return out


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("S,with_state", [(1, False), (9, True), (40, False)])
def test_fused_equals_reference(forget_gate, S, with_state):
    x, R, b, state = make(2, S, 3, 4, with_state=with_state, seed=S)
    ref = run("recurrent", x, R, b, state, forget_gate)
    out = run("fused", x, R, b, state, forget_gate)
    for key in ref:
        assert rel_err(out[key], ref[key]) <= 1e-12, key


@pytest.mark.parametrize("backend", ["recurrent", "fused"])
def test_gradcheck(backend):
    x, R, b, state = make(1, 4, 2, 2, with_state=True, seed=1)
    leaves = [t.clone().requires_grad_() for t in (x, R, b, *state[:3])]

    def fn(x, R, b, h0, c0, n0):
        h, fin = slstm(x, R, b, (h0, c0, n0, state[3]), backend=backend, return_state=True)
        return h, fin.h, fin.c / fin.n, fin.c, fin.n, fin.m  # the stored state too (its m carries a gradient)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["recurrent", "fused"])
def test_split_with_carried_state_equals_one_pass(backend):
    x, R, b, _ = make(2, 30, 2, 4, seed=4)
    h_full, s_full = slstm(x, R, b, backend=backend, return_state=True)
    h1, s1 = slstm(x[:, :11], R, b, backend=backend, return_state=True)
    h2, s2 = slstm(x[:, 11:], R, b, s1, backend=backend, return_state=True)
    assert rel_err(torch.cat([h1, h2], 1), h_full) <= 1e-13
    for a, c in zip(s2, s_full):
        assert rel_err(a, c) <= 1e-13


def test_first_step_rule_is_per_element():
    """Where n == 0 the stabilizer restarts at i (m_t = i_t), elsewhere it follows the recurrence."""
    x, R, b, state = make(1, 1, 1, 4, with_state=True, seed=2)
    h0, c0, n0, m0 = state
    n0 = n0.clone()
    n0[0, :2] = 0.0
    c0 = torch.where(n0 == 0, torch.zeros_like(c0), c0)
    _, fin = slstm(x, R, b, (h0, c0, n0, m0 + 100.0), backend="fused", return_state=True)
    pre = x[0, 0].view(4, 4) + b.view(4, 4) + torch.einsum("i,igo->go", h0[0], R[0])
    i, logf = pre[0], F.logsigmoid(pre[1])
    assert torch.allclose(fin.m[0, :2], i[:2])
    assert torch.allclose(fin.m[0, 2:], logf[2:] + m0[0, 2:] + 100.0)  # far above i: the recurrence


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_gates_long_sequence_finite(dtype):
    x, R, b, _ = make(1, 4096, 2, 4, dtype=dtype, seed=3, scale=25.0)  # pre-activations well beyond +-50
    x.requires_grad_()
    h, fin = slstm(x, R, b, backend="fused", return_state=True)
    assert h.dtype == dtype and fin.c.dtype == torch.float32
    h.float().sum().backward()
    assert torch.isfinite(h.float()).all() and torch.isfinite(x.grad.float()).all()


def test_matches_reference_package_cell():
    """Our cell equals the xlstm package's vanilla sLSTM recurrence on the same weights."""
    from xlstm.blocks.slstm.src.vanilla import slstm_forward, slstm_pointwise_function_registry

    B, S, NH, d = 2, 12, 2, 3
    E = NH * d
    x, R, b, _ = make(B, S, NH, d, seed=7)
    R_int = R.permute(0, 2, 3, 1).reshape(NH, 4 * d, d)  # their vanilla layout (NH, 4*d_out, d_in)
    states = torch.zeros(4, B, E, dtype=torch.float64)
    all_states, _, _ = slstm_forward(x.transpose(0, 1), states, R_int, b, slstm_pointwise_function_registry["slstm"])
    h_ref = all_states[0, 1:].transpose(0, 1)
    assert rel_err(slstm(x, R, b, backend="recurrent"), h_ref) <= 1e-12
    assert rel_err(slstm(x, R, b, backend="fused"), h_ref) <= 1e-12


def test_bad_inputs():
    x, R, b, _ = make(1, 3, 2, 4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, S, 4\*E\)"):
        slstm(x[..., :-1], R, b)
    with pytest.raises(ValueError, match=r"R must have shape"):
        slstm(x, R[:, :, :3], b)
    with pytest.raises(ValueError, match=r"b must have shape"):
        slstm(x, R, b[:-1])
    with pytest.raises(ValueError, match=r"forget_gate"):
        slstm(x, R, b, forget_gate="tanh")
    with pytest.raises(ValueError, match=r"state c must have shape"):
        slstm(x, R, b, (torch.zeros(1, 8), torch.zeros(1, 7), torch.zeros(1, 8), torch.zeros(1, 8)))


def test_causal_conv_matches_conv1d_and_carries_state():
    g = torch.Generator().manual_seed(0)
    B, S, Fd, K = 2, 11, 5, 4
    x = torch.randn(B, S, Fd, generator=g, dtype=torch.float64)
    w = torch.randn(Fd, K, generator=g, dtype=torch.float64)
    bias = torch.randn(Fd, generator=g, dtype=torch.float64)
    ref = F.conv1d(x.transpose(1, 2), w[:, None], bias, padding=K - 1, groups=Fd)[..., :S].transpose(1, 2)
    assert rel_err(causal_conv1d(x, w, bias), ref) <= 1e-14
    y1, st = causal_conv1d(x[:, :6], w, bias, return_state=True)
    parts = [y1]
    for t in range(6, S):
        y, st = causal_conv1d(x[:, t : t + 1], w, bias, st, return_state=True)
        parts.append(y)
    assert rel_err(torch.cat(parts, 1), ref) <= 1e-14
    with pytest.raises(ValueError, match=r"state must have shape"):
        causal_conv1d(x, w, bias, torch.zeros(B, K, Fd))
