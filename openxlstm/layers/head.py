"""What every language model of the package (xLSTM and the baselines) does at its two ends: check the
input ids without reading them on the host, and turn the last hidden states into logits or a loss.

``model(input_ids)`` returns logits; ``model(input_ids, labels=labels)`` returns an ``LMOutput`` whose
``loss`` comes from the fused output projection + cross-entropy (``ops.cross_entropy``), so that training
never materializes (B*S, V) float32 logits. ``labels[:, t]`` is the target of position t (the next token,
already shifted), -100 where nothing is scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..ops.cross_entropy import linear_cross_entropy


@dataclass
class LMOutput:
    """loss: mean next-token cross-entropy over the scored positions (float32 scalar); logits (B, S, V) when
    ``return_logits=True``; state when ``return_state=True``; num_tokens: how many positions were scored."""

    loss: torch.Tensor
    logits: Optional[torch.Tensor] = None
    state: Any = None
    num_tokens: Optional[torch.Tensor] = None


def check_input_ids(name: str, input_ids, vocab_size: int) -> None:
    """Type and shape errors at once; the id range is asserted on the device (no host sync, compile-safe)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"{name}: input_ids must be an integer tensor (B, S), got {got}")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"{name}: input_ids must have shape (B, S) with B, S >= 1, got {tuple(input_ids.shape)}")
    torch._assert_async(((input_ids >= 0) & (input_ids < vocab_size)).all(),
                        f"{name}: token ids must lie in [0, {vocab_size})")


def lm_outputs(hidden: torch.Tensor, lm_head: nn.Linear, labels: Optional[torch.Tensor], state,
               return_state: bool, return_logits: bool, logits_to_keep: int = 0):
    """The model's return value from the final hidden states (B, S, E).

    Without labels: logits (B, S, V) (only the last ``logits_to_keep`` positions when > 0: generation needs
    the last one), or (logits, state). With labels (B, S): an ``LMOutput``.
    """
    if labels is None:
        logits = lm_head(hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden)
        return (logits, state) if return_state else logits
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have the shape of input_ids {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    loss = linear_cross_entropy(hidden, lm_head.weight, labels)
    return LMOutput(loss=loss, logits=lm_head(hidden) if return_logits else None,
                    state=state if return_state else None, num_tokens=(labels != -100).sum())


__all__ = ["LMOutput", "check_input_ids", "lm_outputs"]
