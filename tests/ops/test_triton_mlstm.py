"""Triton mLSTM kernels (chunkwise forward/backward and the decode step) against the float64 references.

Without CUDA the kernels run under the Triton interpreter (set up by conftest.py) on tiny shapes; with CUDA
the same tests compile and run them for real, on the same cases plus larger ones. The accuracy rule is the
README's (see conftest.py): in float32 at most twice the error of the float32 PyTorch chunkwise form on the
same inputs (both against float64), in bfloat16 and float16 finite and within 1e-2 for gate pre-activations
in [-40, 40]. Kernel outputs are NaN-filled before launch (FILL_NAN), so an element a kernel skips fails.
"""

import pytest
import torch
from conftest import FP32_FACTOR, FP32_FLOOR, GATE_RANGE, HALF_TOL, check_fp32, check_half, rel_err

from openxlstm.ops import mlstm, mlstm_decode
from openxlstm.ops.mlstm import mLSTMState, mlstm_step
from openxlstm.ops import triton_utils

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
HALF = (torch.bfloat16, torch.float16)
NAMES = ["h", "C", "n", "m", "dq", "dk", "dv", "di", "df", "dC0", "dn0"]


@pytest.fixture(autouse=True)
def nan_fill(monkeypatch):
    monkeypatch.setattr(triton_utils, "FILL_NAN", True)


def make_inputs(B, NH, S, dqk, dv, dtype, gate_scale, with_state, seed=0):
    """Random inputs rounded to ``dtype`` (kept as float64 for the reference) and an optional state.

    Half-precision cases keep the gate pre-activations in [-40, 40] (the range the README's 1e-2 covers)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift

    inputs = [r(B, NH, S, dqk), r(B, NH, S, dqk), r(B, NH, S, dv),
              r(B, NH, S, scale=gate_scale), r(B, NH, S, scale=gate_scale, shift=2.0)]
    if dtype in HALF:
        inputs[3:] = [t.clamp(-GATE_RANGE, GATE_RANGE) for t in inputs[3:]]
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


# B, NH, S, d_qk, d_v, gate scale, chunk, state
CASES = [
    (2, 2, 1, 16, 32, 3.0, 16, True),  # S = 1 with a state (without, h = sign(q.k) v and dq = 0)
    (1, 3, 7, 24, 40, 3.0, 16, True),
    (1, 2, 33, 16, 32, 3.0, 16, True),
    (1, 2, 40, 20, 70, 50.0, 16, True),  # gates beyond +-40 (half precision: clamped to [-40, 40])
    (1, 1, 45, 72, 130, 3.0, 20, True),  # several d_qk and d_v tiles; chunk 20 runs as 32
    (1, 1, 70, 40, 72, 3.0, 64, True),  # 64-token chunks: the launch configuration used on GPUs
    (1, 2, 19, 16, 16, 3.0, 16, False),  # no initial state
]
if CUDA:  # larger shapes: the ones that failed on an H100 once, the benchmark's, the model presets' head shapes
    CASES += [
        (2, 2, 130, 48, 80, 40.0, 32, True),
        (2, 2, 40, 64, 64, 3.0, 64, False),
        (2, 4, 1100, 128, 256, 3.0, 256, True),  # the benchmark's head shape, the kernel's default chunk
        (1, 2, 517, 256, 512, 3.0, 64, True),
        (1, 2, 700, 384, 384, 40.0, 128, True),  # 125m head shape
        (1, 1, 300, 1024, 1024, 3.0, 256, False),  # 1.3b head shape
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
    if dtype == torch.float32:
        check_fp32(out, run("chunkwise", inputs, state, torch.float32, chunk), ref)
    else:
        check_half(out, ref)


def test_state_untouched_and_m_differentiable():
    """The caller's state is not modified; the returned m carries the gradient of its max (test_packing.py
    checks its values against finite differences)."""
    inputs, state = make_inputs(1, 2, 20, 16, 16, torch.float32, 3.0, True)
    st = tuple(t.to(DEV, torch.float32) for t in state)
    copies = tuple(t.clone() for t in st)
    xs = [t.to(DEV, torch.float32).requires_grad_() for t in inputs]
    h, (C, n, m) = mlstm(*xs, st, backend="triton", chunk_size=16, return_state=True)
    for a, b in zip(st, copies):
        assert torch.equal(a, b)
    di, df = torch.autograd.grad(m.sum(), xs[3:])
    assert di.abs().sum() + df.abs().sum() > 0 and torch.isfinite(h).all()


def test_only_state_gradients():
    """A loss on the final state alone (h unused) still back-propagates to every input (float32 rule)."""
    inputs, _ = make_inputs(1, 2, 19, 16, 16, torch.float32, 3.0, False)
    grads = {}
    for name, backend, dtype in (("ref", "chunkwise", torch.float64), ("base", "chunkwise", torch.float32),
                                 ("out", "triton", torch.float32)):
        xs = [t.to(DEV, dtype).requires_grad_(True) for t in inputs]
        _, (C, n, _) = mlstm(*xs, backend=backend, chunk_size=16, return_state=True)
        gs = torch.autograd.grad(C.sum() + n.sum(), xs, allow_unused=True)
        grads[name] = {k: torch.zeros_like(x) if g is None else g for k, x, g in zip("qkvif", xs, gs)}
    check_fp32(grads["out"], grads["base"], grads["ref"])


STEP_CASES = [(3, 2, 16, 32), (2, 3, 40, 24)] + ([(16, 8, 256, 512), (3, 2, 40, 72)] if CUDA else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("shape", STEP_CASES, ids=lambda s: "B%dNH%d_%dx%d" % s)
def test_decode_step_matches_reference(shape, with_state, dtype):
    """h by the accuracy rule (float32: against the float32 PyTorch step); new states within 1e-5 (float32)."""
    B, NH, dqk, dv = shape
    g = torch.Generator().manual_seed(B * dqk)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    q, k, v = (r(B, NH, d).to(dtype).double() for d in (dqk, dqk, dv))
    i, f = (r(B, NH, scale=20.0).to(dtype).double() for _ in range(2))
    if with_state:
        state64 = mLSTMState(r(B, NH, dqk, dv), r(B, NH, dqk).abs(), r(B, NH, scale=5.0))
    else:
        state64 = mLSTMState(torch.zeros(B, NH, dqk, dv, dtype=torch.float64),
                             torch.zeros(B, NH, dqk, dtype=torch.float64), torch.zeros(B, NH, dtype=torch.float64))
    h_ref, st_ref = mlstm_step(q, k, v, i, f, state64)
    st = tuple(t.to(DEV, torch.float32) for t in state64) if with_state else None
    copies = None if st is None else tuple(t.clone() for t in st)
    h, new = mlstm_decode(*(t.to(DEV, dtype) for t in (q, k, v, i, f)), st, backend="triton")
    assert h.dtype == dtype and h.shape == (B, NH, dv) and h.device.type == DEV
    if dtype == torch.float32:
        st32 = mLSTMState(*(t.float() for t in state64))
        h32, _ = mlstm_step(q.float(), k.float(), v.float(), i.float(), f.float(), st32)
        check_fp32({"h": h}, {"h": h32}, {"h": h_ref})
    else:
        check_half({"h": h}, {"h": h_ref})
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


def test_accuracy_rule_can_fail():
    """The rule itself: an error of three times the PyTorch form's fails, NaN fails, 1e-2 + a bit fails."""
    ref = {"x": torch.ones(10, dtype=torch.float64)}
    base = {"x": ref["x"] + 1e-4}
    with pytest.raises(AssertionError):
        check_fp32({"x": ref["x"] + 3e-4}, base, ref)
    check_fp32({"x": ref["x"] + (FP32_FACTOR * 1e-4 + FP32_FLOOR) * 0.99}, base, ref)
    with pytest.raises(AssertionError):
        check_half({"x": ref["x"] * float("nan")}, ref)
    with pytest.raises(AssertionError):
        check_half({"x": ref["x"] * (1 + HALF_TOL * 1.01)}, ref)
    check_half({"x": ref["x"] * (1 + HALF_TOL * 0.99)}, ref)
