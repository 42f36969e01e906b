"""Triton mLSTM kernels (chunkwise forward/backward and the decode step) against the float64 references.

Without CUDA the kernels run under the Triton interpreter (set up by conftest.py), so the shapes are tiny;
with CUDA the same tests use larger shapes. Kernel outputs are NaN-filled before launch (FILL_NAN), so an
element a kernel skips fails the comparison.
"""

import pytest
import torch
from conftest import rel_err

from openxlstm.ops import mlstm, mlstm_decode
from openxlstm.ops.mlstm import mLSTMState, mlstm_step
from openxlstm.ops.mlstm import triton_utils

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}
NAMES = ["h", "C", "n", "m", "dq", "dk", "dv", "di", "df", "dC0", "dn0"]


@pytest.fixture(autouse=True)
def nan_fill(monkeypatch):
    monkeypatch.setattr(triton_utils, "FILL_NAN", True)


def make_inputs(B, NH, S, dqk, dv, dtype, gate_scale, with_state, seed=0):
    """Random inputs rounded to ``dtype`` (kept as float64 for the reference) and an optional state."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift

    inputs = [r(B, NH, S, dqk), r(B, NH, S, dqk), r(B, NH, S, dv),
              r(B, NH, S, scale=gate_scale), r(B, NH, S, scale=gate_scale, shift=2.0)]
    inputs = [t.to(dtype).double() for t in inputs]
    state = (r(B, NH, dqk, dv), r(B, NH, dqk).abs(), r(B, NH, scale=3.0)) if with_state else None
    return inputs, state


def run(backend, inputs, state, dtype, chunk_size):
    """Forward, final state and all gradients of a loss that touches h and the final C and n."""
    leaves = [t.to(DEV, dtype).requires_grad_(True) for t in inputs]
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    st = None if state is None else tuple(t.to(DEV, sdt).requires_grad_(j < 2) for j, t in enumerate(state))
    h, (C, n, m) = mlstm(*leaves, st, backend=backend, chunk_size=chunk_size, return_state=True)
    # output weights exact in bfloat16, so that the incoming gradient of a half-precision h is not
    # rounded (its dot with h cancels, which would measure the rounding of the weights, not the kernel)
    w = torch.linspace(-1, 1, h.shape[-1], device=DEV).to(torch.bfloat16).float()
    loss = (h.float() * w).sum() + C.sum() * 0.1 + n.sum() * 0.2
    params = leaves + ([] if st is None else list(st[:2]))
    grads = torch.autograd.grad(loss, params)
    return dict(zip(NAMES, [h, C, n, m, *grads]))


if CUDA:
    CASES = [  # B, NH, S, d_qk, d_v, gate scale, chunk, state
        (2, 3, 1, 64, 128, 3.0, 64, True),  # S = 1 with a state (without, h = sign(q.k) v and dq = 0)
        (2, 4, 300, 64, 128, 3.0, 64, True),
        (1, 2, 517, 256, 512, 3.0, 64, True),
        (2, 2, 130, 48, 80, 40.0, 32, True),
        (1, 2, 200, 16, 16, 3.0, 128, False),
        (2, 2, 40, 64, 64, 3.0, 64, False),
    ]
else:
    CASES = [
        (2, 2, 1, 16, 32, 3.0, 16, True),  # S = 1 with a state (without, h = sign(q.k) v and dq = 0)
        (1, 3, 7, 24, 40, 3.0, 16, True),
        (1, 2, 33, 16, 32, 3.0, 16, True),
        (1, 2, 40, 20, 70, 50.0, 16, True),
        (1, 1, 45, 72, 130, 3.0, 20, True),  # several d_qk and d_v tiles; chunk 20 runs as 32
        (1, 1, 70, 40, 72, 3.0, 64, True),  # 64-token chunks: the launch configuration used on GPUs
        (1, 2, 19, 16, 16, 3.0, 16, False),  # no initial state
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B%dNH%dS%d_%dx%d_g%d_L%d_state%d" % c)
def test_chunkwise_matches_reference(case, dtype):
    """float16 also exercises the half-precision tensor-core dot path under the interpreter."""
    B, NH, S, dqk, dv, gate_scale, chunk, with_state = case
    inputs, state = make_inputs(B, NH, S, dqk, dv, dtype, gate_scale, with_state, seed=S)
    ref = run("chunkwise", inputs, state, torch.float64, chunk)
    out = run("triton", inputs, state, dtype, chunk)
    assert out["h"].dtype == dtype and out["C"].dtype == torch.float32
    for key in ref:
        err = rel_err(out[key], ref[key])
        assert err <= TOL[dtype], (key, err)


def test_state_untouched_and_m_has_no_gradient():
    inputs, state = make_inputs(1, 2, 20, 16, 16, torch.float32, 3.0, True)
    st = tuple(t.to(DEV, torch.float32) for t in state)
    copies = tuple(t.clone() for t in st)
    h, (C, n, m) = mlstm(*(t.to(DEV, torch.float32) for t in inputs), st, backend="triton", chunk_size=16,
                         return_state=True)
    for a, b in zip(st, copies):
        assert torch.equal(a, b)
    assert not m.requires_grad
    assert torch.isfinite(h).all()


def test_only_state_gradients():
    """A loss on the final state alone (h unused) still back-propagates to every input."""
    inputs, _ = make_inputs(1, 2, 19, 16, 16, torch.float32, 3.0, False)
    leaves = [t.to(DEV, torch.float32).requires_grad_(True) for t in inputs]
    ref_leaves = [t.to(DEV).requires_grad_(True) for t in inputs]
    grads = []
    for backend, xs in (("triton", leaves), ("chunkwise", ref_leaves)):
        _, (C, n, _) = mlstm(*xs, backend=backend, chunk_size=16, return_state=True)
        grads.append(torch.autograd.grad(C.sum() + n.sum(), xs, allow_unused=True))
    for name, a, b in zip("qkvif", *grads):
        if b is None or b.abs().max() == 0:
            assert a is None or a.abs().max() == 0, name
        else:
            assert rel_err(a, b) <= 1e-3, name


STEP_CASES = [(3, 2, 16, 32), (2, 3, 40, 24)] if not CUDA else [(16, 8, 256, 512), (3, 2, 40, 72)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("shape", STEP_CASES, ids=lambda s: "B%dNH%d_%dx%d" % s)
def test_decode_step_matches_reference(shape, with_state, dtype):
    B, NH, dqk, dv = shape
    g = torch.Generator().manual_seed(B * dqk)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    q, k, v = (r(B, NH, d).to(dtype).double() for d in (dqk, dqk, dv))
    i, f = r(B, NH, scale=20.0).to(dtype).double(), r(B, NH, scale=20.0).to(dtype).double()
    if with_state:
        state64 = mLSTMState(r(B, NH, dqk, dv), r(B, NH, dqk).abs(), r(B, NH, scale=5.0))
    else:
        state64 = mLSTMState(torch.zeros(B, NH, dqk, dv, dtype=torch.float64),
                             torch.zeros(B, NH, dqk, dtype=torch.float64), torch.zeros(B, NH, dtype=torch.float64))
    h_ref, st_ref = mlstm_step(q, k, v, i, f, state64)
    st = tuple(t.to(DEV, torch.float32) for t in state64) if with_state else None
    copies = None if st is None else tuple(t.clone() for t in st)
    h, new = mlstm_decode(*(t.to(DEV, dtype) for t in (q, k, v, i, f)), st, backend="triton")
    assert h.dtype == dtype and h.shape == (B, NH, dv)
    assert rel_err(h, h_ref) <= TOL[dtype]
    for a, b in zip(new, st_ref):
        assert a.dtype == torch.float32
        assert rel_err(a, b) <= 1e-5
    if copies is not None:
        for a, b in zip(st, copies):
            assert torch.equal(a, b)


def test_decode_steps_continue_the_chunkwise_state():
    """Steps after a chunkwise prefix reproduce the chunkwise outputs of the whole sequence."""
    inputs, state = make_inputs(1, 2, 21, 16, 24, torch.float32, 3.0, True)
    q, k, v, i, f = (t.to(DEV, torch.float32) for t in inputs)
    st = tuple(t.to(DEV, torch.float32) for t in state)
    h_all = mlstm(q, k, v, i, f, st, backend="chunkwise", chunk_size=16)
    _, st2 = mlstm(q[:, :, :18], k[:, :, :18], v[:, :, :18], i[:, :, :18], f[:, :, :18], st,
                   backend="triton", chunk_size=16, return_state=True)
    for t in range(18, 21):
        h_t, st2 = mlstm_decode(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], st2, backend="triton")
        assert rel_err(h_t, h_all[:, :, t]) <= 1e-4


def test_float64_keeps_float64_conventions():
    """Float64 inputs go through the exact plain-PyTorch forms and keep float64 states."""
    inputs, state = make_inputs(1, 2, 9, 16, 16, torch.float64, 3.0, True)
    xs = [t.to(DEV) for t in inputs]
    st = tuple(t.to(DEV) for t in state)
    h, fin = mlstm(*xs, st, backend="triton", chunk_size=16, return_state=True)
    h_ref, fin_ref = mlstm(*xs, st, backend="recurrent", return_state=True)
    assert h.dtype == torch.float64 and fin.C.dtype == torch.float64
    assert rel_err(h, h_ref) <= 1e-10
    h1, s1 = mlstm_decode(*(t[:, :, 0] for t in xs), st, backend="triton")
    h1_ref, _ = mlstm_decode(*(t[:, :, 0] for t in xs), st, backend="recurrent")
    assert s1.C.dtype == torch.float64 and rel_err(h1, h1_ref) <= 1e-12
