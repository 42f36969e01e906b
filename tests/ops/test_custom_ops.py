"""Every PyTorch custom op of the package passes torch.library.opcheck: schema, fake (meta) kernel with the
real output strides, autograd registration, and AOT dispatch; and every output is contiguous, which is what
inductor assumes of a custom op's outputs. Triton ops run under the interpreter on CPU."""

import pytest
import torch

import openxlstm.ops.mlstm.triton  # noqa: F401  (registers openxlstm::mlstm_chunkwise_*)
import openxlstm.ops.mlstm.triton_step  # noqa: F401  (openxlstm::mlstm_step)
import openxlstm.ops.slstm.fused  # noqa: F401  (openxlstm::slstm_fused_*)
import openxlstm.ops.slstm.triton  # noqa: F401  (openxlstm::slstm_triton_*)

pytestmark = pytest.mark.slow  # subprocesses or compilation: tens of seconds

DEV = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)


def r(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)


def check(op, args):
    torch.library.opcheck(op, args)
    outs = op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    assert all(o.is_contiguous() for o in outs), [o.stride() for o in outs]


def _mlstm_inputs(with_state):
    B, NH, S, dqk, dv = 2, 2, 21, 16, 32
    q = r(B, S, NH, dqk).transpose(1, 2)  # strided, as the layer passes them
    k, v = r(B, NH, S, dqk), r(B, NH, S, dv)
    i, f = r(B, S, NH).transpose(1, 2), r(B, NH, S, scale=2.0) + 2
    st = (r(B, NH, dqk, dv), r(B, NH, dqk).abs(), r(B, NH)) if with_state else (None, None, None)
    return q, k, v, i, f, st


CU = torch.tensor([0, 3, 4, 21, 30, 42], dtype=torch.int32, device=DEV)  # packed documents over B*S = 2*21 tokens


@pytest.mark.parametrize("with_state,packed", [(False, False), (True, True)])
def test_mlstm_chunkwise_ops(with_state, packed):
    q, k, v, i, f, (C0, n0, m0) = _mlstm_inputs(with_state)
    cu = CU if packed else None
    args = (q.requires_grad_(), k.requires_grad_(), v, i, f, C0, n0, m0, 16, 1e-6, cu)
    check(torch.ops.openxlstm.mlstm_chunkwise_fwd.default, args)
    h, h32, C, n, m, stats = torch.ops.openxlstm.mlstm_chunkwise_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                                       for a in args])
    dh = r(*h.shape).transpose(1, 2)  # (B, NH, S, d_v), strided
    bwd_args = (q.detach(), k.detach(), v, i, f, C0, n0, m0, h32.transpose(1, 2), stats, dh, r(*C.shape), None, 16, 1e-6,
                cu)
    check(torch.ops.openxlstm.mlstm_chunkwise_bwd.default, bwd_args)


def test_mlstm_step_op():
    B, NH, dqk, dv = 3, 2, 16, 32
    args = (r(B, NH, dqk), r(B, NH, dqk), r(B, NH, dv), r(B, NH), r(B, NH), r(B, NH, dqk, dv), r(B, NH, dqk).abs(),
            r(B, NH), 1e-6)
    check(torch.ops.openxlstm.mlstm_step.default, args)


@pytest.mark.parametrize("kind,packed", [("fused", False), ("fused", True), ("triton", True)])
def test_slstm_ops(kind, packed):
    B, S, NH, d = 3, 7, 2, 16
    E = NH * d
    cu = torch.tensor([0, 2, 7, 8, 14, 21], device=DEV) if packed else None
    x, R, b = r(B, S, 4 * E), r(NH, d, 4, d, scale=0.1), r(4 * E)
    h0, c0, n0, m0 = r(B, E), r(B, E), r(B, E).abs() + 0.5, r(B, E)
    fwd = getattr(torch.ops.openxlstm, f"slstm_{kind}_fwd").default
    check(fwd, (x, R, b, h0, c0, n0, m0, False, cu))
    saved = fwd(x, R, b, h0, c0, n0, m0, False, cu)
    grads = (r(B, S, E), r(B, E), r(B, E), r(B, E))
    dm = r(B, E) if packed else None  # the gradient of the final stabilizer
    if kind == "fused":
        hs, cs, ns, ms, acts = saved
        bwd_args = (R, hs, cs, ns, acts, *grads, dm, cu)
    else:
        y, HS, CS, NS, MS, PRE = saved
        bwd_args = (R, HS, CS, NS, MS, PRE, *grads, False, False, dm, cu)
    check(getattr(torch.ops.openxlstm, f"slstm_{kind}_bwd").default, bwd_args)
