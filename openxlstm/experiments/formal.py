"""Formal-language tasks with exact labels (the paper's state-tracking benchmark, after Delétang et al. 2023).

Classification tasks (parity, even pairs, cycle navigation, modular arithmetic, majority) are answered at
the last input token, sequence tasks (bucket sort, repetition) after a separator, without teacher forcing:

    classification  tokens  = x_1 .. x_n                                       (B, n)
                    targets = IGNORE * (n - 1)  y                              (B, n)
    sequence        tokens  = x_1 .. x_n   SEP  BLANK * (n - 1)                (B, 2n)
                    targets = IGNORE * n   y_1 .. y_n                          (B, 2n)

IGNORE = -100 marks the positions that are not scored. With ``prefix_labels=True`` (dense supervision for
training, as a recurrent state tracker is trained online) a classification task labels every position t
with the label of the prefix x_1 .. x_t (IGNORE where it is undefined: a modular expression ending in an
operator, a prefix whose majority is tied). Input symbols are ids 0 .. num_symbols-1, then SEP and BLANK;
output classes are ids 0 .. num_classes-1 of the model's logits (its vocabulary is ``vocab_size``).

Labels are computed vectorized here; ``tests/test_experiments.py`` checks each against a brute-force
Python computation (automata, ``eval``, ``sorted``, ``Counter``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

IGNORE = -100  # the target of positions that are not scored (torch's cross_entropy ignore_index)


@dataclass(frozen=True)
class FormalTask:
    """A formal-language task. ``sample(batch, n, gen)`` -> (tokens, targets), each (B, n + m) int64.

    ``_draw(batch, n, gen)`` draws inputs x (B, n) (or the outputs of a sequence task too); a classification
    task's ``_label(x (B, t)) -> (B,)`` labels any string (IGNORE where undefined).
    """

    name: str
    num_symbols: int  # input alphabet size
    num_classes: int  # output alphabet size (chance accuracy is 1 / num_classes)
    _draw: Callable
    _label: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # None: a sequence task
    description: str = ""

    @property
    def sequence_output(self) -> bool:
        return self._label is None

    @property
    def sep(self) -> int:
        """The separator after a sequence task's input."""
        return self.num_symbols

    @property
    def blank(self) -> int:
        return self.num_symbols + 1

    @property
    def vocab_size(self) -> int:
        return max(self.num_symbols + 2, self.num_classes)

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes

    def label(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, t) input strings -> (B,) labels (classification tasks only)."""
        if self._label is None:
            raise ValueError(f"{self.name} is a sequence task: its outputs come with sample()")
        return self._label(x)

    def sample(self, batch: int, n: int, gen: torch.Generator, prefix_labels: bool = False):
        """A batch of ``batch`` strings of input length ``n`` -> (tokens, targets), each (B, n) for classification
        tasks (the label at the last position; every prefix's with ``prefix_labels``), (B, 2n) for sequence tasks."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{self.name}: the input length must be a positive integer, got {n!r}")
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"{self.name}: the batch size must be a positive integer, got {batch!r}")
        if self._label is None:  # sequence task: x SEP BLANK..., scored after SEP
            x, y = self._draw(batch, n, gen)  # (B, n), (B, n)
            tail = torch.full_like(y, self.blank)
            tail[:, 0] = self.sep
            return torch.cat([x, tail], dim=1), torch.cat([torch.full_like(x, IGNORE), y], dim=1)
        x = self._draw(batch, n, gen)  # (B, n)
        if prefix_labels:
            targets = torch.stack([self._label(x[:, : t + 1]) for t in range(x.shape[1])], dim=1)  # (B, n)
        else:
            targets = torch.full_like(x, IGNORE)
            targets[:, -1] = self._label(x)
        return x, targets

    def scaled_accuracy(self, accuracy: float) -> float:
        """(acc - chance) / (1 - chance): 0 is chance, 1 is perfect (negative: worse than chance)."""
        return (accuracy - self.chance) / (1.0 - self.chance)


def _randint(high: int, size: tuple, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, high, size, generator=gen, dtype=torch.long)


def _uniform(num_symbols: int):
    return lambda batch, n, gen: _randint(num_symbols, (batch, n), gen)


# ---------------------------------------------------------------------------------------------------------
# regular languages (labels of x: (B, t) -> (B,))
# ---------------------------------------------------------------------------------------------------------
def _parity(x):
    """Symbols {a=0, b=1}: the number of b's mod 2."""
    return x.sum(1) % 2


def _even_pairs(x):
    """Symbols {a, b}: 1 if the number of 'ab' and 'ba' substrings is even (⇔ first == last symbol)."""
    changes = (x[:, 1:] != x[:, :-1]).sum(1)
    return 1 - changes % 2


CYCLE = 5


def _cycle_navigation(x):
    """Moves {0: stay, 1: +1, 2: -1} on a cycle of length 5 starting at 0: the final position."""
    step = torch.tensor([0, 1, -1])[x]
    return step.sum(1) % CYCLE


MOD = 5
OPS = ("+", "-", "*")


def _draw_expression(batch, n, gen):
    """d op d op ... d with digits 0..4 (ids 0..4) and ops + - * (ids 5, 6, 7): n tokens, n - 1 for an even n."""
    n = n if n % 2 else n - 1
    x = _randint(MOD, (batch, n), gen)
    x[:, 1::2] = _randint(3, (batch, n // 2), gen) + MOD
    return x


def _modular_arithmetic(x):
    """The expression's value with the usual precedence (* before + and -) mod 5; IGNORE if x ends in an op."""
    batch, t = x.shape
    if t % 2 == 0:
        return torch.full((batch,), IGNORE, dtype=torch.long)
    digits, ops = x[:, 0::2], x[:, 1::2] - MOD
    # left to right: total (sum of finished terms) and term (the running product with its sign)
    total = torch.zeros(batch, dtype=torch.long)
    term = digits[:, 0].clone()
    for j in range(ops.shape[1]):
        d, op = digits[:, j + 1], ops[:, j]
        is_mul = op == 2
        total = torch.where(is_mul, total, (total + term) % MOD)
        term = torch.where(is_mul, (term * d) % MOD, torch.where(op == 0, d, (-d) % MOD))
    return (total + term) % MOD


# ---------------------------------------------------------------------------------------------------------
# counter / context-sensitive languages
# ---------------------------------------------------------------------------------------------------------
MAJORITY_SYMBOLS = 5


def _majority(x):
    """Symbols 0..4: the most frequent symbol; IGNORE on a tie."""
    counts = torch.nn.functional.one_hot(x, MAJORITY_SYMBOLS).sum(1)  # (B, 5)
    top = counts.max(1).values
    unique = (counts == top[:, None]).sum(1) == 1
    return torch.where(unique, counts.argmax(1), torch.full_like(top, IGNORE))


def _draw_majority(batch, n, gen):
    """Strings over 0..4 whose most frequent symbol is unique (tied strings are redrawn)."""
    out = torch.empty(batch, n, dtype=torch.long)
    filled = 0
    while filled < batch:
        x = _randint(MAJORITY_SYMBOLS, (2 * (batch - filled) + 8, n), gen)
        keep = x[_majority(x) != IGNORE][: batch - filled]
        out[filled : filled + len(keep)] = keep
        filled += len(keep)
    return out


SORT_SYMBOLS = 5


def _bucket_sort(batch, n, gen):
    """Symbols 0..4; output: the string sorted ascending (n outputs)."""
    x = _randint(SORT_SYMBOLS, (batch, n), gen)
    return x, x.sort(dim=1).values


REPEAT_SYMBOLS = 4


def _repetition(batch, n, gen):
    """Symbols 0..3; output: the input string repeated (a copy, n outputs)."""
    x = _randint(REPEAT_SYMBOLS, (batch, n), gen)
    return x, x.clone()


TASKS: dict[str, FormalTask] = {
    t.name: t
    for t in (
        FormalTask("parity", 2, 2, _uniform(2), _parity, "parity of the number of b's (regular)"),
        FormalTask("even_pairs", 2, 2, _uniform(2), _even_pairs, "even number of ab/ba substrings (regular)"),
        FormalTask("cycle_nav", 3, CYCLE, _uniform(3), _cycle_navigation, "position on a 5-cycle after stay/+1/-1 moves (regular)"),
        FormalTask("mod_arith", MOD + 3, MOD, _draw_expression, _modular_arithmetic, "digits 0-4 with + - *, precedence, mod 5 (regular)"),
        FormalTask("majority", MAJORITY_SYMBOLS, MAJORITY_SYMBOLS, _draw_majority, _majority, "most frequent of 5 symbols (counter)"),
        FormalTask("bucket_sort", SORT_SYMBOLS, SORT_SYMBOLS, _bucket_sort, None, "sort a string over 5 symbols (context-sensitive)"),
        FormalTask("repetition", REPEAT_SYMBOLS, REPEAT_SYMBOLS, _repetition, None, "copy the input string (context-sensitive)"),
    )
}


def get_task(name: str) -> FormalTask:
    """The formal-language task called ``name`` (see ``TASKS``)."""
    if name not in TASKS:
        raise ValueError(f"unknown formal-language task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


__all__ = ["IGNORE", "FormalTask", "TASKS", "get_task", "OPS", "MOD", "CYCLE"]
