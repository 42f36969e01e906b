"""Packed documents (cu_seqlens), hard resets and the gradients of returned states, in every form.

A packed run must equal the same documents run one by one, each from the initial state (the first from the
passed state): outputs, final states and every gradient, in float64 to 1e-10 for the PyTorch forms and in
float32 to 1e-4 (and the kernels' accuracy rule) for the Triton kernels under the interpreter. The document
lengths put boundaries on and off chunk edges and include documents of one token and documents shorter and
longer than the chunk. Kernel outputs are NaN-filled before launch (FILL_NAN).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import check_fp32, rel_err

from openxlstm import xLSTMConfig, xLSTMLM
from openxlstm.ops import causal_conv1d, mlstm, slstm
from openxlstm.ops import triton_utils
from openxlstm.ops.varlen import doc_starts

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
F64 = torch.float64
NEG_INF = float("-inf")

# chunk 8: boundaries at 1, 27, 47 (inside chunks) and 8, 24, 48 (chunk edges); lengths 1, < 8, = 16, > 8
LENS_8 = [1, 7, 16, 3, 20, 1, 9]
# chunk 16 (the interpreter's smallest Triton chunk): boundaries at 1, 35, 65 and 16, 32, 66... S = 75
LENS_16 = [1, 15, 16, 3, 30, 1, 9]


@pytest.fixture(autouse=True)
def nan_fill(monkeypatch):
    monkeypatch.setattr(triton_utils, "FILL_NAN", True)


def cu_of(lens, dtype=torch.int32) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=dtype)


def pieces(cu: torch.Tensor):
    b = cu.tolist()
    return [(x, y) for x, y in zip(b, b[1:])]


# ---------------------------------------------------------------------------------------------------------
# mLSTM
# ---------------------------------------------------------------------------------------------------------
def mlstm_inputs(B, NH, S, dqk, dv, seed=0, with_state=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=F64) * scale + shift

    inputs = [r(B, NH, S, dqk), r(B, NH, S, dqk), r(B, NH, S, dv), r(B, NH, S, scale=3.0),
              r(B, NH, S, scale=3.0, shift=2.0)]
    state = [r(B, NH, dqk, dv), r(B, NH, dqk).abs(), r(B, NH, scale=3.0)] if with_state else None
    return inputs, state


def mlstm_loss(h, C, n, m):
    w = torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype, device=h.device)
    return (h * w).sum() + 0.1 * C.sum() + 0.2 * n.sum() + 0.3 * m.sum()


def mlstm_packed(backend, inputs, state, cu, dtype=F64, chunk=8):
    """h, final state and the gradients of mlstm_loss w.r.t. q, k, v, i, f and the passed C, n, m."""
    xs = [t.to(DEV, dtype).requires_grad_() for t in inputs]
    sdt = F64 if dtype == F64 else torch.float32
    st = None if state is None else [t.to(DEV, sdt).requires_grad_() for t in state]
    h, fin = mlstm(*xs, st, backend=backend, chunk_size=chunk, return_state=True,
                   cu_seqlens=None if cu is None else cu.to(DEV))
    grads = torch.autograd.grad(mlstm_loss(h, *fin), xs + (st or []))
    return [h, *fin, *grads]


def mlstm_by_document(inputs, state, cu):
    """The reference: each document alone with the recurrent form (the first one from ``state``)."""
    xs = [t.clone().requires_grad_() for t in inputs]
    st = None if state is None else [t.clone().requires_grad_() for t in state]
    hs = []
    for j, (a, b) in enumerate(pieces(cu)):
        h, fin = mlstm(*(t[:, :, a:b] for t in xs), st if j == 0 else None, backend="recurrent", return_state=True)
        hs.append(h)
    h = torch.cat(hs, dim=2)
    grads = torch.autograd.grad(mlstm_loss(h, *fin), xs + (st or []))
    return [h, *fin, *grads]


def compare(out, ref, tol, names=None):
    bad = [(names[j] if names else j, rel_err(a, b)) for j, (a, b) in enumerate(zip(out, ref))
           if not rel_err(a, b) <= tol]
    assert not bad, f"relative errors above {tol:g}: {bad}"


M_NAMES = ["h", "C", "n", "m", "dq", "dk", "dv", "di", "df", "dC0", "dn0", "dm0"]


@pytest.mark.parametrize("backend", ["recurrent", "parallel", "chunkwise"])
def test_mlstm_packed_equals_documents_alone(backend):
    S = sum(LENS_8)
    inputs, state = mlstm_inputs(1, 2, S, 5, 3)
    cu = cu_of(LENS_8)
    out = mlstm_packed(backend, inputs, state, cu)
    ref = mlstm_by_document(inputs, state, cu)
    compare(out, ref, 1e-10, M_NAMES)


def one_row(t: torch.Tensor) -> torch.Tensor:
    """(B, NH, S, ...) -> (1, NH, B*S, ...): the rows of a batch laid end to end."""
    B, NH, S = t.shape[:3]
    return t.transpose(1, 2).reshape(1, B * S, NH, *t.shape[3:]).transpose(1, 2)


@pytest.mark.parametrize("backend", ["chunkwise", "recurrent"])
def test_mlstm_rows_of_a_packed_batch(backend):
    """B = 2 rows with cu_seqlens over the 2 S tokens equal the same tokens as one packed row."""
    inputs, _ = mlstm_inputs(2, 2, 24, 4, 3, seed=1)
    cu = torch.tensor([0, 5, 13, 24, 25, 48])
    h, fin = mlstm(*inputs, backend=backend, chunk_size=8, return_state=True, cu_seqlens=cu)
    h1, fin1 = mlstm(*(one_row(t) for t in inputs), backend=backend, chunk_size=8, return_state=True, cu_seqlens=cu)
    assert rel_err(one_row(h), h1) <= 1e-12
    for a, b in zip(fin, fin1):
        assert rel_err(a[1:], b) <= 1e-12  # the second row's last document is the packed row's last


def test_mlstm_triton_packed_equals_documents_alone():
    """Triton (forward and backward) on packed documents against the documents alone in float64: within 1e-4,
    and within the float32 accuracy rule against the float32 chunkwise form on the same packed inputs."""
    S = sum(LENS_16)
    inputs, state = mlstm_inputs(1, 2, S, 16, 32, seed=2)
    inputs = [t.float().double() for t in inputs]
    cu = cu_of(LENS_16)
    ref = mlstm_by_document(inputs, state, cu)
    out = mlstm_packed("triton", inputs, state, cu, torch.float32, chunk=16)
    base = mlstm_packed("chunkwise", inputs, state, cu, torch.float32, chunk=16)
    keys = M_NAMES[:-1]  # dm0 = <dC0, C0> + <dn0, n0> + ...: its cancellation is the float32 noise of a sum
    check_fp32(dict(zip(keys, out)), dict(zip(keys, base)), dict(zip(keys, ref)))
    compare(out[:-1], ref[:-1], 1e-4, keys)


@pytest.mark.parametrize("backend", ["recurrent", "parallel", "chunkwise", "triton"])
def test_mlstm_hard_reset_is_a_fresh_start(backend):
    """A forget gate of -inf (off a chunk edge in head 0, on one in head 1, at token 0 with a state in the
    second batch row) gives no NaN, forward or backward, and equals running the segments separately, the
    later one from a fresh start."""
    dtype, tol = (torch.float32, 1e-4) if backend == "triton" else (F64, 1e-10)
    S = 40
    inputs, state = mlstm_inputs(2, 2, S, 16, 16, seed=3)
    inputs = [t.to(dtype).double() for t in inputs]
    inputs[4][0, 0, 21] = NEG_INF
    inputs[4][0, 1, 16] = NEG_INF
    inputs[4][1, :, 0] = NEG_INF
    out = mlstm_packed(backend, inputs, state, None, dtype, chunk=16)
    assert all(torch.isfinite(t).all() for t in out)
    # the float64 reference: the segments as documents run alone (the later one keeps its -inf first gate,
    # which meets a zero state: m = i there, as after the reset); a -inf at token 0 discards the state
    for b, head, cut in ((0, 0, 21), (0, 1, 16), (1, 0, 0), (1, 1, 0)):
        sel = [t[b:b + 1, head:head + 1] for t in inputs]
        st = [t[b:b + 1, head:head + 1] for t in state]
        ref = mlstm_by_document(sel, st if cut else None, cu_of([cut, S - cut] if cut else [S]))
        got = [t[b:b + 1, head:head + 1] for t in out]
        compare(got[:9], ref[:9], tol, M_NAMES[:9])


@pytest.mark.parametrize("backend", ["recurrent", "parallel", "chunkwise"])
@pytest.mark.parametrize("packed", [False, True])
def test_mlstm_state_gradients_are_true(backend, packed):
    """Finite differences of the returned C, n, m (the stored, stabilized values) against their gradients,
    the passed m included: correct since m carries the gradient of its max recurrence."""
    inputs, state = mlstm_inputs(1, 2, 9, 3, 2, seed=4)
    cu = torch.tensor([0, 3, 4, 9]) if packed else None

    def fn(q, k, v, i, f, C0, n0, m0):
        _, (C, n, m) = mlstm(q, k, v, i, f, (C0, n0, m0), backend=backend, chunk_size=4, return_state=True,
                             cu_seqlens=cu)
        return C, n, m

    leaves = [t.clone().requires_grad_() for t in inputs + state]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, fast_mode=True)


# ---------------------------------------------------------------------------------------------------------
# sLSTM
# ---------------------------------------------------------------------------------------------------------
S_NAMES = ["y", "h", "c", "n", "m", "dx", "dR", "db", "dh0", "dc0", "dn0", "dm0"]


def slstm_inputs(B, S, NH, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = NH * d

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=F64) * scale

    inputs = [r(B, S, 4 * E, scale=2.0), r(NH, d, 4, d, scale=d**-0.5), r(4 * E)]
    state = [r(B, E), r(B, E), r(B, E).abs() + 0.5, r(B, E, scale=3.0)]
    return inputs, state


def slstm_loss(y, h, c, n, m):
    w = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype, device=y.device)
    return (y * w).sum() + 0.3 * h.sum() + 0.1 * c.sum() + 0.2 * n.sum() + 0.4 * m.sum()


def slstm_packed(backend, inputs, state, cu, forget_gate, dtype=F64):
    xs = [t.to(DEV, dtype).requires_grad_() for t in inputs]
    st = [t.to(DEV, F64 if dtype == F64 else torch.float32).requires_grad_() for t in state]
    y, fin = slstm(*xs, st, forget_gate=forget_gate, backend=backend, return_state=True,
                   cu_seqlens=None if cu is None else cu.to(DEV))
    return [y, *fin, *torch.autograd.grad(slstm_loss(y, *fin), xs + st)]


def slstm_by_document(inputs, state, cu, forget_gate):
    xs = [t.clone().requires_grad_() for t in inputs]
    st = [t.clone().requires_grad_() for t in state]
    ys = []
    for j, (a, b) in enumerate(pieces(cu)):
        y, fin = slstm(xs[0][:, a:b], *xs[1:], st if j == 0 else None, forget_gate=forget_gate, backend="recurrent",
                       return_state=True)
        ys.append(y)
    y = torch.cat(ys, dim=1)
    return [y, *fin, *torch.autograd.grad(slstm_loss(y, *fin), xs + st, allow_unused=True)]


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("backend", ["recurrent", "fused"])
def test_slstm_packed_equals_documents_alone(backend, forget_gate):
    lens = [1, 4, 2, 9, 1, 3]
    inputs, state = slstm_inputs(1, sum(lens), 2, 3)
    out = slstm_packed(backend, inputs, state, cu_of(lens), forget_gate)
    ref = slstm_by_document(inputs, state, cu_of(lens), forget_gate)
    compare(out, ref, 1e-10, S_NAMES)


@pytest.mark.parametrize("forget_gate", ["sigmoid"])
def test_slstm_triton_packed_equals_documents_alone(forget_gate):
    """Two rows of packed documents (every row start a boundary), float32 kernel: within 1e-4 of the documents
    alone in float64 and within the accuracy rule against the float32 fused form."""
    B, S = 2, 13
    inputs, state = slstm_inputs(B, S, 2, 16, seed=5)
    inputs = [t.float().double() for t in inputs]
    cu = torch.tensor([0, 3, 4, 13, 14, 20, 26])
    ref = slstm_packed("fused", inputs, state, cu, forget_gate)
    rows = [slstm_by_document([inputs[0][r:r + 1], *inputs[1:]], [t[r:r + 1] for t in state],
                              torch.tensor([0, 3, 4, 13]) if r == 0 else torch.tensor([0, 1, 7, 13]), forget_gate)
            for r in range(B)]
    for name, j in (("y", 0), ("h", 1), ("c", 2), ("m", 4)):
        assert rel_err(ref[j], torch.cat([rows[0][j], rows[1][j]])) <= 1e-10, name
    out = slstm_packed("triton", inputs, state, cu, forget_gate, torch.float32)
    base = slstm_packed("fused", inputs, state, cu, forget_gate, torch.float32)
    check_fp32(dict(zip(S_NAMES, out)), dict(zip(S_NAMES, base)), dict(zip(S_NAMES, ref)))
    compare(out, ref, 1e-4, S_NAMES)


@pytest.mark.parametrize("backend", ["recurrent", "fused"])
def test_slstm_state_gradients_are_true(backend):
    inputs, state = slstm_inputs(1, 5, 2, 2, seed=6)

    def fn(x, R, b, h0, c0, n0, m0):
        y, fin = slstm(x, R, b, (h0, c0, n0, m0), backend=backend, return_state=True, cu_seqlens=torch.tensor([0, 2, 5]))
        return y, *fin

    leaves = [t.clone().requires_grad_() for t in inputs + state]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, fast_mode=True)


# ---------------------------------------------------------------------------------------------------------
# causal conv
# ---------------------------------------------------------------------------------------------------------
def test_conv_does_not_see_the_previous_document():
    g = torch.Generator().manual_seed(7)
    lens = [1, 2, 5, 3, 1]
    x = torch.randn(1, sum(lens), 6, generator=g, dtype=F64, requires_grad=True)
    w, b = torch.randn(6, 4, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    state = torch.randn(1, 3, 6, generator=g, dtype=F64)
    y, window = causal_conv1d(x, w, b, state, return_state=True, cu_seqlens=cu_of(lens))
    cu = cu_of(lens)
    ys = [causal_conv1d(x[:, a:e], w, b, state if j == 0 else None, return_state=True) for j, (a, e) in enumerate(pieces(cu))]
    assert rel_err(y, torch.cat([t[0] for t in ys], dim=1)) <= 1e-14
    assert rel_err(window, ys[-1][1]) <= 1e-14 and window[0, :2].abs().max() == 0  # before the last document: 0
    gy = torch.randn_like(y)
    ga, = torch.autograd.grad(y, x, gy)
    gb, = torch.autograd.grad(torch.cat([t[0] for t in ys], dim=1), x, gy)
    assert rel_err(ga, gb) <= 1e-14


# ---------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------
def randomized_model(dtype=F64, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=37, embedding_dim=32, num_blocks=3, slstm_at=[1], mlstm_num_heads=2, slstm_num_heads=2)
    cfg.update(kw)
    model = xLSTMLM(xLSTMConfig(**cfg)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def logits_and_grads(model, parts, **kw):
    """Logits of ``parts`` [(ids, kwargs), ...] concatenated along time and the parameter gradients of a fixed
    linear function of them (which sums over documents)."""
    model.zero_grad()
    logits = torch.cat([model(ids, **pkw, **kw) for ids, pkw in parts], dim=1)
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0), dtype=F64).to(logits.dtype)
    (logits * w).sum().backward()
    return [logits] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mlstm_backend,slstm_backend", [("chunkwise", "fused"), ("parallel", "recurrent")])
def test_model_packed_equals_documents_alone(mlstm_backend, slstm_backend):
    model = randomized_model().set_backends(mlstm=mlstm_backend, slstm=slstm_backend, chunk_size=8)
    lens = LENS_8
    ids = torch.randint(0, 37, (1, sum(lens)), generator=torch.Generator().manual_seed(1))
    cu = cu_of(lens)
    packed = logits_and_grads(model, [(ids, {"cu_seqlens": cu})])
    alone = logits_and_grads(model, [(ids[:, a:b], {}) for a, b in pieces(cu)])
    compare(packed, alone, 1e-10)


def test_model_packed_loss_state_and_rows():
    """The loss of packed labels equals the documents' losses pooled; the passed state continues the first
    document, the returned state is the last document's; B rows equal one row of B*S tokens."""
    from openxlstm.data import packed_labels

    model = randomized_model(mlstm_conv_kernel=4, slstm_conv_kernel=4).set_backends(chunk_size=8)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 37, (2, 20), generator=g)
    cu = torch.tensor([0, 1, 9, 20, 26, 40])
    prefix = torch.randint(0, 37, (2, 5), generator=g)
    _, state = model(prefix, return_state=True)
    out = model(ids, state, labels=packed_labels(ids, cu), return_state=True, cu_seqlens=cu)
    flat = ids.reshape(-1)
    sums, count = 0.0, 0
    for j, (a, b) in enumerate(pieces(cu)):
        r = a // 20
        st = [type(s)(*(None if t is None else t[r:r + 1] for t in s)) for s in state] if a % 20 == 0 else None
        logits = model(flat[None, a:b], st)
        sums = sums + F.cross_entropy(logits[0, :-1], flat[a + 1:b], reduction="sum")
        count += b - a - 1
    assert abs(float(out.loss) - float(sums) / count) <= 1e-12 and int(out.num_tokens) == count
    nxt = torch.randint(0, 37, (2, 3), generator=g)
    cont = model(nxt, out.state)
    alone = torch.cat([model(nxt[:1], model(flat[None, 9:20], return_state=True)[1]),
                       model(nxt[1:], model(flat[None, 26:40], return_state=True)[1])])
    assert rel_err(cont, alone) <= 1e-12
    one_row = model(ids.reshape(1, -1), cu_seqlens=cu)
    assert rel_err(model(ids, cu_seqlens=cu).reshape(1, 40, -1), one_row) <= 1e-12


def test_model_triton_packed_equals_documents_alone():
    ref_model = randomized_model(num_blocks=2).set_backends(mlstm="recurrent", slstm="recurrent")
    model = copy.deepcopy(ref_model).float().set_backends(mlstm="triton", slstm="triton", chunk_size=16)
    lens = [1, 15, 3]  # boundaries inside the first chunk and on its edge
    ids = torch.randint(0, 37, (1, sum(lens)), generator=torch.Generator().manual_seed(3))
    cu = cu_of(lens)
    packed = logits_and_grads(model, [(ids, {"cu_seqlens": cu})])
    alone = logits_and_grads(ref_model, [(ids[:, a:b], {}) for a, b in pieces(cu)])
    compare(packed, alone, 1e-4)


def test_model_errors():
    model = randomized_model()
    ids = torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(TypeError, match="cu_seqlens must be an int32 or int64 tensor"):
        model(ids, cu_seqlens=torch.tensor([0.0, 8.0]))
    with pytest.raises(ValueError, match=r"cu_seqlens must have shape \(D\+1,\)"):
        model(ids, cu_seqlens=torch.tensor([[0, 8]]))
    with pytest.raises(RuntimeError, match="must start at 0, end at B\\*S = 8"):
        model(ids, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match="every row start"):
        model(ids, cu_seqlens=torch.tensor([0, 3, 8]))
    assert doc_starts(None, 2, 4) is None


# ---------------------------------------------------------------------------------------------------------
# baselines and xLSTM-7B
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["lstm", "transformer", "large"])
def test_other_models_packed_equal_documents_alone(arch):
    from openxlstm import xLSTMLargeConfig, xLSTMLargeLM
    from openxlstm.baselines import LSTMConfig, LSTMLM, TransformerConfig, TransformerLM

    torch.manual_seed(0)
    if arch == "lstm":
        model = LSTMLM(LSTMConfig(vocab_size=37, embedding_dim=16, num_layers=2))
    elif arch == "transformer":
        model = TransformerLM(TransformerConfig(vocab_size=37, embedding_dim=32, num_layers=2, num_heads=2))
    else:
        model = xLSTMLargeLM(xLSTMLargeConfig(vocab_size=37, hidden_size=32, num_hidden_layers=2, num_heads=2))
        model.set_backends(mlstm="chunkwise", chunk_size=8)
    model = model.double()
    lens = LENS_8
    ids = torch.randint(0, 37, (1, sum(lens)), generator=torch.Generator().manual_seed(1))
    cu = cu_of(lens)
    packed = logits_and_grads(model, [(ids, {"cu_seqlens": cu})])
    alone = logits_and_grads(model, [(ids[:, a:b], {}) for a, b in pieces(cu)])
    compare(packed, alone, 1e-10)
    # a passed state continues the first document; the returned one is the last document's
    _, state = model(ids[:, :6], return_state=True)
    logits, last = model(ids, state, return_state=True, cu_seqlens=cu)
    assert rel_err(logits[:, :1], model(ids[:, :1], state)) <= 1e-12
    nxt = ids[:, :4]
    assert rel_err(model(nxt, last), model(nxt, model(ids[:, 48:], return_state=True)[1])) <= 1e-12
    rows = model(ids[:, :48].reshape(2, 24), cu_seqlens=torch.tensor([0, 1, 8, 24, 27, 47, 48]))
    assert rel_err(rows.reshape(1, 48, -1), model(ids[:, :48], cu_seqlens=torch.tensor([0, 1, 8, 24, 27, 47, 48]))) <= 1e-12
