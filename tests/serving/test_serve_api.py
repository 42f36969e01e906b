"""openxlstm serve through the official openai client: completions and chat, streaming and not, equal to
``openxlstm.generate`` alone (greedy and seeded); 32 concurrent streaming clients; clients that go away free
their slots; every bad request gets its 4xx and one line; the API key; a full queue; deadlines; /metrics.

The server runs in a background thread on 127.0.0.1 (a free port) with a tiny float64 xLSTM; every client
call has a timeout, and every wait polls with a limit."""

import gc
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from helpers_serve import MODEL, Oracle, client, raw, start_server, tiny_model, wait_until  # noqa: E402
from openxlstm.serving.chat import plain_prompt  # noqa: E402
from openxlstm.serving.engine import Request  # noqa: E402
from openxlstm.serving.metrics import resident_memory_bytes  # noqa: E402

PROMPTS = ["def f(x):", "The quick brown fox", "a", "import os\nimport sys\n", "xLSTM " * 9]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: OpenMP threads that spin for a busy core make tiny models many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def served(one_thread):
    """(server, engine, oracle): 16 slots, prompts read in pieces of 16 tokens, prompts up to 200 tokens."""
    model = tiny_model()
    server, engine = start_server(model, max_batch_size=16, max_queue=64, prefill_chunk=16, max_prompt_tokens=200,
                                  max_tokens=100_000, max_body_bytes=20_000)
    yield server, engine, Oracle(model)
    server.stop()


def _stream_text(stream, chat=False) -> dict:
    """{choice index: text} of a stream, and the finish reasons."""
    texts, finishes = {}, {}
    for chunk in stream:
        for ch in chunk.choices:
            piece = (ch.delta.content or "") if chat else ch.text
            texts[ch.index] = texts.get(ch.index, "") + piece
            if ch.finish_reason is not None:
                finishes[ch.index] = ch.finish_reason
    return texts, finishes


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, seed=7),
                                      dict(temperature=1.3, seed=11, top_k=20, top_p=0.9)])
def test_completions_equal_generate(served, stream, sampling):
    server, _, alone = served
    c = client(server)
    for prompt in PROMPTS[:3]:
        extra = {"ignore_eos": True} | ({"top_k": sampling["top_k"]} if "top_k" in sampling else {})
        kw = {k: v for k, v in sampling.items() if k != "top_k"}
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stream=stream, extra_body=extra, **kw)
        text = _stream_text(r)[0][0] if stream else r.choices[0].text
        assert text == alone(prompt, 12, **sampling)


def test_n_choices_and_several_prompts(served):
    """Choice j of n uses seed + j; several prompts: choice k * n + j is choice j of prompt k."""
    server, _, alone = served
    c = client(server)
    r = c.completions.create(model=MODEL, prompt=PROMPTS[:2], n=3, seed=5, temperature=1.0, max_tokens=10,
                             extra_body={"ignore_eos": True})
    assert [ch.index for ch in r.choices] == list(range(6))
    want = [alone(p, 10, seed=5 + j) for p in PROMPTS[:2] for j in range(3)]
    assert [ch.text for ch in r.choices] == want
    assert r.usage.prompt_tokens == len(PROMPTS[0].encode()) + len(PROMPTS[1].encode())
    assert r.usage.completion_tokens == 60
    texts, finishes = _stream_text(c.completions.create(model=MODEL, prompt=PROMPTS[:2], n=3, seed=5, max_tokens=10,
                                                        stream=True, extra_body={"ignore_eos": True}))
    assert [texts[j] for j in range(6)] == want and set(finishes.values()) == {"length"}


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_generate_on_the_plain_template(served, stream):
    server, _, alone = served
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}]
    prompt = plain_prompt(messages)
    assert prompt == "System: You are terse.\n\nUser: Hello!\n\nAssistant:"
    r = client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=9, temperature=0.8, seed=3,
                                              stream=stream, extra_body={"ignore_eos": True})
    text = _stream_text(r, chat=True)[0][0] if stream else r.choices[0].message.content
    assert text == alone(prompt, 9, temperature=0.8, seed=3)
    if not stream:
        assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens == len(prompt.encode())


def test_stop_strings_as_generate_cuts_them(served):
    server, _, alone = served
    prompt, c = PROMPTS[1], client(server)
    free = alone(prompt, 40, temperature=0)
    stop = free[15:17]  # two characters that the greedy continuation holds
    want = alone(prompt, 40, temperature=0, stop=stop)
    assert len(want) < 40 and stop not in want
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "\x00never"],
                             extra_body={"ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    texts, finishes = _stream_text(c.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0,
                                                        stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert (texts[0], finishes[0]) == (want, "stop")


def test_32_concurrent_streaming_clients_as_alone(served):
    """32 streams at once on 16 slots (half of them wait), prompts of 1 to 162 tokens read in pieces of 16."""
    server, engine, alone = served
    jobs = [(PROMPTS[k % 5] * (1 + k % 3), dict(temperature=0) if k % 2 else dict(temperature=1.0, seed=k))
            for k in range(32)]

    c = client(server)

    def one(job):
        prompt, kw = job
        stream = c.completions.create(model=MODEL, prompt=prompt, max_tokens=10, stream=True,
                                                   extra_body={"ignore_eos": True}, **kw)
        return _stream_text(stream)[0][0]

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, jobs))
    assert got == [alone(prompt, 10, **kw) for prompt, kw in jobs]
    assert wait_until(lambda: engine.load()["free_slots"] == 16)


def _live_requests() -> int:
    gc.collect()
    return sum(type(o) is Request for o in gc.get_objects())


def test_clients_that_go_away_free_their_slots(served):
    server, engine, _ = served
    c = client(server)

    def abandon_streams(k: int) -> None:
        streams = [c.completions.create(model=MODEL, prompt=PROMPTS[j % 5], max_tokens=50_000,
                                                     stream=True, extra_body={"ignore_eos": True}) for j in range(k)]
        for s in streams:  # read a few tokens, then hang up
            for _, _ in zip(range(3), s):
                pass
        assert engine.load()["running"] == k
        for s in streams:
            s.close()
        assert wait_until(lambda: engine.load()["running"] == 0 and engine.load()["free_slots"] == 16)

    abandon_streams(8)  # warm-up: the first round allocates what later rounds reuse
    memory, live = resident_memory_bytes(), _live_requests()
    for _ in range(3):
        abandon_streams(12)
    # a non-streaming request whose client gives up
    with pytest.raises(openai.APITimeoutError):
        c.with_options(timeout=0.5).completions.create(model=MODEL, prompt="x", max_tokens=50_000,
                                                       extra_body={"ignore_eos": True})
    assert wait_until(lambda: engine.load() == {"waiting": 0, "prefilling": 0, "running": 0, "free_slots": 16})
    assert wait_until(lambda: _live_requests() <= live)
    assert resident_memory_bytes() - memory < 64 * 2**20


BAD = [  # (path, body, status, words in the message)
    ("/v1/completions", b"{bad json", 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "foo": 1}, 400, "unknown field 'foo'"),
    ("/v1/completions", {"prompt": "x"}, 400, "'model' is required"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 2.5}, 400, "'temperature'"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "'temperature'"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "'top_p'"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "'n'"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 17}, 400, "--max-batch-size"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "'max_tokens'"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 200_000}, 400, "--max-tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": -3}, 400, "'seed'"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, 400, "must not be empty"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "'stream'"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 2}, 400, "logprobs is not supported"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "only allowed when stream"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "no tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "'prompt'"),
    ("/v1/completions", {"model": MODEL, "prompt": "y" * 201}, 400, "--max-prompt-tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": [3, 257]}, 400, "outside the model's vocabulary"),
    ("/v1/completions", {"model": MODEL, "prompt": [[3], "x"]}, 400, "'prompt'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "'messages'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400,
     "'messages.0.role'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "only text content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, 400,
     "tools is not supported"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                              "max_completion_tokens": 3}, 400, "not both"),
    ("/v1/completions", {"model": MODEL, "prompt": "z" * 30_000}, 413, "--max-body-bytes"),
]


def test_bad_requests_get_a_4xx_and_one_line(served):
    server, engine, _ = served
    for path, body, status, words in BAD:
        got, answer = raw(server, "POST", path, body)
        assert (got, words) == (status, words) and words in answer["error"]["message"], (path, body, answer)
        assert "\n" not in answer["error"]["message"]
    got, answer = raw(server, "POST", "/v1/completions", {"model": MODEL, "prompt": "z" * 30_000}, chunked=True)
    assert got == 413 and "--max-body-bytes" in answer["error"]["message"]  # no Content-Length: cut while reading
    assert raw(server, "GET", "/v1/nothing")[0] == 404 and raw(server, "GET", "/v1/completions")[0] == 405
    assert raw(server, "POST", "/v1/models")[0] == 405
    assert engine.load() == {"waiting": 0, "prefilling": 0, "running": 0, "free_slots": 16}
    r = client(server).completions.create(model=MODEL, prompt="still here", max_tokens=3)  # the server keeps serving
    assert r.usage.completion_tokens >= 1


def test_models_health_and_metrics(served):
    server, _, _ = served
    assert [m.id for m in client(server).models.list().data] == [MODEL]
    assert client(server).models.retrieve(MODEL).id == MODEL
    status, health = raw(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["free_slots"] == 16

    def scrape() -> dict:
        _, page = raw(server, "GET", "/metrics")
        values = {}
        for line in page.splitlines():
            if not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    before = scrape()
    key = 'openxlstm_requests_total{endpoint="/v1/completions",status="200"}'
    client(server).completions.create(model=MODEL, prompt="abc", max_tokens=4, extra_body={"ignore_eos": True})
    after = scrape()
    assert after[key] == before.get(key, 0) + 1
    assert after["openxlstm_generation_tokens_total"] == before["openxlstm_generation_tokens_total"] + 4
    assert after["openxlstm_prompt_tokens_total"] == before["openxlstm_prompt_tokens_total"] + 3
    ttft = "openxlstm_time_to_first_token_seconds_count"
    assert after[ttft] == before[ttft] + 1
    assert after['openxlstm_time_to_first_token_seconds_bucket{le="+Inf"}'] == after[
        "openxlstm_time_to_first_token_seconds_count"]
    assert after["openxlstm_slots_total"] == 16 and after["openxlstm_sequences_running"] == 0


@pytest.fixture(scope="module")
def guarded(one_thread):
    """An API key, one slot, a queue of one, a deadline of 1.5 s."""
    server, engine = start_server(tiny_model(), max_batch_size=1, max_queue=1, api_key="sekrit",
                                  max_tokens=100_000, request_timeout=1.5)
    yield server, engine
    server.stop()


def test_api_key(guarded):
    server, _ = guarded
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
        status, answer = raw(server, "POST", "/v1/completions", {"model": MODEL, "prompt": "x"}, headers)
        assert status == 401 and "key" in answer["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        client(server, api_key="wrong").completions.create(model=MODEL, prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client(server, api_key="wrong").models.list()
    assert client(server, api_key="sekrit").completions.create(model=MODEL, prompt="x", max_tokens=2).choices
    assert raw(server, "GET", "/health")[0] == 200  # probes need no key


def test_full_queue_answers_429_at_once_and_deadlines_end_requests(guarded):
    server, engine = guarded
    c = client(server, api_key="sekrit")
    running = c.completions.create(model=MODEL, prompt="a", max_tokens=90_000, stream=True,
                                   extra_body={"ignore_eos": True})
    next(iter(running))  # it holds the only slot
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(c.completions.create, model=MODEL, prompt="b", max_tokens=90_000,
                              extra_body={"ignore_eos": True})
        assert wait_until(lambda: engine.load()["waiting"] == 1)
        with pytest.raises(openai.RateLimitError) as full:
            c.completions.create(model=MODEL, prompt="c", max_tokens=5)
        assert "--max-queue" in full.value.message
        with pytest.raises(openai.APIStatusError) as late:  # its deadline passes, in the queue or running
            waiting.result(timeout=30)
        assert late.value.status_code == 504 and "deadline" in late.value.message
    with pytest.raises(openai.APIError, match="deadline"):  # the stream ends with an error event at its deadline
        for _ in running:
            pass
    assert wait_until(lambda: engine.load() == {"waiting": 0, "prefilling": 0, "running": 0, "free_slots": 1})

