"""Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology"), the paper's associative-memory test.

A sequence of ``context`` tokens over a vocabulary of ``vocab_size`` ids (0 is the filler token):

    k_1 v_1 k_2 v_2 ... k_N v_N | 0 0 k_a v_a 0 0 0 k_b v_b 0 ...     (B, context)
    keys are drawn without repetition from [1, V/2), values (with repetition) from [V/2, V)

After the N key-value pairs, the rest of the context is cut into two-token slots; N of them (chosen at
random) hold a query: every key once, in random order, followed by its value. The target at a query key's
position is its value (the model must predict it from memory); every other target is IGNORE. Accuracy is
over the N queried values of each sequence; chance is 2 / V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formal import IGNORE


@dataclass(frozen=True)
class MQARTask:
    """MQAR with ``num_pairs`` key-value pairs in a context of ``context`` tokens over ``vocab_size`` ids."""

    context: int = 64
    num_pairs: int = 8
    vocab_size: int = 64

    def __post_init__(self):
        for name in ("context", "num_pairs", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MQARTask: {name} must be a positive integer, got {value!r}")
        if self.context < 4 * self.num_pairs:
            raise ValueError(f"MQARTask: context={self.context} must be at least 4 * num_pairs={4 * self.num_pairs} "
                             "(N pairs, then N two-token query slots)")
        if self.vocab_size // 2 - 1 < self.num_pairs:
            raise ValueError(f"MQARTask: vocab_size={self.vocab_size} leaves {self.vocab_size // 2 - 1} keys in "
                             f"[1, V/2); num_pairs={self.num_pairs} distinct keys are needed")

    @property
    def name(self) -> str:
        return "mqar"

    @property
    def num_classes(self) -> int:
        return self.vocab_size

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab_size - self.vocab_size // 2)

    @property
    def key_range(self) -> tuple[int, int]:
        return 1, self.vocab_size // 2

    @property
    def value_range(self) -> tuple[int, int]:
        return self.vocab_size // 2, self.vocab_size

    def sample(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (tokens, targets), each (B, context) int64; targets are IGNORE except at the query keys."""
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"MQARTask: the batch size must be a positive integer, got {batch!r}")
        B, T, N = batch, self.context, self.num_pairs
        k_lo, k_hi = self.key_range
        v_lo, v_hi = self.value_range
        keys = torch.rand(B, k_hi - k_lo, generator=gen).argsort(1)[:, :N] + k_lo  # (B, N) distinct
        values = torch.randint(v_lo, v_hi, (B, N), generator=gen)  # (B, N)
        tokens = torch.zeros(B, T, dtype=torch.long)
        targets = torch.full((B, T), IGNORE, dtype=torch.long)
        tokens[:, 0 : 2 * N : 2] = keys
        tokens[:, 1 : 2 * N : 2] = values
        num_slots = (T - 2 * N) // 2
        slots = torch.rand(B, num_slots, generator=gen).argsort(1)[:, :N]  # (B, N) distinct slots
        order = torch.rand(B, N, generator=gen).argsort(1)  # (B, N) which pair each slot asks about
        pos = 2 * N + 2 * slots  # (B, N) query key positions
        rows = torch.arange(B)[:, None]
        q_keys, q_values = keys.gather(1, order), values.gather(1, order)
        tokens[rows, pos] = q_keys
        tokens[rows, pos + 1] = q_values
        targets[rows, pos] = q_values
        return tokens, targets


__all__ = ["MQARTask"]
