"""Where a model runs and in which dtype: one reading of the ``--device`` / ``device=`` and ``--dtype`` /
``dtype=`` values every command and loader takes, each mistake a one-line UserError naming what is allowed."""

from __future__ import annotations

import re
from typing import Optional, Union

import torch

from .errors import UserError

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}


def resolve_device(device: Union[str, torch.device, None] = "auto", local_rank: int = 0) -> torch.device:
    """"auto" (or None) -> this process's GPU when there is one, else the CPU; "cuda" under torchrun -> the
    process's own GPU (``local_rank``); otherwise the named cpu / cuda / cuda:N, checked against the machine."""
    if isinstance(device, torch.device):
        device = str(device)
    if device is None or device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and local_rank:
        device = f"cuda:{local_rank}"
    if not isinstance(device, str) or not DEVICE_RE.match(device):
        raise UserError(f"device {device!r} is not supported: choose auto, cpu, cuda or cuda:N")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device}: CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UserError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return resolved


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    """None / "auto" (keep what there is), a floating torch.dtype, or a name ("bfloat16", "bf16", "float32", ...)
    -> torch.dtype or None."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        return None
    if name not in _DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported: choose float32, bfloat16, float16 or float64")
    return _DTYPES[name]


def autocast_dtype(dtype: str, device: torch.device) -> Optional[torch.dtype]:
    """The training autocast dtype of ``--dtype``: "auto" is bfloat16 on CUDA and none (float32) elsewhere;
    "float32" none; "bfloat16" bfloat16."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if dtype in ("float32", "bfloat16"):
        return None if dtype == "float32" else torch.bfloat16
    raise UserError(f"--dtype {dtype!r}: choose auto, float32 or bfloat16")


__all__ = ["DEVICE_RE", "resolve_device", "resolve_dtype", "autocast_dtype"]
