"""Which implementation computes each cell: the backend tables, the run-time choice passed down from a model
(``Backends``, never saved with a config), what "auto" means on a device, and the dtype of states.

mLSTM: "recurrent" (the step loop, the specification), "parallel" (quadratic), "chunkwise" (linear; the
CPU default) and "triton" (CUDA). sLSTM: "recurrent" (autograd through the loop), "fused" (hand-written
backward; the CPU default) and "triton". "auto" takes Triton on a CUDA device when triton imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

MLSTM_BACKENDS = ("auto", "recurrent", "parallel", "chunkwise", "triton")
SLSTM_BACKENDS = ("auto", "recurrent", "fused", "triton")
_TABLES = {"mlstm": MLSTM_BACKENDS, "slstm": SLSTM_BACKENDS}
_CPU_DEFAULT = {"mlstm": "chunkwise", "slstm": "fused"}


def triton_available(device: torch.device) -> bool:
    """True when the Triton kernels can run on ``device`` (a CUDA device with triton importable)."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(cell: str, backend: str, device: torch.device) -> str:
    """The backend that computes ``cell`` ("mlstm" or "slstm") on ``device``: "auto" becomes Triton on CUDA
    and the plain-PyTorch default elsewhere; an unknown name is a ValueError listing the known ones."""
    table = _TABLES[cell]
    if backend not in table:
        raise ValueError(f"{cell}: unknown backend {backend!r}; choose one of {table}")
    if backend == "auto":
        return "triton" if triton_available(device) else _CPU_DEFAULT[cell]
    return backend


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrent states and gate maths run in float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Backends:
    """The kernels a model's layers use, chosen at run time (``model.set_backends``).

    mlstm: "auto" | "chunkwise" | "parallel" | "recurrent" | "triton"
    slstm: "auto" | "fused" | "recurrent" | "triton"
    chunk_size: chunk length of the chunkwise mLSTM (None: each backend's default).
    """

    mlstm: str = "auto"
    slstm: str = "auto"
    chunk_size: Optional[int] = None

    def __post_init__(self):
        if self.mlstm not in MLSTM_BACKENDS:
            raise ValueError(f"unknown mLSTM backend {self.mlstm!r}; choose one of {MLSTM_BACKENDS}")
        if self.slstm not in SLSTM_BACKENDS:
            raise ValueError(f"unknown sLSTM backend {self.slstm!r}; choose one of {SLSTM_BACKENDS}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")

    def resolve(self, device: torch.device) -> "Backends":
        """The same choice with "auto" replaced by the backend it means on ``device`` (a model resolves once
        per call, its layers then use the names as they are)."""
        mlstm, slstm = resolve_backend("mlstm", self.mlstm, device), resolve_backend("slstm", self.slstm, device)
        if mlstm == self.mlstm and slstm == self.slstm:
            return self
        return Backends(mlstm, slstm, self.chunk_size)


__all__ = ["Backends", "MLSTM_BACKENDS", "SLSTM_BACKENDS", "resolve_backend", "state_dtype", "triton_available"]
