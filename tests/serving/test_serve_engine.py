"""The decode loop of openxlstm serve without HTTP: the slot pool (batch dimension found per model, states
in and out of any slots), every served architecture equal to ``openxlstm.generate`` alone (float64),
prompts prefilled in pieces between decode steps, the end-of-document token, stop strings held back while
incomplete, cancellation, deadlines and draining."""

import threading

import pytest
import torch

import openxlstm
from helpers_serve import TINY_XLSTM, tiny_model
from openxlstm.data import ByteTokenizer
from openxlstm.errors import UserError
from openxlstm.serving.engine import Draining, Engine, QueueFull, Request, SamplingParams, SlotPool, _Text

LSTM = {"vocab_size": 257, "embedding_dim": 32, "num_layers": 2}
LARGE = {"vocab_size": 257, "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: OpenMP threads that spin for a busy core make tiny models many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def results(engine: Engine, reqs: list, limit_s: float = 60) -> list:
    """[(texts by choice, finish reasons by choice)] of each request, read from its updates queue."""
    out = []
    for r in reqs:
        texts, finishes = [""] * r.params.n, [None] * r.params.n
        while None in finishes:
            u = r.updates.get(timeout=limit_s)
            texts[u.index] += u.text
            if u.finish_reason is not None:
                finishes[u.index] = u.finish_reason
        out.append((texts, finishes))
    return out


@pytest.mark.parametrize("arch, config, dims", [("xlstm", TINY_XLSTM, {0}), ("lstm", LSTM, {1}),
                                                ("xlstm-large", LARGE, {0})])
def test_slot_pool_holds_any_slots(arch, config, dims):
    model = tiny_model(arch, config)
    pool = SlotPool(model, 5, torch.device("cpu"))
    assert set(d for d in pool.dims if d is not None) == dims
    _, one = model(torch.zeros(1, 1, dtype=torch.long), return_state=True)
    per_sequence = sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(one))
    assert pool.nbytes == 5 * per_sequence
    _, state = model(torch.randint(0, 257, (2, 7)), return_state=True)
    pool.scatter([3, 1], state)  # out of order, not consecutive
    back = pool.gather([3, 1])
    for a, b in zip(torch.utils._pytree.tree_leaves(state), torch.utils._pytree.tree_leaves(back)):
        assert torch.equal(a, b)
    pool.copy(3, [0, 4])
    for a, b in zip(torch.utils._pytree.tree_leaves(pool.gather([3, 3])),
                    torch.utils._pytree.tree_leaves(pool.gather([0, 4]))):
        assert torch.equal(a, b)


def test_a_state_that_grows_is_refused():
    model = tiny_model("transformer", {"vocab_size": 257, "embedding_dim": 32, "num_layers": 2, "num_heads": 2})
    with pytest.raises(UserError, match="grows with the text"):
        Engine(model, ByteTokenizer())


@pytest.mark.parametrize("arch, config", [("xlstm", TINY_XLSTM), ("lstm", LSTM), ("xlstm-large", LARGE)])
def test_every_recurrent_model_serves_as_generate_alone(arch, config):
    """Prompts of 1 to 40 tokens read in pieces of 4 while others decode, greedy and seeded, n=2."""
    model = tiny_model(arch, config)
    tok = ByteTokenizer()
    engine = Engine(model, tok, max_batch_size=6, prefill_chunk=4).start()
    try:
        prompts = ["a", "def f(x):\n    return", "The quick brown fox jumps over the dog.", "xy" * 20, "0"]
        params = [SamplingParams(max_tokens=9 + k, temperature=0 if k % 2 else 0.9, seed=10 * k, n=1 + (k == 2),
                                 top_k=None if k != 4 else 30, top_p=None if k != 0 else 0.8, ignore_eos=True)
                  for k in range(len(prompts))]
        reqs = [Request(tok.encode(p), q) for p, q in zip(prompts, params)]
        engine.submit(reqs)
        got = results(engine, reqs)
    finally:
        engine.stop()
    for prompt, q, (texts, finishes) in zip(prompts, params, got):
        want = [openxlstm.generate(model, prompt, tok, max_new_tokens=q.max_tokens, temperature=q.temperature,
                                   seed=None if q.seed is None else q.seed + j, top_k=q.top_k, top_p=q.top_p)
                for j in range(q.n)]
        assert texts == want and finishes == ["length"] * q.n
    assert engine.load()["free_slots"] == 6


class _EodAt(ByteTokenizer):
    """The byte tokenizer with another id as its end-of-document token."""

    def __init__(self, eod_id: int):
        super().__init__()
        self.eod_id = eod_id

    def decode(self, ids) -> str:
        return super().decode([i for i in ids if i != self.eod_id])


def test_the_end_of_document_token_ends_a_choice():
    model = tiny_model()
    ids = openxlstm.generate(model, [list(b"hello")], max_new_tokens=12, temperature=0)[0]
    k = next(j for j in range(3, 12) if ids[j] not in ids[:j])  # the first new id after 3 tokens
    tok = _EodAt(ids[k])
    engine = Engine(model, tok, max_batch_size=2).start()
    try:
        stops = Request(list(b"hello"), SamplingParams(max_tokens=12, temperature=0))
        goes_on = Request(list(b"hello"), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        engine.submit([stops, goes_on])
        (text, finish), (text2, finish2) = results(engine, [stops, goes_on])
    finally:
        engine.stop()
    assert (text, finish) == ([tok.decode(ids[:k])], ["stop"]) and stops.completion_tokens == k + 1
    assert (text2, finish2) == ([tok.decode(ids)], ["length"]) and goes_on.completion_tokens == 12


def test_text_is_sent_when_complete_and_stops_are_cut():
    tok = ByteTokenizer()
    t = _Text(tok, ("wö", "!!"))
    sent = [t.add(b) for b in "héllo wörld".encode()]
    assert "".join(sent) == "héllo " and t.stopped and "\ufffd" not in "".join(sent)
    assert sent[1] == "" and sent[2] == "é"  # the first byte of é waits for the second
    assert t.final() == ""
    t = _Text(tok, ("lo!",))
    sent = [t.add(b) for b in b"hello"]
    assert "".join(sent) == "hel" and not t.stopped  # "lo" may become the stop string: held back
    assert t.final() == "lo"  # the end of the output releases it


def _last(r: Request):
    """The last update of a request of one choice (those before it skipped)."""
    u = r.updates.get(timeout=30)
    while u.finish_reason is None:
        u = r.updates.get(timeout=30)
    return u


def test_cancel_deadline_and_drain():
    engine = Engine(tiny_model(), ByteTokenizer(), max_batch_size=2, max_queue=2).start()
    try:
        long = SamplingParams(max_tokens=10**9, temperature=0, ignore_eos=True)
        cancelled, late = Request(list(b"ab"), long), Request(list(b"cd"), long, timeout=0.3)
        engine.submit([cancelled, late])
        with pytest.raises(QueueFull):
            engine.submit([Request(list(b"e"), long), Request(list(b"f"), long), Request(list(b"g"), long)])
        assert cancelled.updates.get(timeout=30).finish_reason is None  # it runs
        threading.Thread(target=engine.cancel, args=(cancelled,)).start()
        assert _last(cancelled).finish_reason == "cancelled"
        u = _last(late)
        assert u.finish_reason == "timeout" and "deadline of 0.3 s" in u.error
        running = Request(list(b"hi"), long)
        engine.submit([running])
        engine.drain(0.2)
        with pytest.raises(Draining):
            engine.submit([Request(list(b"x"), long)])
        assert _last(running).finish_reason == "shutdown"
        assert engine.load() == {"waiting": 0, "prefilling": 0, "running": 0, "free_slots": 2}
    finally:
        engine.stop()


def test_requests_that_cannot_run_are_refused():
    engine = Engine(tiny_model(), ByteTokenizer(), max_batch_size=2)
    for req, words in [(Request([], SamplingParams()), "at least one token"),
                       (Request([1], SamplingParams(n=3)), "do not fit"),
                       (Request([257], SamplingParams()), "token ids must be in")]:
        with pytest.raises(ValueError, match=words):
            engine.submit([req])


def test_a_compiled_decode_step_decodes_as_eager():
    """``compile``: the decode step through torch.compile (its tracing, with the eager backend here: the
    inductor's kernels take minutes on a CPU), batch size symbolic, as generate alone."""
    model = tiny_model()
    tok = ByteTokenizer()
    engine = Engine(model, tok, max_batch_size=4, compile="eager").start()
    try:
        prompts = ["ab", "hello there", "x"]
        reqs = [Request(tok.encode(p), SamplingParams(max_tokens=6 + k, temperature=0.7, seed=k, ignore_eos=True))
                for k, p in enumerate(prompts)]  # batches of 3, 2 and 1 as they finish
        engine.submit(reqs)
        got = results(engine, reqs)
    finally:
        engine.stop()
    assert hasattr(engine._step, "__wrapped__")  # it compiled: no fallback to the eager step
    for k, (p, (texts, _)) in enumerate(zip(prompts, got)):
        assert texts == [openxlstm.generate(model, p, tok, max_new_tokens=6 + k, temperature=0.7, seed=k)]
