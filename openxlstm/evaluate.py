"""Validation loss and perplexity at several context lengths (the paper's length-extrapolation experiment):
the same held-out tokens cut into non-overlapping windows of each length."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from .train.engine import evaluate_model
from .train.loop import bits_per_byte, lm_batches


def evaluate_contexts(model, tokens: np.ndarray, contexts: Sequence[int], max_tokens: int = 65536,
                      batch_tokens: int = 16384, device="cpu", bytes_per_token: Optional[float] = None,
                      doc_starts: Optional[np.ndarray] = None) -> list[dict]:
    """One row per context length C: {"context", "tokens", "loss", "ppl", "bpb"}; each row scores up to
    ``max_tokens`` target tokens in windows of C (batches of about ``batch_tokens`` tokens). With the document
    starts of packed tokens (``doc_starts``), every document in a window starts from a fresh state and no
    target crosses a boundary, as in packed training; a window's context is then the part of it in the
    token's own document."""
    rows = []
    for context in contexts:
        batches = lm_batches(tokens, context, max_tokens, max(1, batch_tokens // context), doc_starts=doc_starts)
        result = evaluate_model(model, batches, device)
        loss = result.loss
        rows.append({"context": context, "tokens": result.tokens, "loss": loss, "ppl": math.exp(min(loss, 700.0)),
                     "bpb": bits_per_byte(loss, bytes_per_token)})
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table of evaluate_contexts rows."""
    lines = [f"{'context':>8} {'tokens':>9} {'loss':>8} {'ppl':>10} {'bits/byte':>10}"]
    for r in rows:
        bpb = "-" if r["bpb"] is None else f"{r['bpb']:.4f}"
        lines.append(f"{r['context']:>8} {r['tokens']:>9,} {r['loss']:>8.4f} {r['ppl']:>10.3f} {bpb:>10}")
    return "\n".join(lines)


__all__ = ["evaluate_contexts", "format_table"]
