"""TiRex's Lightning checkpoints (``model.ckpt``), read into our ``TiRex`` forecaster (``models/tirex.py``).

``model.ckpt`` (read with ``torch.load(weights_only=True)``; the file or its directory):

    hyper_parameters  {"model_config": {input_patch_size, output_patch_size, quantiles, input_ff_dim,
                       block_kwargs: {embedding_dim, num_heads, num_blocks, ffn_proj_factor, ...}},
                       "train_ctx_len": 2048}
    state_dict        TiRex's parameter names; older checkpoints prefix the blocks with "block_stack."

Its tensors map onto ours one to one, with these changes of layout: the layer's ``fgate`` projection feeds
the cell's input gate and its ``igate`` the forget gate (TiRex concatenates them in that order), so they
swap names; the cell's bias (NH, 4, d) head-major becomes gate-major (4, NH, d); the recurrent kernel
(NH, d, 4d) is viewed as (NH, d, 4, d); the head norm's weight w (applied as 1 + w) is stored as 1 + w; the
SwiGLU's two up projections are stacked into one. Our own forecaster directories and ``forecast-train`` runs
are run-format directories (``run.py``), like every other model's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..models.tirex import TiRex, TiRexConfig

TIREX_FILE = "model.ckpt"

_MLPS = {"input_patch_embedding": "embed", "output_patch_embedding": "head"}
_MLP_LAYERS = {"hidden_layer": "hidden", "output_layer": "out", "residual_layer": "skip"}
_GATES = {"fgate": "igate", "igate": "fgate", "zgate": "zgate", "ogate": "ogate"}  # TiRex name -> the gate it feeds


def config_from_tirex(hyper_parameters, where: str) -> TiRexConfig:
    """Our config from a TiRex checkpoint's ``hyper_parameters``; UserError naming what is missing or wrong."""
    if not isinstance(hyper_parameters, dict) or not isinstance(hyper_parameters.get("model_config"), dict):
        raise UserError(f"{where}: hyper_parameters has no model_config: not a TiRex checkpoint")
    mc = hyper_parameters["model_config"]
    bk = mc.get("block_kwargs")
    need = ["input_patch_size", "output_patch_size", "quantiles", "input_ff_dim", "block_kwargs"]
    missing = [k for k in need if k not in mc] + [f"block_kwargs.{k}" for k in ("embedding_dim", "num_heads",
                                                                               "num_blocks")
                                                 if isinstance(bk, dict) and k not in bk]
    if not isinstance(bk, dict) and "block_kwargs" in mc:
        missing.append("block_kwargs (an object)")
    if hyper_parameters.get("train_ctx_len") is None:
        missing.append("train_ctx_len")
    if missing:
        raise UserError(f"{where}: the TiRex hyper_parameters lack {', '.join(missing)}")
    if mc["input_patch_size"] != mc["output_patch_size"]:
        raise UserError(f"{where}: input_patch_size {mc['input_patch_size']} differs from output_patch_size "
                        f"{mc['output_patch_size']}; TiRex (and this loader) needs them equal")
    for key, want in (("num_gates", 4), ("num_states", 4)):
        if bk.get(key, want) != want:
            raise UserError(f"{where}: block_kwargs.{key} is {bk[key]}; an sLSTM has {want}")
    try:
        return TiRexConfig(patch_size=mc["input_patch_size"], embedding_dim=bk["embedding_dim"],
                           num_heads=bk["num_heads"], num_blocks=bk["num_blocks"],
                           ffn_proj_factor=bk.get("ffn_proj_factor", 2.6667), input_ff_dim=mc["input_ff_dim"],
                           quantiles=list(mc["quantiles"]), train_ctx_len=hyper_parameters["train_ctx_len"],
                           pad_context=True)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: unsupported TiRex hyper_parameters ({e})") from None


def state_dict_from_tirex(state: dict, config: TiRexConfig, where: str) -> dict:
    """Our state dict from TiRex's (older "block_stack." names accepted); every tensor used exactly once."""
    src = {k.replace("block_stack.", ""): v for k, v in state.items()}
    NH, d, E = config.num_heads, config.head_dim, config.embedding_dim
    out, used = {}, set()

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise UserError(f"{where}: the state_dict has no {name!r}: not a checkpoint of this TiRex config")
        if not isinstance(src[name], torch.Tensor):
            raise UserError(f"{where}: state_dict entry {name!r} is not a tensor")
        used.add(name)
        return src[name].float()

    for theirs, ours in _MLPS.items():
        for layer, short in _MLP_LAYERS.items():
            for p in ("weight", "bias"):
                out[f"{ours}.{short}.{p}"] = take(f"{theirs}.{layer}.{p}")
    out["norm.weight"] = take("out_norm.weight")
    for j in range(config.num_blocks):
        b, o = f"blocks.{j}", f"blocks.{j}"
        out[f"{o}.norm_slstm.weight"] = take(f"{b}.norm_slstm.weight")
        out[f"{o}.norm_ffn.weight"] = take(f"{b}.norm_ffn.weight")
        for theirs, ours in _GATES.items():
            out[f"{o}.slstm.{ours}.weight"] = take(f"{b}.slstm_layer.{theirs}.weight")
        R = take(f"{b}.slstm_layer.slstm_cell._recurrent_kernel_")
        bias = take(f"{b}.slstm_layer.slstm_cell._bias_")
        if tuple(R.shape) != (NH, d, 4 * d) or tuple(bias.shape) != (4 * E,):
            raise UserError(f"{where}: block {j}'s sLSTM kernel {tuple(R.shape)} / bias {tuple(bias.shape)} do not "
                            f"fit {NH} heads of width {d}")
        out[f"{o}.slstm.recurrent"] = R.reshape(NH, d, 4, d)
        out[f"{o}.slstm.bias"] = bias.view(NH, 4, d).permute(1, 0, 2).reshape(4 * E)
        out[f"{o}.slstm.norm.weight"] = 1.0 + take(f"{b}.slstm_layer.group_norm.weight")
        up = [take(f"{b}.ffn.proj_up_gate.weight"), take(f"{b}.ffn.proj_up.weight")]
        out[f"{o}.ffn.up.weight"] = torch.cat(up, dim=0)
        out[f"{o}.ffn.down.weight"] = take(f"{b}.ffn.proj_down.weight")
    extra = sorted(set(src) - used)
    if extra:
        raise UserError(f"{where}: the state_dict has tensors this TiRex config does not use: {extra[:3]}"
                        f"{' ...' if len(extra) > 3 else ''}")
    return out


def load_state(model: TiRex, state: dict, where: str) -> TiRex:
    """Fill ``model`` with ``state``; a shape mismatch or a missing tensor is a UserError."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"{where}: the weights do not fit the config ({first[-1].strip() if first else e})") from None
    if missing or unexpected:
        raise UserError(f"{where}: the weights do not match the config: missing {sorted(missing)[:3]}, unexpected "
                        f"{sorted(unexpected)[:3]}")
    return model


def load_tirex_checkpoint(path, device="cpu") -> TiRex:
    """A TiRex Lightning checkpoint (``model.ckpt`` or its directory) as our forecaster, in eval mode."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / TIREX_FILE
    where = f"TiRex checkpoint {str(p)!r}"
    if not p.is_file():
        raise UserError(f"{where} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for truncated, foreign or unsafe files
        raise UserError(f"{where} cannot be read as a weights-only torch checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"{where} is not a Lightning checkpoint with hyper_parameters and state_dict")
    config = config_from_tirex(ckpt["hyper_parameters"], where)
    if not isinstance(ckpt["state_dict"], dict):
        raise UserError(f"{where}: state_dict is not a mapping of tensors")
    model = TiRex(config)
    load_state(model, state_dict_from_tirex(ckpt["state_dict"], config, where), where)
    return model.to(device).eval()


def is_tirex_checkpoint(path) -> bool:
    """A ``model.ckpt`` file, or a directory holding one and no config.json of ours."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.suffix == ".ckpt"
    return p.is_dir() and (p / TIREX_FILE).is_file() and not (p / "config.json").is_file()


__all__ = ["load_tirex_checkpoint", "config_from_tirex", "state_dict_from_tirex", "is_tirex_checkpoint", "TIREX_FILE"]
