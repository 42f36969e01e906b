"""Shared pieces of the serving tests: a tiny float64 xLSTM with the byte tokenizer, a server for it in a
background thread, a raw HTTP request (for bodies the openai client would never send), and the oracle:
``openxlstm.generate`` run alone on a copy of the model."""

import copy
import http.client
import json
import time

import torch

import openxlstm
from openxlstm.data import ByteTokenizer
from openxlstm.models import build_model

TINY_XLSTM = {"vocab_size": 257, "embedding_dim": 32, "num_blocks": 2, "slstm_at": [1], "mlstm_num_heads": 2,
              "slstm_num_heads": 2}
MODEL = "tiny"


def tiny_model(arch: str = "xlstm", config: dict = None, seed: int = 0) -> torch.nn.Module:
    """A float64 model (so that batched and alone agree token for token, far from any rounding tie)."""
    torch.manual_seed(seed)
    return build_model(arch, config or TINY_XLSTM).double().eval()


def start_server(model, tokenizer=None, chat_template=None, **settings):
    """(ThreadedServer, engine) for ``model``; settings: engine keywords (max_batch_size, max_queue,
    prefill_chunk) and ServerSettings fields."""
    from openxlstm.serving.engine import Engine
    from openxlstm.serving.server import ServerSettings, ThreadedServer, create_app

    engine_kw = {k: settings.pop(k) for k in ("max_batch_size", "max_queue", "prefill_chunk") if k in settings}
    engine = Engine(model, tokenizer or ByteTokenizer(), **engine_kw)
    app = create_app(engine, ServerSettings(model_name=MODEL, **settings), chat_template)
    return ThreadedServer(app), engine


def client(server, api_key: str = "unused", **kw):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=kw.pop("timeout", 60),
                         **kw)


def raw(server, method: str, path: str, body=None, headers=None, chunked: bool = False):
    """(status, parsed JSON or text) of one HTTP request; ``body``: bytes, or an object sent as JSON."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        if chunked:
            conn.request(method, path, body=iter([data[i:i + 65536] for i in range(0, len(data), 65536)]),
                         headers={"Content-Type": "application/json", **(headers or {})}, encode_chunked=True)
        else:
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        text = resp.read().decode()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(text)
    except json.JSONDecodeError:
        return resp.status, text


def wait_until(condition, limit_s: float = 30.0):
    """Poll ``condition()`` until it is true or ``limit_s`` seconds pass; returns its last value."""
    end = time.monotonic() + limit_s
    while not condition() and time.monotonic() < end:
        time.sleep(0.02)
    return condition()


class Oracle:
    """``openxlstm.generate`` alone on a copy of the model (the server's thread owns the original)."""

    def __init__(self, model, tokenizer=None):
        self.model, self.tokenizer = copy.deepcopy(model), tokenizer or ByteTokenizer()

    def __call__(self, prompt: str, max_tokens: int, temperature: float = 1.0, seed=None, top_k=None, top_p=None,
                 stop=None) -> str:
        return openxlstm.generate(self.model, prompt, self.tokenizer, max_new_tokens=max_tokens,
                                  temperature=temperature, seed=seed, top_k=top_k, top_p=top_p, stop=stop)
