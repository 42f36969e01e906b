"""Text generation with a carried recurrent state: one chunkwise pass over the prompt, then one token per
step that feeds only the new token and the state (constant time and memory per token for xLSTM and LSTM;
the Transformer baseline's state is its KV cache).

Prompts of different lengths in a batch are exact, without padding: the common prefix is prefilled in one
pass, then each row keeps feeding its own prompt tokens until it runs out and starts sampling.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from .errors import UserError

Prompt = Union[str, Sequence[str], Sequence[int], torch.Tensor]


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy; top_k keeps the k likeliest tokens; top_p
    keeps the smallest set whose probability reaches p (nucleus sampling)."""
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
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _encode_prompts(prompt: Prompt, tokenizer) -> tuple[list[list[int]], str]:
    """(list of per-row token lists, kind) with kind "str", "strs" or "ids"."""
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str)):
        if tokenizer is None:
            raise UserError("text prompts need a tokenizer (this model was trained on token ids only)")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows = [[int(t) for t in tokenizer.encode(text)] for text in texts]
        return rows, "str" if isinstance(prompt, str) else "strs"
    if isinstance(prompt, torch.Tensor):
        ids = prompt.unsqueeze(0) if prompt.dim() == 1 else prompt
        return ids.tolist(), "ids"
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (list, tuple)):
        return [list(map(int, row)) for row in prompt], "ids"
    return [list(map(int, prompt))], "ids"


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

    Returns:
        the continuation only: a str for a str prompt, a list of str for a list of str, otherwise a list of
        lists of new token ids (one per row).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if stop is not None and tokenizer is None:
        raise ValueError("a stop string needs a tokenizer")
    rows, kind = _encode_prompts(prompt, tokenizer)
    if not rows or any(len(r) == 0 for r in rows):
        raise UserError("every prompt must hold at least one token (an empty prompt has nothing to continue)")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    was_training = model.training
    model.eval()
    B, lens = len(rows), [len(r) for r in rows]
    common = min(lens)
    prefix = torch.tensor([r[:common] for r in rows], dtype=torch.long, device=device)  # (B, common)
    logits, state = model(prefix, return_state=True)
    last = logits[:, -1]  # (B, V)
    out: list[list[int]] = [[] for _ in range(B)]
    texts, emitted, done = [""] * B, [0] * B, [False] * B
    pos = common  # the next position each row feeds
    while True:
        nxt = sample_next(last, temperature, top_k, top_p, generator)  # (B,)
        feed = []
        for b in range(B):
            if pos < lens[b]:
                feed.append(rows[b][pos])  # still inside this row's prompt: teacher-force it
                continue
            tok = int(nxt[b])
            if not done[b] and len(out[b]) < max_new_tokens:
                out[b].append(tok)
                if tokenizer is not None and (stop is not None or on_text is not None):
                    done[b] = _update_text(b, out[b], tokenizer, stop, texts, emitted, on_text)
            feed.append(tok)
        finished = all(done[b] or (pos >= lens[b] and len(out[b]) >= max_new_tokens) for b in range(B))
        if finished:
            break
        ids = torch.tensor(feed, dtype=torch.long, device=device)[:, None]  # (B, 1)
        logits, state = model(ids, state=state, return_state=True)
        last = logits[:, -1]
        pos += 1
    model.train(was_training)
    if on_text is not None and tokenizer is not None:
        for b in range(B):
            text = tokenizer.decode(out[b])
            end = text.index(stop) if stop is not None and stop in text else len(text)
            if end > emitted[b]:
                on_text(b, text[emitted[b]:end])
    if kind == "ids":
        return out
    results = []
    for b in range(B):
        text = tokenizer.decode(out[b])
        if stop is not None and stop in text:
            text = text[:text.index(stop)]
        results.append(text)
    return results[0] if kind == "str" else results


def _update_text(b, ids, tokenizer, stop, texts, emitted, on_text) -> bool:
    """Decode row b's output so far, stream what is new (holding back a possible partial character or the
    start of the stop string), and return True when the stop string has appeared."""
    text = tokenizer.decode(ids)
    texts[b] = text
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


__all__ = ["generate", "sample_next"]
