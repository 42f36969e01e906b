"""The decode loop behind ``openxlstm serve``: one thread owns the model and runs every request in one batch.

A recurrent model keeps a fixed-size state per sequence, so a request can join or leave the batch at any
step. The engine keeps these states in a ``SlotPool`` (one preallocated tensor per state leaf, its batch
dimension ``max_batch_size`` long): memory is fixed at start-up and never grows with the text. Each
iteration of the loop

1. takes new requests, and drops cancelled ones and those past their deadline (their slots are free again),
2. admits waiting requests in arrival order while free slots remain (a request of ``n`` choices takes ``n``),
3. prefills admitted prompts, at most ``prefill_chunk`` tokens in all, in pieces that start at multiples of
   ``prefill_chunk`` (pieces of equal length run as one batch), so running streams keep flowing while a
   long prompt is read,
4. samples one token for every running choice from its last logits, and runs one decode step for all
   choices that continue: ``model(tokens (n, 1), state)`` with the state gathered from their slots
   (a view of the pool when the slots are contiguous) and written back after.

Each choice samples with its own generator, seeded and advanced exactly as ``openxlstm.generate`` advances
its generator for a batch of one (``sample_next`` on a (1, V) row), and rows of a batch do not mix, so a
choice's tokens equal ``generate`` run alone on its prompt (greedy, or with the same seed), up to the
rounding of batched matrix products; in float64 they agree token for token.

Requests come from other threads (``submit``, ``Request.cancel``); results leave through ``publish``, called
once per iteration with every ``Update`` of that iteration (the server hands them to its event loop), or,
without ``publish``, through each request's ``updates`` queue.
"""

from __future__ import annotations

import collections
import heapq
import logging
import queue
import secrets
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import UserError
from ..generation import sample_next

log = logging.getLogger("openxlstm.serve")

# why a choice ended: "stop" (a stop string or the end-of-document token) and "length" (max_tokens) carry a
# result; the others do not: the client went away, the deadline passed, the server stopped, or the model failed
ENDINGS = ("stop", "length", "cancelled", "timeout", "shutdown", "error")


@dataclass(frozen=True)
class SamplingParams:
    """How the choices of one request are generated. ``temperature`` 0 is greedy; ``top_k`` / ``top_p`` as in
    ``openxlstm.generate`` (None or top_k <= 0: off); choice j of ``n`` uses seed ``seed + j`` (None: a random
    seed per choice); ``stop``: strings that end a choice (cut from its text); ``ignore_eos``: do not end at
    the tokenizer's end-of-document token."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: tuple = ()
    n: int = 1
    ignore_eos: bool = False


@dataclass
class Update:
    """What one choice produced in one iteration: new ``text`` (possibly empty while a character or a
    possible stop string is incomplete), the new ``token_ids``, and on its last update its ``finish_reason``
    (one of ``ENDINGS``) and, for endings without a result, an ``error`` message."""

    index: int
    text: str = ""
    token_ids: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[str] = None


class Request:
    """One prompt (token ids) and its ``params.n`` choices. ``timeout`` (seconds from now) sets its deadline.

    Other threads read ``updates`` (when the engine has no ``publish``), ``prompt_tokens``,
    ``completion_tokens`` and ``finished`` (every choice has had its last update), and call ``cancel``.
    """

    def __init__(self, prompt_ids, params: SamplingParams, timeout: Optional[float] = None, request_id: str = ""):
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.params = params
        self.id = request_id
        self.arrival = time.monotonic()
        self.deadline = None if timeout is None else self.arrival + timeout
        self.timeout = timeout
        self.updates: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.finished = False
        self.first_token_time: Optional[float] = None  # seconds from arrival to the first sampled token
        self.completion_tokens = 0
        self.sink = None  # free for the caller (the server keeps its stream's queue here)
        self._slots: list[int] = []
        self._prefilled = 0
        self._open = params.n  # choices without their last update

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next iteration (its slots are freed then)."""
        self.cancelled = True


class QueueFull(Exception):
    """``submit`` found the waiting queue full."""


class Draining(Exception):
    """``submit`` was called after ``drain`` or ``stop``."""


# --- the slot pool ---------------------------------------------------------------------------------------
def _probe(model, device, batch: int, length: int):
    ids = torch.zeros(batch, length, dtype=torch.long, device=device)
    logits, state = model(ids, return_state=True, logits_to_keep=1)
    return logits, tree_flatten(state)


class SlotPool:
    """The recurrent states of ``size`` sequences, preallocated: each tensor of the model's state pytree is
    kept once with its batch dimension ``size`` long. Which dimension is the batch is found by running the
    model on one token at batch 1 and 2 (dim 0 for xLSTM, dim 1 for ``nn.LSTM``'s (layers, B, H)); a state
    that changes shape with the length of the text (a Transformer's KV cache) cannot live in a fixed slot
    and is refused with a ``UserError``."""

    def __init__(self, model: torch.nn.Module, size: int, device):
        one_logits, (one, spec) = _probe(model, device, 1, 1)
        _, (two, spec2) = _probe(model, device, 2, 1)
        _, (longer, spec3) = _probe(model, device, 1, 2)
        name = type(model).__name__
        if spec != spec2 or spec != spec3 or not any(isinstance(t, torch.Tensor) for t in one):
            raise UserError(f"{name} returns no recurrent state of a fixed structure; openxlstm serve serves "
                            f"recurrent models (xlstm, xlstm-large, lstm)")
        self.vocab_size = one_logits.shape[-1]
        self.spec, self.dims, self.leaves = spec, [], []
        for a, b, c in zip(one, two, longer):
            if not isinstance(a, torch.Tensor):
                self.dims.append(None)
                self.leaves.append(a)
                continue
            if a.shape != c.shape:
                raise UserError(f"{name}'s state grows with the text (a tensor of shape {tuple(a.shape)} after one "
                                f"token, {tuple(c.shape)} after two, as a KV cache does), so it cannot be held in "
                                f"a fixed-size slot; openxlstm serve serves recurrent models (xlstm, xlstm-large, "
                                f"lstm)")
            diff = [d for d in range(a.dim()) if a.shape[d] != b.shape[d]]
            if len(diff) != 1 or a.shape[diff[0]] != 1 or b.shape[diff[0]] != 2:
                raise UserError(f"cannot tell the batch dimension of {name}'s state (a tensor of shape "
                                f"{tuple(a.shape)} at batch 1, {tuple(b.shape)} at batch 2)")
            d = diff[0]
            shape = list(a.shape)
            shape[d] = size
            self.dims.append(d)
            self.leaves.append(torch.zeros(shape, dtype=a.dtype, device=a.device))
        self.size = size
        self.nbytes = sum(t.numel() * t.element_size() for t in self.leaves if isinstance(t, torch.Tensor))

    def _where(self, slots: list[int]):
        """(start, length) when the slots are consecutive, else an index tensor."""
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return slots[0], len(slots)
        device = next(t.device for t in self.leaves if isinstance(t, torch.Tensor))
        return torch.tensor(slots, dtype=torch.long, device=device)

    def gather(self, slots: list[int]):
        """The state pytree of these slots, batch in the order given (views of the pool when consecutive)."""
        where = self._where(slots)
        out = []
        for t, d in zip(self.leaves, self.dims):
            if d is None:
                out.append(t)
            elif isinstance(where, tuple):
                out.append(t.narrow(d, *where) if d == 0 else t.narrow(d, *where).contiguous())
            else:
                out.append(t.index_select(d, where))
        return tree_unflatten(out, self.spec)

    def scatter(self, slots: list[int], state) -> None:
        """Write a state pytree (batch in the order of ``slots``) into these slots."""
        leaves, spec = tree_flatten(state)
        if spec != self.spec:
            raise RuntimeError("the model returned a state of another structure than at start-up")
        where = self._where(slots)
        for t, d, new in zip(self.leaves, self.dims, leaves):
            if d is None:
                continue
            if isinstance(where, tuple):
                t.narrow(d, *where).copy_(new)
            else:
                t.index_copy_(d, where, new.to(t.dtype))

    def copy(self, src: int, dst: list[int]) -> None:
        """Copy slot ``src`` into each slot of ``dst`` (the choices of one prompt start from its state)."""
        if not dst:
            return
        self.scatter(dst, self.gather([src] * len(dst)))


# --- text of one choice as its tokens arrive -------------------------------------------------------------
class _Text:
    """The text of a growing list of token ids, decoded incrementally: ``add(id)`` returns the text that can be
    sent now, holding back an incomplete character (the tokenizer decodes it as U+FFFD) and any ending that
    may be the start of a stop string; ``stopped`` becomes True when a stop string appears.

    Only a short window of ids is decoded per token: the ids since the text last grew, with the one before
    as context (tokenizers that drop a word's leading space at the start of a decode keep it)."""

    def __init__(self, tokenizer, stops: tuple):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids[:read]
        self.sent = 0  # characters of text handed out
        self.prefix = 0
        self.read = 0
        self.stopped = False

    def add(self, tok: int) -> str:
        self.ids.append(tok)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        now = self.tokenizer.decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""  # an incomplete character (or nothing visible yet)
        self.text += now[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        cut = min((i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(cut)
        safe = len(self.text)
        for s in self.stops:  # hold back an ending that may grow into a stop string
            for k in range(min(len(s) - 1, safe - self.sent), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        return self._take(safe)

    def _take(self, end: int) -> str:
        new = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return new

    def final(self) -> str:
        """The rest of the text at the end: the whole output decoded at once (as ``openxlstm.generate``
        decodes it), cut at the first stop string, less what was sent."""
        full = self.tokenizer.decode(self.ids)
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=len(full))
        full, sent = full[:cut], self.text[:self.sent]
        return full[len(sent):] if full.startswith(sent) else ""


def _step(model: torch.nn.Module, tokens: torch.Tensor, state):
    """tokens (n, 1), state -> (logits (n, V) of the next tokens, new state): one decode step, the part
    that ``compile`` hands to ``torch.compile`` whole."""
    logits, state = model(tokens, state, return_state=True, logits_to_keep=1)
    return logits[:, -1], state


class _Choice:
    """One sequence being decoded: its slot, generator, tokens and text."""

    def __init__(self, request: Request, index: int, slot: int, logits: torch.Tensor, tokenizer, device):
        self.request, self.index, self.slot = request, index, slot
        self.logits = logits  # (1, V): the distribution of the next token
        p = request.params
        self.generator = None
        if p.temperature > 0:
            seed = p.seed + index if p.seed is not None else secrets.randbits(62)
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)
        self.text = _Text(tokenizer, p.stop)
        self.count = 0


# --- the engine ------------------------------------------------------------------------------------------
class Engine:
    """The decode loop (see the module docstring). ``start()`` runs it in a daemon thread; ``submit`` queues
    requests; ``drain(grace)`` refuses new ones and ends the rest after ``grace`` seconds; ``stop()`` ends
    every request ("shutdown") and the thread.

    Args:
        model: any model of the package with ``model(ids, state, return_state=True, logits_to_keep=1)``
            and a fixed-size state.
        tokenizer: ``encode`` / ``decode`` / ``eod_id`` (the model's ``model.tokenizer``).
        max_batch_size: slots in the pool: the most choices decoded at once.
        max_queue: requests that may wait for a slot; ``submit`` raises ``QueueFull`` beyond.
        prefill_chunk: prompt tokens prefilled per iteration, and the length of a prompt's pieces.
        publish: called from the loop's thread with the list of (Request, Update) of each iteration.
        metrics: an ``openxlstm.serving.metrics.Metrics`` that counts tokens and times (or None).
        compile: run the decode step under ``torch.compile(fullgraph=True, dynamic=True)``: True for
            inductor, or a torch.compile backend name. It is compiled here, at batch 1 and 2 (the batch size
            symbolic from 2 on; minutes on a CPU); tokens equal eager ones up to the rounding of the fused
            kernels. A model whose step does not compile decodes eagerly, with a warning.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, max_batch_size: int = 32, max_queue: int = 256,
                 prefill_chunk: int = 1024, publish: Optional[Callable[[list], None]] = None, metrics=None,
                 compile: Union[bool, str] = False):
        if tokenizer is None or not hasattr(tokenizer, "decode"):
            raise ValueError("the engine needs the model's tokenizer (encode / decode / eod_id) to write text")
        if max_batch_size < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError(f"max_batch_size and prefill_chunk must be >= 1, max_queue >= 0; got {max_batch_size}, "
                             f"{prefill_chunk}, {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        with torch.no_grad():
            self.pool = SlotPool(model, max_batch_size, self.device)
        self.vocab_size = self.pool.vocab_size
        self.max_batch_size, self.max_queue, self.prefill_chunk = max_batch_size, max_queue, prefill_chunk
        self.publish, self.metrics = publish, metrics
        self.eod_id = getattr(tokenizer, "eod_id", None)
        self._step = _step if not compile else self._compiled(compile)
        self._cv = threading.Condition()
        self._inbox: collections.deque = collections.deque()
        self._queued = 0  # requests submitted and not yet admitted or dropped (guarded by _cv)
        self._stopping = False
        self._draining = False
        self._drain_deadline: Optional[float] = None
        self._thread: Optional[threading.Thread] = None
        # owned by the loop's thread
        self._waiting: collections.deque = collections.deque()
        self._prefilling: list[Request] = []
        self._running: list[_Choice] = []
        self._free = list(range(max_batch_size))  # a heap: the lowest slots first, so batches stay contiguous
        self._updates: list = []

    def _compiled(self, compile: Union[bool, str]) -> Callable:
        """The compiled decode step, compiled now (see ``compile``), or the eager one if it fails."""
        step = torch.compile(_step, backend="inductor" if compile is True else compile, fullgraph=True,
                             dynamic=True)
        try:
            with torch.no_grad():
                for n in sorted({1, min(2, self.max_batch_size)}):
                    tokens = torch.zeros(n, 1, dtype=torch.long, device=self.device)
                    step(self.model, tokens, self.pool.gather(list(range(n))))
        except Exception as e:  # noqa: BLE001 - a model the compiler cannot take decodes eagerly
            first = (str(e).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"the decode step of {type(self.model).__name__} did not compile, decoding eagerly "
                          f"({type(e).__name__}: {first})", stacklevel=3)
            return _step
        return step

    # -- other threads ----------------------------------------------------------------------------------
    def start(self) -> "Engine":
        """Start the loop's thread (once; later calls do nothing)."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._loop, name="openxlstm-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, requests: list[Request]) -> None:
        """Queue requests (all or none): ``QueueFull`` when fewer than ``len(requests)`` places are left in
        the queue, ``Draining`` after ``drain`` or ``stop``; ``ValueError`` for a request that can never run."""
        for r in requests:
            if not r.prompt_ids:
                raise ValueError("a prompt must hold at least one token")
            if not 1 <= r.params.n <= self.max_batch_size:
                raise ValueError(f"n={r.params.n} choices do not fit in {self.max_batch_size} slots")
            if max(r.prompt_ids) >= self.vocab_size or min(r.prompt_ids) < 0:
                raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        with self._cv:
            if self._draining or self._stopping:
                raise Draining("the server is shutting down")
            if self._queued + len(requests) > self.max_queue:
                raise QueueFull(f"{self._queued} requests are waiting for a slot (at most {self.max_queue})")
            self._queued += len(requests)
            self._inbox.extend(requests)
            self._cv.notify()

    def cancel(self, request: Request) -> None:
        request.cancel()
        with self._cv:
            self._cv.notify()

    def drain(self, grace: float) -> None:
        """Refuse new requests; those still unfinished after ``grace`` seconds end with "shutdown"."""
        with self._cv:
            self._draining = True
            self._drain_deadline = time.monotonic() + grace
            self._cv.notify()

    def stop(self, timeout: Optional[float] = 10.0) -> None:
        """End every request ("shutdown") and the loop; waits for its thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def load(self) -> dict:
        """{"waiting", "prefilling", "running", "free_slots"}: read from any thread (a snapshot)."""
        with self._cv:
            waiting = self._queued
        return {"waiting": waiting, "prefilling": len(self._prefilling), "running": len(self._running),
                "free_slots": len(self._free)}

    # -- the loop's thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not (self._stopping or self._inbox or self._waiting or self._prefilling or self._running):
                    self._cv.wait(timeout=1.0)
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                stopping = self._stopping
            if stopping:
                self._end_all("shutdown", "the server stopped before the request finished")
                self._flush()
                return
            try:
                self._iterate()
            except Exception as e:  # noqa: BLE001 - a model failure ends the requests in flight, not the loop
                log.exception("the decode loop failed; ending the requests in flight")
                first = (str(e).strip().splitlines() or [""])[0][:200]
                why = f"internal error in the decode loop: {type(e).__name__}: {first}"
                for c in list(self._running):
                    self._finish(c, "error", why)
                for r in list(self._prefilling):
                    self._drop(r, "error", why)
            self._flush()

    def _flush(self) -> None:
        if not self._updates:
            return
        updates, self._updates = self._updates, []
        if self.publish is not None:
            self.publish(updates)
        else:
            for r, u in updates:
                r.updates.put(u)

    def _iterate(self) -> None:
        self._reap(time.monotonic())
        self._admit()
        self._prefill()
        self._decode()

    def _ending(self, r: Request, now: float):
        """(reason, message) when request r must end now, else None."""
        if r.cancelled:
            return "cancelled", "the request was cancelled"
        if r.deadline is not None and now >= r.deadline:
            return "timeout", f"the request ran past its deadline of {r.timeout:g} s"
        if self._drain_deadline is not None and now >= self._drain_deadline:
            return "shutdown", "the server is shutting down"
        return None

    def _reap(self, now: float) -> None:
        for r in list(self._waiting):
            end = self._ending(r, now)
            if end:
                self._waiting.remove(r)
                with self._cv:
                    self._queued -= 1
                self._drop(r, *end)
        for r in list(self._prefilling):
            end = self._ending(r, now)
            if end:
                self._drop(r, *end)
        for c in list(self._running):
            end = self._ending(c.request, now)
            if end:
                self._finish(c, *end)

    def _drop(self, r: Request, reason: str, message: str) -> None:
        """End a request that has no running choices (waiting or prefilling): every choice, one update."""
        if r in self._prefilling:
            self._prefilling.remove(r)
        for s in r._slots:
            heapq.heappush(self._free, s)
        r._slots = []
        for j in range(r.params.n):
            self._updates.append((r, Update(j, finish_reason=reason, error=message)))
        r._open = 0
        r.finished = True

    def _end_all(self, reason: str, message: str) -> None:
        for c in list(self._running):
            self._finish(c, reason, message)
        for r in list(self._prefilling):
            self._drop(r, reason, message)
        while self._waiting:
            self._drop(self._waiting.popleft(), reason, message)
        with self._cv:
            for r in self._inbox:
                self._drop(r, reason, message)
            self._inbox.clear()
            self._queued = 0

    def _admit(self) -> None:
        while self._waiting and len(self._free) >= self._waiting[0].params.n:
            r = self._waiting.popleft()
            with self._cv:
                self._queued -= 1
            r._slots = [heapq.heappop(self._free) for _ in range(r.params.n)]
            self._prefilling.append(r)

    def _prefill(self) -> None:
        """At most ``prefill_chunk`` prompt tokens (at least one piece), in pieces [k c, (k+1) c); pieces of
        equal length and kind (a prompt's first, or one that continues a state) run as one batch."""
        budget, pieces = self.prefill_chunk, []
        for r in self._prefilling:
            take = min(self.prefill_chunk, r.prompt_tokens - r._prefilled)  # r._prefilled: a multiple of it
            if pieces and take > budget:
                break
            pieces.append((r, take))
            budget -= take
            if budget <= 0:
                break
        groups: dict = collections.defaultdict(list)
        for r, take in pieces:
            groups[(take, r._prefilled == 0)].append(r)
        for (take, fresh), rs in groups.items():
            ids = torch.tensor([r.prompt_ids[r._prefilled:r._prefilled + take] for r in rs], dtype=torch.long,
                               device=self.device)  # (k, take)
            slots = [r._slots[0] for r in rs]
            state = None if fresh else self.pool.gather(slots)
            logits, state = self.model(ids, state, return_state=True, logits_to_keep=1)  # (k, 1, V)
            self.pool.scatter(slots, state)
            for i, r in enumerate(rs):
                r._prefilled += take
                if r._prefilled == r.prompt_tokens:
                    self._start(r, logits[i:i + 1, -1])
        if self.metrics is not None and pieces:
            self.metrics.add_prompt_tokens(sum(take for _, take in pieces))

    def _start(self, r: Request, logits: torch.Tensor) -> None:
        """A fully prefilled request: its choices start decoding from its state (copied into each slot)."""
        self._prefilling.remove(r)
        self.pool.copy(r._slots[0], r._slots[1:])
        for j, slot in enumerate(r._slots):
            self._running.append(_Choice(r, j, slot, logits, self.tokenizer, self.device))

    def _sample(self, choices: list[_Choice]) -> list[int]:
        """One token per choice (one host read for all)."""
        greedy = [c for c in choices if c.generator is None]
        out: dict = {}
        if greedy:
            ids = torch.cat([c.logits for c in greedy]).argmax(dim=-1)
            out.update(zip(map(id, greedy), ids))
        for c in choices:
            if c.generator is not None:
                p = c.request.params
                out[id(c)] = sample_next(c.logits, p.temperature, p.top_k, p.top_p, c.generator)[0]
        return torch.stack([out[id(c)] for c in choices]).tolist()

    def _decode(self) -> None:
        if not self._running:
            return
        now = time.monotonic()
        choices = list(self._running)
        tokens = self._sample(choices)
        alive: list[_Choice] = []
        for c, tok in zip(choices, tokens):
            r, p = c.request, c.request.params
            if r.first_token_time is None:
                r.first_token_time = now - r.arrival
                if self.metrics is not None:
                    self.metrics.observe_ttft(r.first_token_time)
            c.count += 1
            r.completion_tokens += 1
            eod = tok == self.eod_id and not p.ignore_eos
            text = "" if eod else c.text.add(tok)
            if eod or c.text.stopped or c.count >= p.max_tokens:
                self._updates.append((r, Update(c.index, text + c.text.final(), [tok],
                                                "stop" if eod or c.text.stopped else "length")))
                self._release(c)
            else:
                if text:
                    self._updates.append((r, Update(c.index, text, [tok])))
                alive.append(c)
        if self.metrics is not None:
            self.metrics.add_generated_tokens(len(tokens))
        self._running = sorted(alive, key=lambda c: c.slot)
        if not self._running:
            return
        slots = [c.slot for c in self._running]
        tok = torch.tensor([c.text.ids[-1] for c in self._running], dtype=torch.long, device=self.device)
        logits, state = self._step(self.model, tok[:, None], self.pool.gather(slots))  # (n, V)
        self.pool.scatter(slots, state)
        for i, c in enumerate(self._running):
            c.logits = logits[i:i + 1]  # (1, V)

    def _finish(self, c: _Choice, reason: str, message: str) -> None:
        """End a running choice without a result (cancelled, timeout, shutdown, error)."""
        self._updates.append((c.request, Update(c.index, finish_reason=reason, error=message)))
        self._release(c)

    def _release(self, c: _Choice) -> None:
        if c in self._running:
            self._running.remove(c)
        heapq.heappush(self._free, c.slot)
        r = c.request
        r._open -= 1
        if r._open == 0:
            r.finished = True
            r._slots = []


__all__ = ["Engine", "Request", "SamplingParams", "Update", "SlotPool", "QueueFull", "Draining", "ENDINGS"]
