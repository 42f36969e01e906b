"""Run-time kernel choices, passed from the model down to the layers (never saved with a config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Backends:
    """Which implementation each cell uses. "auto": Triton on CUDA, plain PyTorch elsewhere.

    mlstm: "auto" | "chunkwise" | "parallel" | "recurrent" | "triton"
    slstm: "auto" | "fused" | "recurrent" | "triton"
    chunk_size: chunk length of the chunkwise mLSTM (None: each backend's default).
    """

    mlstm: str = "auto"
    slstm: str = "auto"
    chunk_size: Optional[int] = None

    def __post_init__(self):
        from ..ops.mlstm import BACKENDS as M
        from ..ops.slstm import BACKENDS as S

        if self.mlstm not in M:
            raise ValueError(f"unknown mLSTM backend {self.mlstm!r}; choose one of {M}")
        if self.slstm not in S:
            raise ValueError(f"unknown sLSTM backend {self.slstm!r}; choose one of {S}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")
