"""Shared by the forecasting tests: random TiRex models built with tirex-ts's own classes (the oracle), saved
in its Lightning checkpoint format, and tirex-ts with the bfloat16 cast of its recurrence turned off."""

from __future__ import annotations

import contextlib
import math
import types

import torch

QUANTILES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def build_tirex(embedding_dim=32, num_heads=4, num_blocks=2, patch=8, ff_dim=48, train_ctx=64, seed=0,
                forget_bias=0.0):
    """(tirex-ts TiRexZero with seeded random weights, its hyper_parameters). forget_bias shifts the cell's
    forget-gate biases (40: every forget gate saturated, past TiRex's clamp at 15)."""
    from tirex.models.tirex import TiRexZero

    config = dict(input_patch_size=patch, output_patch_size=patch, quantiles=QUANTILES,
                  block_kwargs=dict(embedding_dim=embedding_dim, num_heads=num_heads, num_blocks=num_blocks,
                                    ffn_proj_factor=2.6667), input_ff_dim=ff_dim)
    model = TiRexZero(backend="torch", model_config=config, train_ctx_len=train_ctx)
    g = torch.Generator().manual_seed(seed)
    d = embedding_dim // num_heads
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith(("norm_slstm.weight", "norm_ffn.weight")) or name == "out_norm.weight":
                p.copy_(1 + 0.1 * r)
            elif "group_norm" in name:
                p.copy_(0.1 * r)
            elif "_bias_" in name:
                p.copy_(r)
                p.view(num_heads, 4, d)[:, 1] += forget_bias
            elif "_recurrent_kernel_" in name:
                p.copy_(r / math.sqrt(d))
            elif p.dim() >= 2:
                p.copy_(r / math.sqrt(p.shape[-1]))
            else:
                p.copy_(0.1 * r)
    return model.eval(), {"model_config": config, "train_ctx_len": train_ctx}


def save_tirex(path, model, hparams, old_keys: bool = False):
    """Write TiRex's checkpoint layout (``model.ckpt``: hyper_parameters + state_dict); ``old_keys`` prefixes
    the blocks with "block_stack." as older checkpoints do."""
    state = model.state_dict()
    if old_keys:
        state = {("block_stack." + k if k.startswith("blocks.") else k): v for k, v in state.items()}
    torch.save({"hyper_parameters": hparams, "state_dict": state, "epoch": 3}, path)
    return path


class _Float32Torch(types.ModuleType):
    def __getattr__(self, name):
        return torch.float32 if name == "bfloat16" else getattr(torch, name)


@contextlib.contextmanager
def tirex_float32():
    """tirex-ts's sLSTM recurrence in float32: its cell module sees ``torch.bfloat16`` as float32."""
    import tirex.models.slstm.cell as cell

    cell.torch = _Float32Torch("torch")
    try:
        yield
    finally:
        cell.torch = torch


def row_rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative error in norm of each series (row) of a against b, (B,)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return (a - b).norm(dim=1) / b.norm(dim=1)


def random_walks(B, L, seed=1, missing=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, generator=g).cumsum(-1) + 3.0 * torch.arange(B)[:, None]
    if missing and L > 20:
        x[0, 5:12] = math.nan
        x[-1, -3] = math.nan
    return x
