"""Text generation with a carried recurrent state: one chunkwise pass over the prompt, then one token per
step that feeds only the new token and the state (constant time and memory per token for xLSTM and LSTM;
the Transformer baseline's state is its KV cache).

Prompts of different lengths in a batch are exact, without padding: the common prefix is prefilled in one
pass, then each row keeps feeding its own prompt tokens until it runs out and starts sampling.

Everything per token stays on the device: the prompts are one padded (B, L) tensor with the row lengths,
the tokens fed and sampled are written into one (B, L + max_new_tokens) tensor, and the choice between a
row's next prompt token and its sample is a ``torch.where``. The host reads the tokens once at the end, or
once per token when a stop string or a streaming callback needs the text as it grows. The single-token
step can run compiled (``compile=True``: a CUDA graph on GPU).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves, tree_map_only

from .errors import UserError

Prompt = Union[str, Sequence[str], Sequence[int], torch.Tensor]


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy; top_k keeps the k likeliest tokens; top_p
    keeps the smallest set whose probability reaches p (nucleus sampling).

    The draw is ``torch.multinomial(probs, 1)``'s own algorithm, written out (argmax of probs / Exp(1)
    noise from ``generator``): the same token for the same generator state, without multinomial's checks
    of the probabilities, which read them on the host (two device syncs per call on CUDA).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # tokens after the nucleus is full
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)  # (B, V)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)  # (B, V)
    return (probs / noise).argmax(dim=-1)


def _encode_prompts(prompt: Prompt, tokenizer, device) -> tuple[torch.Tensor, Optional[torch.Tensor], list, str]:
    """(ids (B, L) on ``device``, rows shorter than L padded with 0; row lengths (B,) on ``device``, None
    when all rows are L long; the same lengths as a list; kind "str", "strs" or "ids")."""
    if isinstance(prompt, torch.Tensor):
        ids = prompt.unsqueeze(0) if prompt.dim() == 1 else prompt
        if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex():
            raise UserError(f"a tensor prompt must hold integer token ids (S,) or (B, S), "
                            f"got {ids.dtype} {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise UserError("every prompt must hold at least one token (an empty prompt has nothing to continue)")
        return ids.to(device=device, dtype=torch.long), None, [ids.shape[1]] * ids.shape[0], "ids"
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str)):
        if tokenizer is None:
            raise UserError("text prompts need a tokenizer (this model was trained on token ids only)")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows = [[int(t) for t in tokenizer.encode(text)] for text in texts]
        kind = "str" if isinstance(prompt, str) else "strs"
    elif isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (list, tuple)):
        rows, kind = [list(map(int, row)) for row in prompt], "ids"
    else:
        rows, kind = [list(map(int, prompt))], "ids"
    lens = [len(r) for r in rows]
    if not rows or min(lens) == 0:
        raise UserError("every prompt must hold at least one token (an empty prompt has nothing to continue)")
    L = max(lens)
    table = torch.tensor([r + [0] * (L - len(r)) + [len(r)] for r in rows], dtype=torch.long, device=device)
    return table[:, :L], (table[:, L] if min(lens) < L else None), lens, kind  # one host-to-device copy


def _decode_step(model: torch.nn.Module, tok: torch.Tensor, state):
    """tok (B, 1), state -> (logits (B, V) of the next token, new state): the whole per-token model call."""
    logits, state = model(tok, state, return_state=True)
    return logits[:, -1], state


_COMPILED_STEPS: dict = {}  # (backend, mode) -> torch.compile(_decode_step)
_COMPILE_FAILURES: dict = {}  # (compile, device type, model class, state shapes) -> why it did not compile


def compiled_decode_step(compile: Union[bool, str, Callable], device: torch.device) -> tuple[Callable, bool]:
    """(step, is_cuda_graph): ``_decode_step`` compiled with ``fullgraph=True`` and static shapes.

    ``compile`` True is the inductor backend, with ``mode="reduce-overhead"`` (CUDA graphs) on CUDA; else a
    torch.compile backend: a name ("aot_eager", ...) or a callable. One compiled function per (backend, mode)
    serves every model and batch size: torch.compile specializes it (and records a CUDA graph) per model
    structure and shape on first use and reuses that afterwards.
    """
    backend = "inductor" if compile is True else compile
    mode = "reduce-overhead" if backend == "inductor" and device.type == "cuda" else None
    key = (backend, mode)
    if key not in _COMPILED_STEPS:
        _COMPILED_STEPS[key] = torch.compile(_decode_step, backend=backend, mode=mode, fullgraph=True, dynamic=False)
    return _COMPILED_STEPS[key], mode == "reduce-overhead"


def _run_step(step: Callable, cuda_graph: bool, model, tok: torch.Tensor, state):
    """``step(model, tok, state)``; for a CUDA-graph step, marks the start of a new step first and returns
    clones of the new state. A replay's outputs live in the graph's memory pool, overwritten by the next
    replay; fed back as inputs, they would be taken at their (alternating) addresses and make every step
    record the graph again. Clones are ordinary tensors, which a replay copies into its own input buffers.
    The logits are not cloned: they are sampled before the next replay."""
    if not cuda_graph:
        return step(model, tok, state)
    torch.compiler.cudagraph_mark_step_begin()
    last, state = step(model, tok, state)
    return last, tree_map_only(torch.Tensor, torch.clone, state)


def _shapes(state) -> list[tuple[int, ...]]:
    """The shapes of the tensors in a model state (a pytree of NamedTuples), to tell fixed-size states."""
    return [tuple(t.shape) for t in tree_leaves(state) if isinstance(t, torch.Tensor)]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt: Prompt,
    tokenizer=None,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    stop: Optional[str] = None,
    on_text: Optional[Callable[[int, str], None]] = None,
    compile: Union[bool, str, Callable] = False,
):
    """Continue ``prompt`` with a model that has ``forward(ids, state=None, return_state=False)``.

    Args:
        prompt: a string, a list of strings (a batch), or token ids: a list of ints, a list of lists (rows of
            any lengths) or a LongTensor (B, S).
        tokenizer: encodes text prompts and decodes outputs (``encode``/``decode``); needed for text and stop.
        max_new_tokens: tokens generated per row (fewer when ``stop`` appears).
        temperature: 0 is greedy; top_k / top_p: truncated sampling (see ``sample_next``).
        seed: seeds a private generator: the same seed gives the same text (global RNG untouched).
        stop: a row ends when its generated text contains this string; the string and what follows are cut.
        on_text: streaming callback ``on_text(row, new_text)`` called as text appears (needs a tokenizer).
        compile: run the single-token step under ``torch.compile(fullgraph=True)`` with static shapes: True
            for inductor (a CUDA graph, ``mode="reduce-overhead"``, on CUDA), or a torch.compile backend. The
            first call per model and batch size compiles; later calls reuse it. Same tokens as eager up to the
            rounding of the compiled kernels. Models whose state grows (the Transformer's KV cache) decode
            eagerly, and so, with a warning, do models whose step does not compile (``nn.LSTM``).

    Returns:
        the continuation only: a str for a str prompt, a list of str for a list of str, otherwise a list of
        lists of new token ids (one per row).

    Host syncs: none per token (the tokens are read once at the end) unless ``stop`` or ``on_text`` needs
    the text as it grows: then one per token.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if stop is not None and (not isinstance(stop, str) or stop == ""):
        raise ValueError(f"stop must be a non-empty string (an empty one ends every row at once), got {stop!r}")
    if stop is not None and tokenizer is None:
        raise ValueError("a stop string needs a tokenizer")
    device = next(model.parameters()).device
    ids, lens_t, lens, kind = _encode_prompts(prompt, tokenizer, device)  # (B, L), (B,) or None
    B, L = ids.shape
    common = min(lens)
    if max_new_tokens == 0:
        return _results([[] for _ in range(B)], kind, tokenizer, stop)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    texts = tokenizer is not None and (stop is not None or on_text is not None)  # the host follows the text
    step, cuda_graph = _decode_step, False
    was_training = model.training
    model.eval()
    try:
        seq = F.pad(ids, (0, max_new_tokens))  # (B, T): the token fed at each position, prompt or sampled
        T = L + max_new_tokens  # rows end at lens[b] + max_new_tokens; the longest at T
        logits, state = model(ids[:, :common].contiguous(), return_state=True, logits_to_keep=1)  # (B, 1, V)
        last = logits[:, -1]  # (B, V)
        out: list[list[int]] = [[] for _ in range(B)]
        done, emitted, shapes = [False] * B, [0] * B, _shapes(state)
        for pos in range(common, T):  # the position each row feeds next
            nxt = sample_next(last, temperature, top_k, top_p, generator)  # (B,), drawn for every row
            tok = nxt if pos >= L else torch.where(pos < lens_t, seq[:, pos], nxt)  # prompt rows teacher-force
            seq[:, pos] = tok
            if texts:  # the one host read per token
                for b, t in enumerate(tok.tolist()):
                    if pos >= lens[b] and not done[b] and len(out[b]) < max_new_tokens:
                        out[b].append(t)
                        done[b] = _update_text(b, out[b], tokenizer, stop, emitted, on_text)
                if all(done[b] or (pos >= lens[b] and len(out[b]) >= max_new_tokens) for b in range(B)):
                    break
            if pos + 1 == T:
                break
            try:
                last, state = _run_step(step, cuda_graph, model, tok[:, None], state)
            except Exception as e:  # noqa: BLE001 - a model the compiler cannot take decodes eagerly
                if step is _decode_step:
                    raise
                _COMPILE_FAILURES[failure_key] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
                warnings.warn(f"generate(compile={compile!r}): the decode step did not compile, decoding eagerly "
                              f"({_COMPILE_FAILURES[failure_key]})", stacklevel=3)
                step, cuda_graph = _decode_step, False
                last, state = step(model, tok[:, None], state)
            if compile and pos == common and _shapes(state) == shapes:  # a fixed-size state: static shapes
                failure_key = (compile, device.type, type(model), tuple(shapes))
                if failure_key in _COMPILE_FAILURES:
                    warnings.warn(f"generate(compile={compile!r}): decoding eagerly, the decode step of this model "
                                  f"did not compile before ({_COMPILE_FAILURES[failure_key]})", stacklevel=3)
                else:
                    step, cuda_graph = compiled_decode_step(compile, device)
        if not texts:  # the one host read of the whole call
            rows = seq[:, common:].tolist()
            out = [row[n - common:n - common + max_new_tokens] for row, n in zip(rows, lens)]
    finally:
        model.train(was_training)
    if on_text is not None and tokenizer is not None:
        for b in range(B):
            text = tokenizer.decode(out[b])
            end = text.index(stop) if stop is not None and stop in text else len(text)
            if end > emitted[b]:
                on_text(b, text[emitted[b]:end])
    return _results(out, kind, tokenizer, stop)


def _results(out: list[list[int]], kind: str, tokenizer, stop: Optional[str]):
    """The return value of ``generate`` from the new ids of each row."""
    if kind == "ids":
        return out
    results = []
    for ids in out:
        text = tokenizer.decode(ids)
        if stop is not None and stop in text:
            text = text[:text.index(stop)]
        results.append(text)
    return results[0] if kind == "str" else results


def _update_text(b, ids, tokenizer, stop, emitted, on_text) -> bool:
    """Decode row b's output so far, stream what is new (holding back a possible partial character or the
    start of the stop string), and return True when the stop string has appeared."""
    text = tokenizer.decode(ids)
    hit = stop is not None and stop in text
    if hit:
        safe = text.index(stop)
    else:
        safe = len(text.rstrip("\ufffd"))
        if stop:
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:k]):
                    safe -= k
                    break
    if on_text is not None and safe > emitted[b]:
        on_text(b, text[emitted[b]:safe])
        emitted[b] = safe
    return hit


__all__ = ["generate", "sample_next", "compiled_decode_step"]
