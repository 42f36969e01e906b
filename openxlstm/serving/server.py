"""The HTTP layer of ``openxlstm serve``: a Starlette app over one ``Engine``, run by uvicorn.

The app only reads, checks, queues and streams: ``POST /v1/completions`` and ``POST /v1/chat/completions``
(OpenAI's bodies, ``stream: true`` as server-sent events in OpenAI's chunk format), ``GET /v1/models``,
``GET /health`` (200 while serving, 503 once shutting down: what load balancers and Kubernetes probe) and
``GET /metrics`` (Prometheus text). Every refusal is OpenAI's error JSON with a one-line message and a 4xx
status: 400 for a bad body, 401 without the API key, 404 for an unknown model or path, 413 for a body over
``max_body_bytes`` (refused from its Content-Length, or as soon as more bytes arrive, never read whole),
429 at once when the queue is full, 503 while shutting down; 504 when a request runs past its deadline.

The engine's thread hands each iteration's updates to the event loop in one ``call_soon_threadsafe``; each
HTTP request reads them from its own ``asyncio.Queue``. A client that goes away (a closed stream or an
abandoned non-streaming request) cancels its requests, and the engine frees their slots at its next step.
``/health`` and ``/metrics`` answer without the API key, as vLLM's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import UserError
from . import protocol
from .chat import ChatError, ChatTemplate
from .engine import Draining, Engine, QueueFull, Request, SamplingParams
from .metrics import Metrics

log = logging.getLogger("openxlstm.serve")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to --max-tokens
# (HTTP status, error code) of the endings without a result
_ENDING_STATUS = {"timeout": (504, "timeout"), "shutdown": (503, "server_shutting_down"),
                  "error": (500, "server_error")}


@dataclass
class ServerSettings:
    """What the server allows: see ``openxlstm serve --help`` for each."""

    model_name: str
    api_key: Optional[str] = None
    max_prompt_tokens: int = 8192
    max_tokens: int = 1024
    request_timeout: float = 600.0
    max_body_bytes: int = 1 << 20
    grace_period: float = 30.0


class APIError(Exception):
    """A refusal: HTTP ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(protocol.error_body(self.message, self.kind, self.param, self.code), self.status,
                            headers=self.headers)


class _Line:
    """The one log line of a request, written once when it ends, and its count in the metrics."""

    def __init__(self, service: "_Service", request: HTTPRequest, endpoint: str):
        self.service, self.endpoint, self.start = service, endpoint, time.monotonic()
        self.client = request.client.host if request.client else "-"
        self.rid, self.written = "-", False

    def write(self, status: int, reqs: list = (), finish: str = "", error: str = "") -> None:
        if self.written:
            return
        self.written = True
        self.service.metrics.count_request(self.endpoint, status)
        parts = [self.rid, f"POST {self.endpoint}", str(status), f"client={self.client}"]
        if reqs:
            ttft = min((r.first_token_time for r in reqs if r.first_token_time is not None), default=None)
            parts += [f"prompt={sum(r.prompt_tokens for r in reqs)}",
                      f"completion={sum(r.completion_tokens for r in reqs)}"]
            parts += [f"ttft={ttft:.3f}s"] if ttft is not None else []
        parts += [f"finish={finish}"] if finish else []
        parts += [f"time={time.monotonic() - self.start:.3f}s"]
        parts += [f"error={json.dumps(error)}"] if error else []
        log.info(" ".join(parts))


class _Service:
    """The app's handlers and what they share."""

    def __init__(self, engine: Engine, settings: ServerSettings, chat_template: Optional[ChatTemplate] = None,
                 metrics: Optional[Metrics] = None):
        self.engine, self.settings = engine, settings
        self.tokenizer = engine.tokenizer
        self.chat = chat_template or ChatTemplate()
        self.encode_chat = self.chat.encoder(self.tokenizer)
        self.metrics = metrics or engine.metrics or Metrics()
        engine.metrics = self.metrics
        self.created = int(time.time())
        self.draining = False

    # -- shared checks ------------------------------------------------------------------------------------
    def authorize(self, request: HTTPRequest) -> None:
        key = self.settings.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "this server needs an API key: send the header 'Authorization: Bearer KEY'",
                           "invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "incorrect API key", "invalid_request_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_body(self, request: HTTPRequest) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is {int(declared):,} bytes, over this server's limit of "
                                f"{limit:,} (--max-body-bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is over this server's limit of {limit:,} bytes "
                                    f"(--max-body-bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    def parse(self, body: bytes, kind):
        try:
            return kind.model_validate_json(body)
        except ValidationError as e:
            message, param = protocol.describe(e, kind)
            raise APIError(400, message, param=param) from None

    def check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.settings.model_name!r}",
                           param="model", code="model_not_found")

    def check_prompt(self, ids: list, what: str = "the prompt") -> list:
        if not ids:
            raise APIError(400, f"{what} holds no tokens (an empty prompt has nothing to continue)", param="prompt")
        if len(ids) > self.settings.max_prompt_tokens:
            raise APIError(400, f"{what} has {len(ids):,} tokens, over this server's limit of "
                                f"{self.settings.max_prompt_tokens:,} (--max-prompt-tokens)", param="prompt")
        bad = next((t for t in ids if not 0 <= t < self.engine.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{what} holds token id {bad}, outside the model's vocabulary of "
                                f"{self.engine.vocab_size} (ids 0 to {self.engine.vocab_size - 1})", param="prompt")
        return ids

    def encode(self, text: str, encode=None) -> list:
        try:
            return [int(t) for t in (encode or self.tokenizer.encode)(text)]
        except UserError as e:
            raise APIError(400, str(e), param="prompt") from None

    def params(self, body, max_tokens: Optional[int], default: int) -> SamplingParams:
        cap = self.settings.max_tokens
        if max_tokens is not None and max_tokens > cap:
            raise APIError(400, f"max_tokens {max_tokens} is above this server's limit of {cap} (--max-tokens)",
                           param="max_tokens")
        if body.n > self.engine.max_batch_size:
            raise APIError(400, f"n={body.n} choices do not fit in this server's batch of "
                                f"{self.engine.max_batch_size} (--max-batch-size)", param="n")
        return SamplingParams(max_tokens=max_tokens if max_tokens is not None else min(default, cap),
                              temperature=1.0 if body.temperature is None else body.temperature,
                              top_k=body.top_k if body.top_k is not None and body.top_k > 0 else None,
                              top_p=body.top_p, seed=body.seed, stop=body.stop, n=body.n, ignore_eos=body.ignore_eos)

    def submit(self, reqs: list[Request]) -> None:
        try:
            self.engine.submit(reqs)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e} (--max-queue); retry later", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except Draining:
            raise APIError(503, "the server is shutting down", "server_error", code="server_shutting_down") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    # -- endpoints ----------------------------------------------------------------------------------------
    async def completions(self, request: HTTPRequest) -> Response:
        line = _Line(self, request, "/v1/completions")
        try:
            self.authorize(request)
            body = self.parse(await self.read_body(request), protocol.CompletionRequest)
            self.check_model(body.model)
            many = len(body.prompt) > 1
            if len(body.prompt) > self.engine.max_queue:
                raise APIError(400, f"{len(body.prompt)} prompts in one request; this server queues at most "
                                    f"{self.engine.max_queue} (--max-queue)", param="prompt")
            prompts = [self.check_prompt(self.encode(p) if isinstance(p, str) else p,
                                         f"prompt {k}" if many else "the prompt") for k, p in enumerate(body.prompt)]
            params = self.params(body, body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS)
        except APIError as e:
            line.write(e.status, error=e.message)
            return e.response()
        return await self.generate(request, line, "cmpl", body, prompts, params)

    async def chat_completions(self, request: HTTPRequest) -> Response:
        line = _Line(self, request, "/v1/chat/completions")
        try:
            self.authorize(request)
            body = self.parse(await self.read_body(request), protocol.ChatCompletionRequest)
            self.check_model(body.model)
            messages = [{"role": m.role, "content": m.content} for m in body.messages]
            try:
                text = self.chat.render(messages)
            except ChatError as e:
                raise APIError(400, f"the model's chat template refused these messages: {e}",
                               param="messages") from None
            prompts = [self.check_prompt(self.encode(text, self.encode_chat), "the chat prompt")]
            params = self.params(body, body.limit, self.settings.max_tokens)
        except APIError as e:
            line.write(e.status, error=e.message)
            return e.response()
        return await self.generate(request, line, "chatcmpl", body, prompts, params)

    async def generate(self, request: HTTPRequest, line: _Line, prefix: str, body, prompts: list,
                       params: SamplingParams) -> Response:
        rid = f"{prefix}-{uuid.uuid4().hex}"
        line.rid = rid
        sink: asyncio.Queue = asyncio.Queue()
        reqs = [Request(ids, params, self.settings.request_timeout, rid) for ids in prompts]
        for r in reqs:
            r.sink = sink
        try:
            self.submit(reqs)
        except APIError as e:
            line.write(e.status, error=e.message)
            return e.response()
        watcher = asyncio.ensure_future(_watch_disconnect(request, self.engine, reqs, sink))
        stream = _Stream(self, line, rid, prefix == "chatcmpl", reqs, sink, watcher, body.include_usage)
        if body.stream:
            return StreamingResponse(stream.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await stream.collect()

    async def models(self, request: HTTPRequest) -> Response:
        try:
            self.authorize(request)
        except APIError as e:
            return e.response()
        card = protocol.model_card(self.settings.model_name, self.created)
        if "model" in request.path_params:
            if request.path_params["model"] != self.settings.model_name:
                return APIError(404, f"the model {request.path_params['model']!r} does not exist; this server "
                                     f"serves {self.settings.model_name!r}", code="model_not_found").response()
            return JSONResponse(card)
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: HTTPRequest) -> Response:
        load = self.engine.load()
        status = "draining" if self.draining else "ok"
        return JSONResponse({"status": status, "model": self.settings.model_name, **load},
                            503 if self.draining else 200)

    async def metrics_page(self, request: HTTPRequest) -> Response:
        text = self.metrics.render(self.engine.load(), self.engine.max_batch_size, self.engine.pool.nbytes)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def _watch_disconnect(request: HTTPRequest, engine: Engine, reqs: list, sink: asyncio.Queue) -> None:
    """When the client disconnects, cancel its requests and put None into ``sink`` (the body has been read,
    so the next ASGI message is the disconnect; after the response it is one too)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for r in reqs:
                if not r.finished:
                    engine.cancel(r)
            sink.put_nowait(None)
            return


class _Stream:
    """The updates of one HTTP request's engine requests, as SSE events or one JSON body. Choice ``k * n + j``
    is choice j of prompt k."""

    def __init__(self, service: _Service, line: _Line, rid: str, chat: bool, reqs: list, sink: asyncio.Queue,
                 watcher: asyncio.Future, include_usage: bool):
        self.service, self.line, self.rid, self.chat, self.reqs, self.sink = service, line, rid, chat, reqs, sink
        self.watcher, self.include_usage = watcher, include_usage
        self.created = int(time.time())
        self.model = service.settings.model_name
        self.n = reqs[0].params.n
        self.base = {id(r): k * self.n for k, r in enumerate(reqs)}
        self.total = self.n * len(reqs)

    def _usage(self) -> dict:
        return protocol.usage(sum(r.prompt_tokens for r in self.reqs), sum(r.completion_tokens for r in self.reqs))

    def _close(self) -> None:
        self.watcher.cancel()
        for r in self.reqs:
            if not r.finished:
                self.service.engine.cancel(r)

    async def collect(self) -> Response:
        texts, finishes = [""] * self.total, [None] * self.total
        try:
            left = self.total
            while left:
                item = await self.sink.get()
                if item is None:  # the client went away: nobody reads an answer
                    self.line.write(499, self.reqs, "cancelled")
                    return Response(status_code=499)
                r, u = item
                j = self.base[id(r)] + u.index
                texts[j] += u.text
                if u.finish_reason is not None:
                    left -= 1
                    if u.error is not None:
                        status, code = _ENDING_STATUS.get(u.finish_reason, (500, "server_error"))
                        self.line.write(status, self.reqs, u.finish_reason, u.error)
                        return APIError(status, u.error, "server_error", code=code).response()
                    finishes[j] = u.finish_reason
        finally:
            self._close()
        build = protocol.chat_completion if self.chat else protocol.completion
        self.line.write(200, self.reqs, ",".join(sorted(set(finishes))))
        return JSONResponse(build(self.rid, self.created, self.model, texts, finishes, self._usage()))

    def _event(self, payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def _chunk(self, index: int, text: str, finish: Optional[str], first: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return self._event(protocol.chat_chunk(self.rid, self.created, self.model, index, delta, finish))
        return self._event(protocol.completion_chunk(self.rid, self.created, self.model, index, text, finish))

    async def events(self):
        """The SSE events; updates that queued up while the client was being written to go out in one send."""
        finishes, status, error = set(), 200, ""
        try:
            if self.chat:
                yield "".join(self._chunk(j, "", None, first=True) for j in range(self.total))
            left = self.total
            while left:
                items = [await self.sink.get()]
                while not self.sink.empty():
                    items.append(self.sink.get_nowait())
                out = []
                for item in items:
                    if item is None:
                        status = 499
                        return
                    r, u = item
                    if u.error is not None:
                        status, code = _ENDING_STATUS.get(u.finish_reason, (500, "server_error"))
                        error = u.error
                        finishes.add(u.finish_reason)
                        out.append(self._event(protocol.error_body(u.error, "server_error", code=code)))
                        yield "".join(out) + "data: [DONE]\n\n"
                        return
                    if u.text or u.finish_reason is not None:
                        out.append(self._chunk(self.base[id(r)] + u.index, u.text, u.finish_reason))
                    if u.finish_reason is not None:
                        left -= 1
                        finishes.add(u.finish_reason)
                if out:
                    yield "".join(out)
            if self.include_usage:
                obj = "chat.completion.chunk" if self.chat else "text_completion"
                yield self._event(protocol.usage_chunk(self.rid, self.created, self.model, obj, self._usage()))
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            self._close()
            self.line.write(status, self.reqs, ",".join(sorted(finishes)) or ("cancelled" if status == 499 else ""),
                            error)


def create_app(engine: Engine, settings: ServerSettings, chat_template: Optional[ChatTemplate] = None,
               metrics: Optional[Metrics] = None) -> Starlette:
    """The ASGI app. Its lifespan starts the engine's thread (if not running) and connects its updates to
    the event loop; at shutdown it stops the engine. ``app.state.service`` holds the handlers' state."""
    service = _Service(engine, settings, chat_template, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()

        def deliver(updates):
            for r, u in updates:
                if r.sink is not None:
                    r.sink.put_nowait((r, u))

        def publish(updates):
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
                loop.call_soon_threadsafe(deliver, updates)

        engine.publish = publish
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(protocol.error_body(message, kind), exc.status_code, headers=exc.headers)

    async def server_error(request, exc: Exception):
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return JSONResponse(protocol.error_body(f"internal error: {type(exc).__name__}", "server_error"), 500)

    routes = [Route("/v1/completions", service.completions, methods=["POST"]),
              Route("/v1/chat/completions", service.chat_completions, methods=["POST"]),
              Route("/v1/models", service.models, methods=["GET"]),
              Route("/v1/models/{model:path}", service.models, methods=["GET"]),
              Route("/health", service.health, methods=["GET"]),
              Route("/metrics", service.metrics_page, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.service = service
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free port); ``UserError`` when the address is taken or
    cannot be used."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


def _uvicorn_server(app, settings: ServerSettings, on_signal):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with SIGTERM / SIGINT handled here: the first one starts the shutdown (the engine
        refuses new requests and ends the rest after the grace period, uvicorn stops accepting connections
        and waits for the open ones), a second SIGINT forces the exit; the process then exits 0 instead of
        dying of the signal."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            on_signal()

    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", ws="none",
                            timeout_graceful_shutdown=settings.grace_period + 5, timeout_keep_alive=30)
    return Server(config)


def run(app: Starlette, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM or SIGINT (from the main thread), then drain: see
    ``_uvicorn_server``."""
    service: _Service = app.state.service

    def on_signal():
        if not service.draining:
            service.draining = True
            log.info("shutting down: refusing new requests, ending the others within %g s",
                     service.settings.grace_period)
            service.engine.drain(service.settings.grace_period)

    _uvicorn_server(app, service.settings, on_signal).run(sockets=[sock])


class ThreadedServer:
    """``app`` served from a background thread (tests, notebooks): ``url`` is its base URL
    (``http://host:port``), ``stop()`` shuts it down as SIGTERM would (the engine's grace period, then the
    engine's thread ends)."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0):
        sock = bind(host, port)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{sock.getsockname()[1]}"
        self._service: _Service = app.state.service
        self._server = _uvicorn_server(app, self._service.settings, lambda: None)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="openxlstm-http")
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._service.draining = True
        self._service.engine.drain(self._service.settings.grace_period)
        self._server.should_exit = True
        self._thread.join(timeout)


__all__ = ["ServerSettings", "APIError", "ThreadedServer", "create_app", "bind", "run",
           "COMPLETIONS_DEFAULT_MAX_TOKENS"]
