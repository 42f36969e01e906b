"""Evaluation of a language model on held-out tokens: the mean loss over scored tokens (the engine's
``evaluate`` and ``evaluate_model`` both sum through ``eval_sums``), bits per byte, and the loss at several
context lengths (the paper's length-extrapolation experiment: the same held-out tokens cut into
non-overlapping windows of each length)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .data import eval_windows
from .data.packing import window_batch
from .ops.cross_entropy import IGNORE_INDEX


@dataclass
class EvalResult:
    loss: float  # mean over the scored tokens (nats)
    tokens: int  # scored tokens, all processes
    accuracy: Optional[float] = None  # fraction of scored positions whose arg-max logit is the label


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def eval_sums(forward, batches: Sequence, device, dtype, accuracy: bool, rounds: int) -> list[float]:
    """[loss summed over scored tokens, scored tokens, correct] over ``batches``; ``rounds`` > len(batches)
    adds forward passes whose results are dropped (FSDP: every process must gather parameters as often)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for j in range(rounds):
        if j >= len(batches):
            ids = batches[0][0] if batches else torch.zeros(1, 1, dtype=torch.int64)
            with autocast(device, dtype):
                forward(ids[:1].to(device))
            continue
        x, y, *cu = (t.to(device, non_blocking=True) for t in batches[j])  # (b, S) each, packed: cu_seqlens
        with autocast(device, dtype):
            out = forward(x, labels=y, return_logits=accuracy, **({"cu_seqlens": cu[0]} if cu else {}))
        loss_sum += out.loss.double() * out.num_tokens
        count += out.num_tokens
        if accuracy:
            correct += ((out.logits.argmax(-1) == y) & (y != IGNORE_INDEX)).sum()
    return [float(loss_sum), float(count), float(correct)]


def eval_result(sums: list[float], accuracy: bool) -> EvalResult:
    loss_sum, count, correct = sums
    return EvalResult(loss=loss_sum / max(count, 1.0), tokens=int(count),
                      accuracy=correct / max(count, 1.0) if accuracy else None)


def evaluate_model(model: nn.Module, batches: Sequence, device="cpu", dtype: Optional[torch.dtype] = None,
                   accuracy: bool = False) -> EvalResult:
    """One process, no engine: the mean loss of a model over (input_ids, labels) batches (see Engine.evaluate)."""
    batches = list(batches)
    was_training = model.training
    model.eval()
    try:
        sums = eval_sums(model, batches, torch.device(device), dtype, accuracy, len(batches))
    finally:
        model.train(was_training)
    return eval_result(sums, accuracy)


def lm_batches(tokens: np.ndarray, seq_len: int, max_tokens: int, batch_size: int, rank: int = 0, world_size: int = 1,
               doc_starts: Optional[np.ndarray] = None) -> list[tuple]:
    """Process ``rank``'s share of the evaluation windows of ``tokens`` (non-overlapping, at most ``max_tokens``
    targets, spread evenly), as (input_ids, labels) batches, each (b, S): labels are the next tokens; with the
    document starts of packed tokens (input_ids, labels, cu_seqlens) (``data.packing.window_batch``)."""
    starts = eval_windows(len(tokens), seq_len, max_tokens)[rank::world_size]
    return [window_batch(tokens, starts[i:i + batch_size], seq_len, doc_starts)
            for i in range(0, len(starts), batch_size)]


def bits_per_byte(loss: float, bytes_per_token: Optional[float]) -> Optional[float]:
    """A loss in nats per token as bits per byte (None without a bytes-per-token figure)."""
    return None if not bytes_per_token else loss / math.log(2) / bytes_per_token




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


__all__ = ["EvalResult", "evaluate_model", "eval_sums", "eval_result", "autocast", "lm_batches", "bits_per_byte",
           "evaluate_contexts", "format_table"]
