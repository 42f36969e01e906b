"""torch.compile(fullgraph=True) traces forward + loss + backward of whole models without a graph break, and
the compiled gradients equal the eager ones (CPU, aot_eager: the same graphs inductor would receive).
"""

import pytest
import torch

import openxlstm
from conftest import rel_err
from openxlstm.large import xLSTMLargeConfig, xLSTMLargeLM

pytestmark = pytest.mark.slow  # subprocesses or compilation: tens of seconds


def _models():
    torch.manual_seed(0)
    yield "xlstm[1:1]", openxlstm.xLSTMLM(openxlstm.xLSTMConfig(vocab_size=64, embedding_dim=32, num_blocks=2,
                                                                slstm_at=[1], mlstm_num_heads=2, slstm_num_heads=2))
    yield "xlstm-large", xLSTMLargeLM(xLSTMLargeConfig(vocab_size=64, hidden_size=32, num_heads=2, num_hidden_layers=1))


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("name", ["xlstm[1:1]", "xlstm-large"])
def test_fullgraph_forward_loss_backward_matches_eager(name, packed):
    model = dict(_models())[name].float()
    torch.manual_seed(1)
    if packed:  # three documents in one row (flash-linear-attention's cu_seqlens), boundaries off chunk edges
        x, y = torch.randint(0, 64, (1, 48)), torch.randint(0, 64, (1, 48))
        kw = {"cu_seqlens": torch.tensor([0, 5, 30, 48], dtype=torch.int32)}
    else:
        x, y = torch.randint(0, 64, (2, 24)), torch.randint(0, 64, (2, 24))
        kw = {}

    def loss_fn(x, y):
        return model(x, labels=y, **kw).loss

    def grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(x, y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ref_loss, ref = grads(loss_fn)
    torch._dynamo.reset()
    loss, got = grads(torch.compile(loss_fn, backend="aot_eager", fullgraph=True))
    # aot_eager runs the eager graph's aten ops: equal up to a few roundings (bit-equal on torch 2.13 CPU)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    for g, r in zip(got, ref):
        assert rel_err(g, r) <= 1e-6
