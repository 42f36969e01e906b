"""Triton sLSTM kernel (fused forward and backward) against the float64 recurrent reference and fused.py.

Without CUDA the kernels run under the Triton interpreter (conftest.py) on tiny shapes; with CUDA the same
tests compile and run them for real, on the same cases plus larger ones (the presets' head widths among
them). The accuracy rule is the README's (see conftest.py): in float32 at most twice the error of the float32
PyTorch fused form on the same inputs (both against float64), in bfloat16 finite and within 1e-2 for gate
pre-activations from the input in [-40, 40]. Kernel outputs are NaN-filled before launch (FILL_NAN).
"""

import pytest
import torch
from conftest import GATE_RANGE, check_fp32, check_half, rel_err

from openxlstm.ops import slstm
from openxlstm.ops import triton_utils

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
NAMES = ["y", "h", "c", "n", "m", "dx", "dR", "db", "dh0", "dc0", "dn0"]


@pytest.fixture(autouse=True)
def nan_fill(monkeypatch):
    monkeypatch.setattr(triton_utils, "FILL_NAN", True)


def make_inputs(B, S, NH, d, dtype, gate_scale, with_state, seed=0):
    """x, R, b rounded to ``dtype`` (kept in float64) and an optional state whose first units have n = 0."""
    g = torch.Generator().manual_seed(seed)
    E = NH * d

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    x = r(B, S, 4 * E, scale=gate_scale)
    if dtype != torch.float32:
        x = x.clamp(-GATE_RANGE, GATE_RANGE)
    x = x.to(dtype).double()
    R = r(NH, d, 4, d, scale=d**-0.5).to(dtype).double()
    b = r(4 * E).to(dtype).double()
    state = None
    if with_state:
        state = [r(B, E), r(B, E), r(B, E).abs() + 0.5, r(B, E, scale=3.0)]
        state[1][0, :3] = 0.0  # the first-step rule (n == 0) applies to these elements only
        state[2][0, :3] = 0.0
    return (x, R, b), state


def run(backend, inputs, state, dtype, forget_gate):
    leaves = [t.to(DEV, dtype).requires_grad_(True) for t in inputs]
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    st = None if state is None else tuple(t.to(DEV, sdt).requires_grad_(j < 3) for j, t in enumerate(state))
    y, (h, c, n, m) = slstm(*leaves, st, forget_gate=forget_gate, backend=backend, return_state=True)
    # output weights exact in bfloat16, so that the incoming gradient of a half-precision y is not
    # rounded (its dot with y cancels, which would measure the rounding of the weights, not the kernel)
    w = torch.linspace(-1, 1, y.shape[-1], device=DEV).to(torch.bfloat16).float()
    loss = (y.float() * w).sum() + h.sum() * 0.3 + c.sum() * 0.1 + n.sum() * 0.2
    params = leaves + ([] if st is None else list(st[:3]))
    grads = torch.autograd.grad(loss, params)
    return dict(zip(NAMES, [y, h, c, n, m, *grads]))


# B, S, NH, d, gate scale, forget gate, state
CASES = [
    (3, 7, 2, 16, 2.0, "sigmoid", True),
    (2, 5, 2, 40, 2.0, "sigmoid", False),
    (2, 8, 2, 16, 30.0, "sigmoid", True),
    (17, 4, 1, 24, 1.0, "exp", True),
]
if CUDA:
    CASES += [
        (16, 64, 4, 64, 2.0, "sigmoid", True),
        (5, 33, 2, 256, 2.0, "sigmoid", True),  # the kernel benchmark's head width (E1024 NH4)
        (40, 20, 3, 48, 30.0, "sigmoid", True),
        (7, 50, 2, 32, 1.0, "exp", False),
        (4, 40, 4, 192, 2.0, "sigmoid", True),  # 125m sLSTM head width (E768 NH4)
        (2, 20, 2, 512, 2.0, "sigmoid", False),  # 1.3b sLSTM head width (E2048 NH4)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B%dS%dNH%dd%d_g%d_%s_state%d" % c)
def test_matches_reference(case, dtype):
    B, S, NH, d, gate_scale, forget_gate, with_state = case
    inputs, state = make_inputs(B, S, NH, d, dtype, gate_scale, with_state, seed=B * S + d)
    ref = run("recurrent", inputs, state, torch.float64, forget_gate)
    out = run("triton", inputs, state, dtype, forget_gate)
    assert out["y"].dtype == dtype and out["c"].dtype == torch.float32
    if dtype == torch.float32:
        check_fp32(out, run("fused", inputs, state, torch.float32, forget_gate), ref)
    else:
        check_half(out, ref)


def test_matches_fused_and_leaves_state():
    inputs, state = make_inputs(2, 6, 2, 16, torch.float32, 2.0, True)
    st = tuple(t.to(DEV, torch.float32) for t in state)
    copies = tuple(t.clone() for t in st)
    x, R, b = (t.to(DEV, torch.float32) for t in inputs)
    y, fin = slstm(x, R, b, st, backend="triton", return_state=True)
    y_ref, fin_ref = slstm(x, R, b, st, backend="fused", return_state=True)
    assert rel_err(y, y_ref) <= 1e-5
    for a, r in zip(fin, fin_ref):
        assert rel_err(a, r) <= 1e-5
    for a, r in zip(st, copies):
        assert torch.equal(a, r)
    assert not fin.m.requires_grad


def test_first_step_rule_from_zero_state():
    """From the zero state m_1 = i_1 per element, whatever the forget gate: h_1 = sigmoid(o) tanh(z)."""
    B, NH, d = 2, 1, 16
    E = NH * d
    x = torch.randn(B, 1, 4 * E, device=DEV) * 5
    R = torch.zeros(NH, d, 4, d, device=DEV)
    b = torch.zeros(4 * E, device=DEV)
    y, fin = slstm(x, R, b, backend="triton", return_state=True)
    i, _, z, o = x[:, 0].view(B, 4, E).unbind(1)
    assert rel_err(y[:, 0], torch.sigmoid(o) * torch.tanh(z)) <= 1e-5
    assert torch.equal(fin.m, i)


def test_float64_keeps_float64_conventions():
    inputs, state = make_inputs(2, 5, 2, 16, torch.float64, 2.0, True)
    xs = [t.to(DEV) for t in inputs]
    st = tuple(t.to(DEV) for t in state)
    y, fin = slstm(*xs, st, backend="triton", return_state=True)
    y_ref, _ = slstm(*xs, st, backend="recurrent", return_state=True)
    assert y.dtype == torch.float64 and fin.c.dtype == torch.float64
    assert rel_err(y, y_ref) <= 1e-10
