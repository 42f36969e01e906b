"""The contract every registered language model keeps, checked over the whole registry: a new architecture
added to ``openxlstm.models.ARCHS`` (and its tiny config to ``tests/helpers.py``) is tested by adding nothing
else. (The forecaster's contract is tests/forecasting.)

Float64 models, so that "equal" means equal to rounding: prefill then steps equal one pass; a forward in
chunks with the state carried equals one pass; packed documents equal each document alone; ``init_state``
means what ``state=None`` means and passed states are never modified; save -> load gives equal logits;
``generate`` continues greedily as repeated full passes would; the ``labels=`` loss is the cross-entropy of
the returned logits; the forward compiles with ``fullgraph=True``.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from helpers import tiny_model
from torch.utils._pytree import tree_leaves

import openxlstm
from openxlstm.models import LANGUAGE_MODELS, arch_of

ARCH_NAMES = sorted(LANGUAGE_MODELS)
V = 64
TOL = 1e-10


def model64(arch, seed=0):
    return tiny_model(arch, seed, vocab_size=V).double()


def ids(B=2, S=12, seed=1):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_prefill_then_steps_equal_one_pass(arch):
    model, x = model64(arch), ids()
    with torch.no_grad():
        full = model(x)
        logits, state = model(x[:, :7], return_state=True)
        steps = [logits]
        for t in range(7, x.shape[1]):
            logits, state = model(x[:, t:t + 1], state, return_state=True)
            steps.append(logits)
    assert rel_err(torch.cat(steps, 1), full) <= TOL


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_causal(arch):
    """Changing a later token leaves the earlier logits unchanged."""
    model, x = model64(arch), ids()
    other = x.clone()
    other[:, 8] = (other[:, 8] + 1) % V
    with torch.no_grad():
        a, b = model(x), model(other)
    assert torch.equal(a[:, :8], b[:, :8]) and not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_chunks_with_carried_state_equal_one_pass(arch):
    """With gradients on, so the sequence paths (not the decode steps) carry the state."""
    model, x = model64(arch), ids(S=13)
    full, final = model(x, return_state=True)
    pieces, state = [], None
    for a, b in ((0, 5), (5, 9), (9, 10), (10, 13)):
        logits, state = model(x[:, a:b], state, return_state=True)
        pieces.append(logits)
    assert rel_err(torch.cat(pieces, 1), full) <= TOL
    for got, want in zip(tree_leaves(state), tree_leaves(final)):
        if arch != "transformer":  # a KV cache is the same set of keys either way; compare the recurrent states
            assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_packed_documents_equal_documents_alone(arch):
    model = model64(arch)
    x = ids(B=1, S=13, seed=3)
    cu = torch.tensor([0, 4, 5, 13])
    with torch.no_grad():
        packed = model(x, cu_seqlens=cu)
        alone = torch.cat([model(x[:, a:b]) for a, b in ((0, 4), (4, 5), (5, 13))], 1)
    assert rel_err(packed, alone) <= TOL


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_init_state_is_the_empty_state_and_states_are_not_modified(arch):
    model, x = model64(arch), ids()
    with torch.no_grad():
        state0 = model.init_state(x.shape[0])
        assert rel_err(model(x, state0), model(x)) <= TOL
        _, state = model(x[:, :6], return_state=True)
        before = [t.clone() for t in tree_leaves(state)]
        model(x[:, 6:], state, return_state=True)
        model(x[:, 6:7], state, return_state=True)  # the step path too
    assert all(torch.equal(a, b) for a, b in zip(before, tree_leaves(state)))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_save_then_load_gives_equal_logits(arch, tmp_path):
    model, x = model64(arch, seed=5), ids()
    path = model.save_pretrained(tmp_path / arch)
    loaded = openxlstm.from_pretrained(path)
    assert arch_of(loaded) == arch and type(loaded).from_pretrained(path).config == model.config
    with torch.no_grad():
        assert rel_err(loaded(x), model(x)) == 0.0
    with pytest.raises(openxlstm.errors.UserError, match="not empty"):
        model.save_pretrained(path)
    model.save_pretrained(path, overwrite=True)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_generate_continues_as_repeated_full_passes(arch):
    model = model64(arch, seed=2)
    prompt = [[5, 9, 2, 33], [7, 1]]
    out = openxlstm.generate(model, prompt, max_new_tokens=6, temperature=0)
    for row, new in zip(prompt, out):
        seq = list(row)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert new == seq[len(row):]


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_labels_loss_is_the_cross_entropy_of_the_logits(arch):
    model, x = model64(arch).train(), ids()
    labels = torch.roll(x, -1, dims=1)
    labels[:, -1] = -100
    labels[0, 3] = -100
    out = model(x, labels=labels, return_logits=True, return_state=True)
    want = F.cross_entropy(out.logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert abs(float(out.loss.detach()) - float(want.detach())) <= 1e-12
    assert int(out.num_tokens) == int((labels != -100).sum())
    assert out.state is not None
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_forward_compiles_fullgraph(arch):
    if arch in ("lstm", "reslstm"):
        pytest.skip("nn.LSTM graph-breaks under torch.compile (torch._dynamo does not trace RNN modules)")
    model, x = model64(arch), ids()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= TOL
