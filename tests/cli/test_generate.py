"""Generation: seeded determinism, state carrying equal to re-running the prefix, batches of prompts of
different lengths equal to a plain per-row loop (greedy and sampled), stop, streaming."""

import pytest
import torch

from helpers import TINY, tiny_model
from openxlstm.data import ByteTokenizer
from openxlstm.errors import UserError
from openxlstm.generation import generate, sample_next
from openxlstm.models import build_model


def tiny(arch, seed=0):
    return tiny_model(arch, seed, vocab_size=256)


RAGGED = [[72, 101, 108, 108, 111, 32, 119], [100, 101, 102], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [7, 7, 7, 7]]


def naive_greedy(model, ids, n):
    """Re-run the whole prefix for every new token (no state)."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("arch", sorted(TINY))
def test_state_equals_rerunning_prefix(arch):
    model = tiny(arch).double()
    prompt = [72, 101, 108, 108, 111, 32]
    assert generate(model, prompt, max_new_tokens=12, temperature=0) == [naive_greedy(model, prompt, 12)]
    logits_full = model(torch.tensor([prompt + naive_greedy(model, prompt, 5)]))
    _, state = model(torch.tensor([prompt]), return_state=True)
    step_logits = []
    for tok in naive_greedy(model, prompt, 5):
        out, state = model(torch.tensor([[tok]]), state=state, return_state=True)
        step_logits.append(out[:, -1])
    assert torch.allclose(torch.stack(step_logits, 1), logits_full[:, len(prompt):], atol=1e-10)


def test_seeded_sampling_is_deterministic():
    model, tok = tiny("xlstm"), ByteTokenizer()
    kw = dict(tokenizer=tok, max_new_tokens=20, temperature=1.0, top_k=40, top_p=0.95)
    a = generate(model, "def f(x):", seed=7, **kw)
    assert a == generate(model, "def f(x):", seed=7, **kw)
    assert a != generate(model, "def f(x):", seed=8, **kw)
    assert isinstance(a, str)


def test_batched_prompts_of_different_lengths_match_single():
    model, tok = tiny("xlstm"), ByteTokenizer()
    prompts = ["The quick brown fox", "def", "import os\n"]
    batch = generate(model, prompts, tok, max_new_tokens=10, temperature=0)
    assert batch == [generate(model, p, tok, max_new_tokens=10, temperature=0) for p in prompts]


def test_stop_string_and_streaming():
    model, tok = tiny("lstm"), ByteTokenizer()
    full = generate(model, "abc", tok, max_new_tokens=30, temperature=0)
    stop = full[5:7]
    pieces = []
    cut = generate(model, "abc", tok, max_new_tokens=30, temperature=0, stop=stop, on_text=lambda b, t: pieces.append(t))
    assert cut == full[:full.index(stop)]
    assert "".join(pieces) == cut
    streamed = []
    generate(model, "abc", tok, max_new_tokens=30, temperature=0, on_text=lambda b, t: streamed.append(t))
    assert "".join(streamed) == full


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5]])
    g = torch.Generator().manual_seed(0)
    assert int(sample_next(logits, temperature=0)) == 1
    assert all(int(sample_next(logits, 1.0, top_k=1, generator=g)) == 1 for _ in range(20))
    assert all(int(sample_next(logits, 1.0, top_p=0.3, generator=g)) == 1 for _ in range(20))
    assert {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(50)} == {1, 3}


def reference_probs(logits, temperature, top_k=None, top_p=None):
    """One row's sampling distribution, written plainly: logits (V,) -> probabilities (V,)."""
    x = logits.float() / temperature
    if top_k:
        x = x.masked_fill(x < x.topk(top_k).values[-1], float("-inf"))
    if top_p is not None:
        p, order = x.softmax(-1).sort(descending=True)
        likelier_mass = p.cumsum(0) - p  # the probability of the tokens ranked before each one
        x[order[likelier_mass >= top_p]] = float("-inf")
    return x.softmax(-1)


def reference_generate(model, rows, n, temperature=0.0, top_k=None, top_p=None, seed=None):
    """The plain loop: one model call per position with the carried state, Python lists per row, each row
    fed its own prompt until it runs out; one torch.multinomial draw for the whole batch per position from a
    generator seeded as generate seeds its own."""
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    lens = [len(r) for r in rows]
    logits, state = model(torch.tensor([r[:min(lens)] for r in rows]), return_state=True)
    out = [[] for _ in rows]
    for pos in range(min(lens), max(lens) + n):
        last = logits[:, -1]
        if temperature == 0:
            nxt = last.argmax(-1).tolist()
        else:
            probs = torch.stack([reference_probs(row, temperature, top_k, top_p) for row in last])
            nxt = torch.multinomial(probs, 1, generator=gen)[:, 0].tolist()
        feed = []
        for b, row in enumerate(rows):
            if pos < lens[b]:
                feed.append(row[pos])
            else:
                if len(out[b]) < n:
                    out[b].append(nxt[b])
                feed.append(nxt[b])
        logits, state = model(torch.tensor(feed)[:, None], state, return_state=True)
    return out


@pytest.mark.parametrize("arch", sorted(TINY))
def test_ragged_batch_greedy_equals_each_row_alone(arch):
    model = tiny(arch).double()
    got = generate(model, RAGGED, max_new_tokens=9, temperature=0)
    assert got == reference_generate(model, RAGGED, 9)
    assert got == [naive_greedy(model, row, 9) for row in RAGGED]


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.9, top_k=50, top_p=0.8)])
def test_ragged_batch_sampling_equals_reference_loop(arch, sampling):
    model = tiny(arch)
    got = generate(model, RAGGED, max_new_tokens=12, seed=3, **sampling)
    assert got == reference_generate(model, RAGGED, 12, seed=3, **sampling)
    assert len({tuple(row) for row in got}) == len(RAGGED)


def test_sample_next_draws_what_multinomial_draws():
    logits = torch.randn(5, 300, dtype=torch.float64)
    logits[:, :100] = float("-inf")
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(20):
        want = torch.multinomial(logits.float().softmax(-1), 1, generator=g1)[:, 0]
        assert torch.equal(sample_next(logits, 1.0, generator=g2), want)


def test_tensor_prompt_and_zero_new_tokens():
    model = tiny("xlstm")
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert generate(model, ids, max_new_tokens=6, temperature=0) == generate(model, ids.tolist(), max_new_tokens=6, temperature=0)
    assert generate(model, ids[0], max_new_tokens=6, temperature=0) == generate(model, ids[:1].tolist(), max_new_tokens=6, temperature=0)
    assert generate(model, ids, max_new_tokens=0) == [[], []]
    assert generate(model, "ab", ByteTokenizer(), max_new_tokens=0) == ""
    with pytest.raises(UserError):
        generate(model, torch.zeros(1, 0, dtype=torch.long))


def test_stop_strings_in_a_batch():
    model, tok = tiny("xlstm"), ByteTokenizer()
    prompts = ["The quick brown fox", "def", "import os\n"]
    full = generate(model, prompts, tok, max_new_tokens=25, temperature=0)
    stop = full[1][3:5]  # appears in row 1, maybe elsewhere
    cut = generate(model, prompts, tok, max_new_tokens=25, temperature=0, stop=stop)
    assert cut == [text[:text.index(stop)] if stop in text else text for text in full]
    assert stop in full[1] and len(cut[1]) < len(full[1])
    ids = generate(model, [list(tok.encode(p)) for p in prompts], tok, max_new_tokens=25, temperature=0, stop=stop)
    assert stop in tok.decode(ids[1]) and stop not in tok.decode(ids[1][:-1])  # ids end where the stop completes
