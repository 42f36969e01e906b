"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr`` at ``max_steps``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class CosineSchedule:
    lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)

    def apply(self, optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return asdict(self)


__all__ = ["CosineSchedule"]
