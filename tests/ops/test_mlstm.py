"""mLSTM op: the three plain-PyTorch forms against each other, the reference package, and edge cases."""

import pytest
import torch
from conftest import rel_err

from openxlstm.ops import mlstm, mlstm_decode
from openxlstm.ops.mlstm.recurrent import mlstm_step, mlstm_step_inference
from openxlstm.ops.mlstm.common import mLSTMState
from openxlstm.ops.mlstm import M_FLOOR

FORMS = ("recurrent", "parallel", "chunkwise")


def make_inputs(B, NH, S, dqk, dv, dtype=torch.float64, gate_scale=3.0, seed=0, with_state=False):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    q, k, v = r(B, NH, S, dqk), r(B, NH, S, dqk), r(B, NH, S, dv)
    i, f = r(B, NH, S, scale=gate_scale), r(B, NH, S, scale=gate_scale, shift=2.0)
    state = None
    if with_state:
        state = (r(B, NH, dqk, dv).float() if dtype != torch.float64 else r(B, NH, dqk, dv),
                 r(B, NH, dqk).abs() if dtype == torch.float64 else r(B, NH, dqk).abs().float(),
                 r(B, NH) if dtype == torch.float64 else r(B, NH).float())
    return (q, k, v, i, f), state


def run(form, inputs, state, chunk_size=16, grads=True):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    st = None if state is None else tuple(t.clone().requires_grad_(j < 2) for j, t in enumerate(state))
    h, (C, n, m) = mlstm(*leaves, st, backend=form, chunk_size=chunk_size, return_state=True)
    out = {"h": h, "C": C, "n": n, "m": m}
    if grads:
        w = torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype)
        loss = (h * w).sum() + C.sum() * 0.1 + n.sum() * 0.2
        params = leaves + ([] if st is None else list(st[:2]))
        for name, gr in zip(["dq", "dk", "dv", "di", "df", "dC0", "dn0"], torch.autograd.grad(loss, params)):
            out[name] = gr
    return out


@pytest.mark.parametrize("S", [1, 7, 65, 193])
@pytest.mark.parametrize("with_state", [False, True])
def test_forms_agree_float64(S, with_state):
    inputs, state = make_inputs(2, 3, S, 8, 6, with_state=with_state, seed=S)
    ref = run("recurrent", inputs, state)
    for form in ("parallel", "chunkwise"):
        out = run(form, inputs, state, chunk_size=16)
        for key in ref:
            assert rel_err(out[key], ref[key]) <= 1e-7, (form, key, rel_err(out[key], ref[key]))


@pytest.mark.parametrize("chunk_size", [1, 5, 64, 256])
def test_chunk_sizes_agree(chunk_size):
    inputs, state = make_inputs(1, 2, 70, 4, 4, with_state=True, seed=3)
    ref = run("parallel", inputs, state, grads=False)
    out = run("chunkwise", inputs, state, chunk_size=chunk_size, grads=False)
    for key in ref:
        assert rel_err(out[key], ref[key]) <= 1e-10


@pytest.mark.parametrize("form", FORMS)
def test_split_with_carried_state_equals_one_pass(form):
    (q, k, v, i, f), _ = make_inputs(2, 2, 50, 8, 8, seed=5)
    h_full, s_full = mlstm(q, k, v, i, f, backend=form, chunk_size=8, return_state=True)
    state, hs = None, []
    for a, b in [(0, 13), (13, 14), (14, 40), (40, 50)]:
        sl = (slice(None), slice(None), slice(a, b))
        h, state = mlstm(q[sl], k[sl], v[sl], i[sl], f[sl], state, backend=form, chunk_size=8, return_state=True)
        hs.append(h)
    assert rel_err(torch.cat(hs, dim=2), h_full) <= 1e-12
    for a, b in zip(state, s_full):
        assert rel_err(a, b) <= 1e-12


@pytest.mark.parametrize("form", FORMS)
def test_gradcheck(form):
    inputs, state = make_inputs(1, 2, 5, 3, 2, with_state=True, seed=11)
    leaves = [t.clone().requires_grad_() for t in inputs] + [state[0].clone().requires_grad_(), state[1].clone().requires_grad_()]

    def fn(q, k, v, i, f, C, n):
        # The outputs, and the outputs of a continuation that reads the final state (second segment: the same
        # tokens reversed in time); the stored state itself is checked in test_packing.py.
        h, st = mlstm(q, k, v, i, f, (C, n, state[2]), backend=form, chunk_size=2, return_state=True)
        flip = [t.flip(2) for t in (q, k, v, i, f)]
        h2 = mlstm(*flip, st, backend=form, chunk_size=2)
        return h, h2

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_gates_long_sequence_finite(dtype):
    """Gates in +-50 (and an input gate far below the stabilizer floor) over S = 4096 stay finite."""
    g = torch.Generator().manual_seed(0)
    B, NH, S, D = 1, 2, 4096, 16
    q, k, v = (torch.randn(B, NH, S, D, generator=g).to(dtype).requires_grad_() for _ in range(3))
    i = ((torch.rand(B, NH, S, generator=g) * 100 - 50)).to(dtype)
    i[:, 1, : S // 2] = -100.0  # exp(-m) would overflow float32 without the floor
    f = (torch.rand(B, NH, S, generator=g) * 100 - 50).to(dtype)
    i.requires_grad_()
    f.requires_grad_()
    h, (C, n, m) = mlstm(q, k, v, i, f, backend="chunkwise", return_state=True)
    assert h.dtype == dtype and C.dtype == n.dtype == m.dtype == torch.float32
    (h.float().square().sum() + C.sum()).backward()
    for t in (h, q.grad, k.grad, v.grad, i.grad, f.grad):
        assert torch.isfinite(t.float()).all()


def test_low_precision_matches_float64():
    inputs, state = make_inputs(2, 2, 40, 8, 8, seed=2, with_state=True)
    ref = mlstm(*inputs, state, backend="chunkwise", chunk_size=16)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
        out = mlstm(*(t.to(dtype) for t in inputs), tuple(t.float() for t in state), backend="chunkwise", chunk_size=16)
        assert out.dtype == dtype
        assert rel_err(out, ref) <= tol


def test_inputs_and_state_not_modified():
    inputs, state = make_inputs(1, 2, 20, 4, 4, with_state=True)
    copies = [t.clone() for t in inputs + tuple(state)]
    for form in FORMS:
        mlstm(*inputs, state, backend=form, return_state=True)
        mlstm_decode(*(t[:, :, 0] for t in inputs), state)
    for a, b in zip(inputs + tuple(state), copies):
        assert torch.equal(a, b)


def test_decode_step_equals_recurrent():
    inputs, state = make_inputs(3, 2, 1, 8, 5, with_state=True)
    h, st = mlstm(*inputs, state, backend="recurrent", return_state=True)
    h1, st1 = mlstm_decode(*(t[:, :, 0] for t in inputs), state)
    assert rel_err(h1, h[:, :, 0]) <= 1e-14
    for a, b in zip(st1, st):
        assert rel_err(a, b) <= 1e-14


@pytest.mark.parametrize("gates", ["moderate", "extreme"])
def test_inference_step_equals_the_autograd_step(gates):
    """The generation step without autograd (in-place, rescaled normalizer) against ``mlstm_step``: gates up to
    +-60, stabilizers below the floor (m down to -80), hard resets (f = -inf); float64."""
    g = torch.Generator().manual_seed(3)
    B, NH, dqk, dv = 4, 3, 8, 5
    q, k = torch.randn(B, NH, dqk, generator=g, dtype=torch.float64), torch.randn(B, NH, dqk, generator=g, dtype=torch.float64)
    v = torch.randn(B, NH, dv, generator=g, dtype=torch.float64)
    scale = 3.0 if gates == "moderate" else 60.0
    i, f = (torch.randn(B, NH, generator=g, dtype=torch.float64) * scale for _ in range(2))
    state = mLSTMState(torch.randn(B, NH, dqk, dv, generator=g, dtype=torch.float64),
                       torch.randn(B, NH, dqk, generator=g, dtype=torch.float64),
                       torch.randn(B, NH, generator=g, dtype=torch.float64) * (40.0 if gates == "extreme" else 2.0))
    if gates == "extreme":
        f[0, 0] = float("-inf")
        state.m[1] = -80.0
    h, new = mlstm_step(q, k, v, i, f, state)
    with torch.no_grad():
        h2, new2 = mlstm_step_inference(q, k, v, i, f, state)
    assert rel_err(h2, h) <= 1e-13
    for a, b in zip(new2, new):
        assert rel_err(a, b) <= 1e-13


def test_matches_reference_package():
    """Outputs equal the xlstm package's parallel and recurrent mLSTM (they differ only in where eps enters)."""
    from xlstm.blocks.mlstm.backends import parallel_stabilized_simple, recurrent_step_stabilized_simple

    (q, k, v, i, f), _ = make_inputs(2, 3, 33, 8, 8, seed=9)
    ref = parallel_stabilized_simple(q, k, v, i[..., None], f[..., None])
    for form in FORMS:
        assert rel_err(mlstm(q, k, v, i, f, backend=form, chunk_size=8), ref) <= 1e-7
    # the reference's step keeps C with keys scaled by 1/sqrt(d); ours scales q: same outputs, same m
    B, NH, S, D = q.shape
    C = torch.zeros(B, NH, D, D, dtype=q.dtype)
    n = torch.zeros(B, NH, D, 1, dtype=q.dtype)
    m = torch.zeros(B, NH, 1, 1, dtype=q.dtype)
    state = None
    for t in range(4):
        h_ref, (C, n, m) = recurrent_step_stabilized_simple(
            C, n, m, q[:, :, t : t + 1].clone(), k[:, :, t : t + 1].clone(), v[:, :, t : t + 1].clone(),
            i[:, :, t, None, None], f[:, :, t, None, None])
        h, state = mlstm_decode(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], state)
        assert rel_err(h, h_ref[:, :, 0]) <= 1e-7
        assert rel_err(state.m, m[..., 0, 0]) <= 1e-14


def test_bad_inputs_name_the_tensor():
    (q, k, v, i, f), _ = make_inputs(1, 2, 5, 4, 4)
    with pytest.raises(ValueError, match=r"k must have shape"):
        mlstm(q, k[..., :3], v, i, f)
    with pytest.raises(ValueError, match=r"v must have shape"):
        mlstm(q, k, v[:, :1], i, f)
    with pytest.raises(ValueError, match=r"f must have shape \(B, NH, S\)"):
        mlstm(q, k, v, i, f[..., None])
    with pytest.raises(ValueError, match=r"q must have shape"):
        mlstm(q[0], k, v, i, f)
    with pytest.raises(TypeError, match=r"i must be a floating-point"):
        mlstm(q, k, v, i.long(), f)
    with pytest.raises(ValueError, match=r"state C must have shape"):
        mlstm(q, k, v, i, f, (torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4), torch.zeros(1, 2)))
    with pytest.raises(ValueError, match=r"unknown backend"):
        mlstm(q, k, v, i, f, backend="cuda")
    with pytest.raises(ValueError, match=r"chunk_size"):
        mlstm(q, k, v, i, f, chunk_size=0)


def test_exp_flushed_zeroes_only_weights_far_below_rounding():
    from openxlstm.ops.mlstm.common import exp_flushed

    for dtype, cut in ((torch.float32, -43.67), (torch.float64, -354.198)):
        x = torch.tensor([0.0, -1.0, -30.0, cut + 0.1, cut - 0.1, -1000.0, float("-inf")], dtype=dtype)
        y = exp_flushed(x)
        assert torch.equal(y[:4], torch.exp(x[:4])) and torch.all(y[4:] == 0)
        assert y[3] < torch.finfo(dtype).eps ** 2  # what is dropped is far below rounding of sums whose top is 1


@pytest.mark.parametrize("form", ["parallel", "chunkwise"])
def test_strongly_closing_forget_gates_match_float64(form):
    """Forget gates near 0 drive the decay weights toward subnormal numbers, which the parallel and chunkwise
    forms flush to zero; float32 results must still match the float64 recurrent reference."""
    inputs, state = make_inputs(2, 2, 200, 8, 8, dtype=torch.float64, gate_scale=1.0, seed=3, with_state=True)
    q, k, v, i, f = inputs
    inputs = (q, k, v, i, f - 6.0)  # log sigmoid(f) around -4: exp(cumsum) underflows within ~25 steps
    ref = run("recurrent", inputs, state)
    got = run(form, [t.float() for t in inputs], tuple(t.float() for t in state), chunk_size=128)
    for name in ("h", "C", "n", "dq", "dk", "dv", "di", "df", "dC0", "dn0"):
        assert rel_err(got[name].double(), ref[name]) < 1e-4, name
