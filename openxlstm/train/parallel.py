"""How a model is laid on the hardware, applied from outside it (torchtitan's order): activation
checkpointing, then ``torch.compile``, then DDP or FSDP2. The models know nothing of any of it.

    activation checkpointing  ``model.set_activation_checkpointing(True)``: each block recomputed in backward
    compile                   ``torch.compile`` (a wrapper around the bare model; under FSDP each block in place)
    DDP                       torchrun without --fsdp: every process holds the whole model, gradients averaged
    FSDP2                     torchrun with --fsdp: ``fully_shard`` on each block, then on the root model (the
                              embedding, the final norm and the head form the root's group). Each process keeps
                              1/W of every parameter, of its gradient and of its optimizer state; a block's
                              parameters are gathered just before its forward (and again before its backward)

The blocks are the model's ``blocks`` (every registered model but the LSTM baseline) or its ``nn.LSTM``
(which runs all its layers in one module); a model without either is sharded as one unit.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ..errors import UserError
from .distributed import DistInfo, is_initialized


class Parallelized(NamedTuple):
    """forward: the model to call for evaluation (compiled or not); train_forward: the one to call in training
    (DDP-wrapped with several processes). Under FSDP both are the sharded model itself."""

    forward: nn.Module
    train_forward: nn.Module


def compile_backend(value: Union[bool, str, None]) -> Optional[str]:
    """torch.compile's backend for a ``compile`` setting (None: no compilation)."""
    if value is True:
        return "inductor"
    if not value:
        return None
    known = torch.compiler.list_backends(exclude_tags=())
    if value not in known:
        raise UserError(f"--compile {value!r}: not a torch.compile backend; use inductor (the default), aot_eager, "
                        f"eager, cudagraphs (all: torch.compiler.list_backends(exclude_tags=()))")
    return value


def parallelize(model: nn.Module, device: torch.device, *, activation_checkpointing: bool = False,
                compile: Union[bool, str] = False, fsdp: bool = False, param_dtype: Optional[torch.dtype] = None,
                dist_info: DistInfo = DistInfo(), init_state: Optional[dict] = None) -> Parallelized:
    """Apply activation checkpointing, compile and DDP / FSDP2 to ``model`` (moved to ``device``; sharded in
    place under FSDP), in that order.

    param_dtype (FSDP): bfloat16 for mixed precision (parameters gathered and computed in bf16, gradients
    reduced in float32, the optimizer on the float32 shards); None keeps float32. init_state (FSDP, a model on
    the meta device): the whole-model state dict on the main process, broadcast into every process's shards.
    """
    if fsdp and not is_initialized():
        raise UserError("--fsdp shards the model over the processes that torchrun starts: run "
                        "torchrun --nproc_per_node=N -m openxlstm train --fsdp ...")
    if activation_checkpointing:
        if not hasattr(model, "set_activation_checkpointing"):
            raise UserError(f"{type(model).__name__} has no activation checkpointing")
        model.set_activation_checkpointing(True)
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and not fsdp:
        raise ValueError("parallelize: a model on the meta device is filled from init_state under FSDP only")
    if not on_meta:
        model.to(device)
    backend = compile_backend(compile)
    if fsdp:
        apply_fsdp(model, device, param_dtype=param_dtype, compile_backend=backend)
        if on_meta:  # every process allocates its shards, the main process's whole state fills them
            model.to_empty(device=device)
            set_model_state_dict(model, init_state if dist_info.is_main else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return Parallelized(model, model)
    forward = torch.compile(model, backend=backend) if backend else model  # the bare model's keys stay unprefixed
    train_forward = (DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
                     if dist_info.enabled else forward)
    return Parallelized(forward, train_forward)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that ``apply_fsdp`` shards one by one before the root."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return list(blocks)
    return [m for m in model.children() if isinstance(m, nn.LSTM)]


def apply_fsdp(model: nn.Module, device: torch.device, param_dtype: Optional[torch.dtype] = None,
               compile_backend: Optional[str] = None) -> nn.Module:
    """Shard ``model`` (on ``device``) in place over all processes of the default group with FSDP2; returns it.
    ``compile_backend``: ``torch.compile`` each block in place first (FSDP's hooks stay outside the compiled
    graphs; the state dict keeps its names); None: eager."""
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


__all__ = ["Parallelized", "parallelize", "compile_backend", "shard_units", "apply_fsdp"]
