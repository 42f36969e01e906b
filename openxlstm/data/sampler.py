"""Deterministic batches: the batch of step t depends only on (seed, t), so a resumed run draws exactly the
batches an uninterrupted run would, and each of W processes takes its own contiguous slice of the global
batch (like DistributedSampler), so W processes see the same global batch as one."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import UserError
from .packing import window_batch


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens from a flat token array.

    Args:
        num_tokens: length of the token array.
        seq_len: S, the training context.
        global_batch: sequences per optimizer step over all processes.
        seed: the run's seed.
        rank, world_size: this process's slice of the global batch.
    """

    def __init__(self, num_tokens: int, seq_len: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_tokens < seq_len + 1:
            raise UserError(f"sequence length {seq_len} is larger than the training data ({num_tokens:,} tokens); "
                            f"use a smaller --seq-len or more data")
        if global_batch % world_size:
            raise UserError(f"the batch size {global_batch} must be divisible by the number of processes {world_size}")
        self.num_tokens, self.seq_len, self.global_batch = num_tokens, seq_len, global_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def starts(self, step: int) -> np.ndarray:
        """(global_batch,) window starts of step ``step``."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.num_tokens - self.seq_len, size=self.global_batch)

    def batch(self, tokens: np.ndarray, step: int, doc_starts: Optional[np.ndarray] = None) -> tuple:
        """This process's (x, y), each (global_batch / world_size, S) int64: y is x shifted by one token; with
        the document starts of packed tokens also cu_seqlens, and y -100 where the next token opens another
        document (``packing.window_batch``)."""
        per = self.global_batch // self.world_size
        starts = self.starts(step)[self.rank * per:(self.rank + 1) * per]
        return window_batch(tokens, starts, self.seq_len, doc_starts)


def eval_windows(num_tokens: int, seq_len: int, max_tokens: int) -> np.ndarray:
    """Starts of non-overlapping windows of ``seq_len + 1`` tokens covering at most ``max_tokens`` targets,
    spread evenly over the array."""
    if num_tokens < seq_len + 1:
        raise UserError(f"sequence length {seq_len} is larger than the evaluation data ({num_tokens:,} tokens)")
    available = (num_tokens - 1) // seq_len
    count = max(1, min(available, max_tokens // seq_len))
    slots = np.linspace(0, available - 1, count).round().astype(np.int64)
    return np.unique(slots) * seq_len


__all__ = ["BatchSampler", "eval_windows"]
