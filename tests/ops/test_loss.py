"""The fused output projection + cross-entropy against the plain form, and the models' ``labels=`` path."""

import pytest
import torch
import torch.nn.functional as F

from openxlstm import LMOutput, xLSTMConfig, xLSTMLM
from openxlstm.baselines import LSTMConfig, LSTMLM, TransformerConfig, TransformerLM
from openxlstm.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("N,E,V,chunk", [(37, 16, 50, 8), (64, 8, 300, 64), (5, 3, 7, 1), (100, 24, 129, None)])
@pytest.mark.parametrize("ignored", [0, 3])
def test_matches_reference_float64(N, E, V, chunk, ignored):
    g = torch.Generator().manual_seed(N * V + ignored)
    h = torch.randn(N, E, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, E, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[:ignored]] = -100
    loss = linear_cross_entropy(h, w, labels, chunk_size=chunk)
    dh, dw = torch.autograd.grad(loss * 3.0, (h, w))
    ref = linear_cross_entropy_reference(h, w, labels)
    rdh, rdw = torch.autograd.grad(ref * 3.0, (h, w))
    assert loss.dtype == torch.float64
    assert abs(float(loss.detach() - ref.detach())) <= 1e-12 * abs(float(ref.detach()))
    assert rel(dh, rdh) <= 1e-12 and rel(dw, rdw) <= 1e-12


def test_all_ignored_gives_zero_loss_and_gradient():
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((6,), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(h.grad.abs().sum()) == 0.0 and float(w.grad.abs().sum()) == 0.0


def test_bfloat16_autocast_close_to_float32():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = (torch.randn(100, 32, generator=g) * 0.2).requires_grad_()
    labels = torch.randint(0, 100, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, labels, chunk_size=16)
    loss.backward()
    ref = linear_cross_entropy_reference(h.detach().double(), w.detach().double(), labels)
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert abs(float(loss.detach()) - float(ref)) <= 2e-2 * float(ref)


def test_no_vocabulary_sized_tensor_is_saved_for_backward():
    N, E, V = 256, 16, 1000
    h = torch.randn(N, E, requires_grad=True)
    w = torch.randn(V, E, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        linear_cross_entropy(h, w, torch.randint(0, V, (N,)), chunk_size=64)
    assert saved and max(saved) <= max(N * E, V * E)  # dh and dW, never (N, V)


def _models():
    V = 41
    return [
        xLSTMLM(xLSTMConfig(vocab_size=V, embedding_dim=32, num_blocks=3, slstm_at=[1], mlstm_num_heads=2,
                            slstm_num_heads=2)).double(),
        LSTMLM(LSTMConfig(vocab_size=V, embedding_dim=16, hidden_dim=24, num_layers=2)).double(),
        TransformerLM(TransformerConfig(vocab_size=V, embedding_dim=32, num_layers=2, num_heads=2)).double(),
    ]


@pytest.mark.parametrize("model", _models(), ids=["xlstm", "lstm", "transformer"])
def test_labels_path_equals_logits_path(model):
    g = torch.Generator().manual_seed(3)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (3, 11), generator=g)
    labels = torch.randint(0, V, (3, 11), generator=g)
    labels[0, :4] = -100
    out = model(ids, labels=labels, return_logits=True, return_state=True)
    assert isinstance(out, LMOutput) and int(out.num_tokens) == 29 and out.state is not None
    logits, state = model(ids, return_state=True)
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert torch.equal(out.logits, logits)
    assert abs(float((out.loss - ref).detach())) <= 1e-12
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert max(rel(a, b) for a, b in zip(grads, ref_grads) if b.norm() > 0) <= 1e-10
    assert model(ids, labels=labels).logits is None


def test_labels_shape_is_checked():
    model = _models()[0]
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        model(torch.zeros(2, 5, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("which", [0, 1, 2], ids=["xlstm", "lstm", "transformer"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(which):
    model = _models()[which].float().train()
    g = torch.Generator().manual_seed(5)
    V = model.config.vocab_size
    ids, labels = torch.randint(0, V, (2, 13), generator=g), torch.randint(0, V, (2, 13), generator=g)
    ref = model(ids, labels=labels).loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = model.set_activation_checkpointing(True)(ids, labels=labels).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.set_activation_checkpointing(False)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(-t.numel()) or t, lambda t: t):
        model(ids, labels=labels)
    assert abs(float((loss - ref).detach())) <= 1e-6 * float(ref.detach())
    assert max(rel(a, b) for a, b in zip(grads, ref_grads) if b.norm() > 0) <= 1e-5
    kept, plain = sum(n for n in saved if n > 0), -sum(n for n in saved if n < 0)
    assert kept < plain  # fewer activations kept for backward
