"""Parallelism applied to a model from outside it (torchtitan style): the models know nothing of DDP or FSDP.

    DDP   torchrun without --fsdp: every process holds the whole model, gradients are averaged.
    FSDP2 torchrun with --fsdp: ``fully_shard`` on each block, then on the root model (the embedding, the
          final norm and the head form the root's group). Each process keeps 1/W of every parameter, of
          its gradient and of its optimizer state; a block's parameters are gathered just before its
          forward (and again before its backward) and freed after.

The blocks are the model's ``blocks`` (xLSTM, Transformer) or its ``nn.LSTM`` (the LSTM baseline, which runs
all its layers in one module); a model without either is sharded as one unit.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that ``apply_fsdp`` shards one by one before the root."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return list(blocks)
    return [m for m in model.children() if isinstance(m, nn.LSTM)]


def apply_fsdp(model: nn.Module, device: torch.device, param_dtype: Optional[torch.dtype] = None,
               compile_backend: Optional[str] = None) -> nn.Module:
    """Shard ``model`` (on ``device``) in place over all processes of the default group with FSDP2; returns it.

    param_dtype: bfloat16 for mixed precision (parameters gathered and computed in bf16, gradients reduced in
    float32, the optimizer on the float32 shards); None keeps float32 throughout (CPU).
    compile_backend: ``torch.compile`` each block in place with this backend before sharding (FSDP's hooks
    stay outside the compiled graphs; the state dict keeps its names); None: eager.
    """
    # FSDP2 warns when a sharded module returns a view (an in-place op on it would skip the pre-backward
    # hook); our blocks return states that nothing modifies in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = shard_units(model)
    for j, unit in enumerate(units):
        if compile_backend:
            unit.compile(backend=compile_backend)
        # the last unit's parameters are needed again at once by the backward: keep them gathered
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=j < len(units) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` (or its compiled wrapper) wrapped in DistributedDataParallel."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


__all__ = ["shard_units", "apply_fsdp", "apply_ddp"]
