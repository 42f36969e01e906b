"""Process-group set-up for ``torchrun``: gloo on CPU, NCCL on GPU; single-process runs skip all of it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# what torchrun (or any launcher that sets up env:// rendezvous) puts in each process's environment
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when this process was started by torchrun (its rendezvous variables are set)."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def init_distributed(device: str, always: bool = False) -> DistInfo:
    """Join the process group that torchrun describes in the environment.

    Without ``always`` a group is formed only for WORLD_SIZE > 1; with it (FSDP), also for one torchrun
    process, since sharding needs a device mesh even of size 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (always and launched_by_torchrun()):
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(values: list[float], device, op) -> list[float]:
    if not is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a list of floats over processes (identity in a single process)."""
    return _all_reduce(values, device, dist.ReduceOp.SUM)


def all_reduce_max(values: list[float], device) -> list[float]:
    """Elementwise maximum of a list of floats over processes (identity in a single process)."""
    return _all_reduce(values, device, dist.ReduceOp.MAX)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group; the barrier first lets every process finish its last collective (gloo aborts
    a process whose peer tears its connections down mid-operation)."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


__all__ = ["DistInfo", "TORCHRUN_ENV", "launched_by_torchrun", "init_distributed", "is_initialized", "all_reduce_sum",
           "all_reduce_max", "barrier", "shutdown"]
