"""Interoperability with the authors' ``xlstm`` package (PyPI): load its language models, save ours for it.

``load_official(config, state_dict)`` takes an ``xLSTMLMModelConfig`` as a plain dict
(``dataclasses.asdict``) and an ``xLSTMLMModel`` state dict, with the sLSTM in the vanilla or the CUDA
backend layout (told apart by the shape of the recurrent kernel), and returns our ``xLSTMLM``.
``save_official(model)`` returns ``(config_dict, state_dict)`` in the vanilla layout.

Differences in storage handled here: the reference keeps norm weights as offsets from 1; its sLSTM layer
computes the input gate with the module named ``fgate`` and the forget gate with ``igate``; its conv
weights are (F, 1, K); its sLSTM recurrent kernel and bias are stored in backend-specific orders.

Both directions are exact or refuse with a ValueError that says why. Loading takes every model the
reference builds that our layers compute: biases on the mLSTM projections and the feed-forward network
independently (``bias`` of the stack, ``bias`` of the FeedForwardConfig; where only one has them, the
other's are zeros), a group norm without weight (ones), every feed-forward activation. Weights keep their
dtype (float64 stays float64). Saving refuses what the reference's config cannot express: an exponential
sLSTM forget gate (the reference's is a sigmoid), ``norm_eps`` other than its fixed 1e-5, an mLSTM without
convolution (the reference cannot build one).
"""

from __future__ import annotations

import functools
from typing import Mapping

import torch

from ..config import xLSTMConfig
from ..models.xlstm import xLSTMLM

_ACT_FROM_OFFICIAL = {"gelu": "gelu", "swish": "silu", "relu": "relu", "relu^2": "relu2", "sigmoid": "sigmoid",
                      "selu": "selu"}
_ACT_TO_OFFICIAL = {v: k for k, v in _ACT_FROM_OFFICIAL.items()}
OFFICIAL_NORM_EPS = 1e-5  # the reference's LayerNorms all use their default eps; its configs cannot change it


def _unsupported(what: str) -> ValueError:
    return ValueError(f"load_official: {what} is not supported by openxlstm")


def config_from_official(cfg: Mapping) -> xLSTMConfig:
    """Our config for an ``xLSTMLMModelConfig`` given as a dict."""
    if not isinstance(cfg, Mapping):
        raise TypeError("load_official: config must be a dict (dataclasses.asdict of xLSTMLMModelConfig)")
    for key in ("vocab_size", "embedding_dim", "num_blocks"):
        if key not in cfg:
            raise ValueError(f"load_official: config lacks {key!r}; pass dataclasses.asdict(xLSTMLMModelConfig)")
    mblock, sblock = cfg.get("mlstm_block"), cfg.get("slstm_block")
    num_blocks = cfg["num_blocks"]
    slstm_at = cfg.get("slstm_at", [])
    if mblock is None or slstm_at == "all":
        slstm_at = list(range(num_blocks))
    if slstm_at and sblock is None:
        raise ValueError("load_official: slstm_at lists sLSTM blocks but slstm_block is None")
    if not cfg.get("add_post_blocks_norm", True):
        raise _unsupported("add_post_blocks_norm=False")
    has_mlstm = mblock is not None and len(slstm_at) < num_blocks
    ffn_bias = bool(slstm_at) and bool((sblock.get("feedforward") or {}).get("bias", False))
    kw = dict(vocab_size=cfg["vocab_size"], embedding_dim=cfg["embedding_dim"], num_blocks=num_blocks,
              slstm_at=list(slstm_at), tie_weights=bool(cfg.get("tie_weights", False)),
              weight_decay_on_embedding=bool(cfg.get("weight_decay_on_embedding", False)),
              bias=(has_mlstm and bool(cfg.get("bias", False))) or ffn_bias, dropout=float(cfg.get("dropout", 0.0)))
    if cfg.get("context_length", -1) and cfg.get("context_length", -1) > 0:
        kw["context_length"] = int(cfg["context_length"])
    if has_mlstm:
        m = mblock["mlstm"]
        if not m.get("round_proj_up_dim_up", True) or m.get("round_proj_up_to_multiple_of", 64) != 64:
            raise _unsupported("an mLSTM up-projection not rounded up to a multiple of 64")
        kw.update(mlstm_num_heads=m["num_heads"], mlstm_proj_factor=m["proj_factor"],
                  mlstm_conv_kernel=m["conv1d_kernel_size"], mlstm_qkv_blocksize=m["qkv_proj_blocksize"])
    if slstm_at:
        s, ff = sblock["slstm"], sblock.get("feedforward")
        if s.get("function", "slstm") != "slstm":
            raise _unsupported(f"sLSTM cell function {s.get('function')!r}")
        if ff is None:
            raise _unsupported("an sLSTM block without feed-forward network")
        if ff.get("ff_type", "ffn_gated") != "ffn_gated" or ff.get("act_fn", "gelu") not in _ACT_FROM_OFFICIAL:
            raise _unsupported(f"feed-forward {ff.get('ff_type')!r} with activation {ff.get('act_fn')!r}")
        if not ff.get("round_proj_up_dim_up", True) or ff.get("round_proj_up_to_multiple_of", 64) != 64:
            raise _unsupported("a feed-forward width not rounded up to a multiple of 64")
        bias_init = s.get("bias_init", "powerlaw_blockdependent")
        kw.update(slstm_num_heads=s["num_heads"], slstm_conv_kernel=s["conv1d_kernel_size"],
                  ffn_proj_factor=ff["proj_factor"], ffn_activation=_ACT_FROM_OFFICIAL[ff["act_fn"]],
                  slstm_bias_init=bias_init if bias_init in ("powerlaw_blockdependent", "small_init", "zeros") else "zeros")
    return xLSTMConfig(**kw)


def _official_parts(cfg: Mapping) -> dict[str, bool]:
    """Which optional parameters the reference model of ``cfg`` holds: biases of the mLSTM projections (the
    stack's ``bias``), of the feed-forward network (its own ``bias``), the sLSTM group norm's weight."""
    sblock = cfg.get("slstm_block") or {}
    return {"mlstm_bias": bool(cfg.get("bias", False)),
            "ffn_bias": bool((sblock.get("feedforward") or {}).get("bias", False)),
            "group_norm_weight": bool((sblock.get("slstm") or {}).get("group_norm_weight", True))}


def _block_map(config: xLSTMConfig, j: int) -> dict[str, tuple[str, str]]:
    """official key suffix -> (our key suffix, conversion) for block j."""
    o, u = f"xlstm_block_stack.blocks.{j}.", f"blocks.{j}."
    if config.block_types[j] == "m":
        pairs = {"xlstm_norm.weight": ("norm.weight", "norm"),
                 "xlstm.proj_up.weight": ("layer.proj_up.weight", ""),
                 "xlstm.q_proj.weight": ("layer.q_proj.weight", ""),
                 "xlstm.k_proj.weight": ("layer.k_proj.weight", ""),
                 "xlstm.v_proj.weight": ("layer.v_proj.weight", ""),
                 "xlstm.mlstm_cell.igate.weight": ("layer.igate.weight", ""),
                 "xlstm.mlstm_cell.igate.bias": ("layer.igate.bias", ""),
                 "xlstm.mlstm_cell.fgate.weight": ("layer.fgate.weight", ""),
                 "xlstm.mlstm_cell.fgate.bias": ("layer.fgate.bias", ""),
                 "xlstm.mlstm_cell.outnorm.weight": ("layer.outnorm.weight", "norm"),
                 "xlstm.learnable_skip": ("layer.skip", ""),
                 "xlstm.proj_down.weight": ("layer.proj_down.weight", "")}
        if config.mlstm_conv_kernel > 0:
            pairs["xlstm.conv1d.conv.weight"] = ("layer.conv.weight", "conv")
            pairs["xlstm.conv1d.conv.bias"] = ("layer.conv.bias", "")
        if config.bias:
            for name in ("proj_up", "q_proj", "k_proj", "v_proj", "proj_down"):
                pairs[f"xlstm.{name}.bias"] = (f"layer.{name}.bias", "")
    else:
        pairs = {"xlstm_norm.weight": ("norm.weight", "norm"),
                 "xlstm.fgate.weight": ("layer.igate.weight", ""),  # the reference's "fgate" feeds the input gate
                 "xlstm.igate.weight": ("layer.fgate.weight", ""),  # and its "igate" the forget gate
                 "xlstm.zgate.weight": ("layer.zgate.weight", ""),
                 "xlstm.ogate.weight": ("layer.ogate.weight", ""),
                 "xlstm.slstm_cell._recurrent_kernel_": ("layer.recurrent", "recurrent"),
                 "xlstm.slstm_cell._bias_": ("layer.bias", "slstm_bias"),
                 "xlstm.group_norm.weight": ("layer.norm.weight", "norm"),
                 "ffn_norm.weight": ("ffn_norm.weight", "norm"),
                 "ffn.proj_up.weight": ("ffn.proj_up.weight", ""),
                 "ffn.proj_down.weight": ("ffn.proj_down.weight", "")}
        if config.slstm_conv_kernel > 0:
            pairs["xlstm.conv1d.conv.weight"] = ("layer.conv.weight", "conv")
            pairs["xlstm.conv1d.conv.bias"] = ("layer.conv.bias", "")
        if config.bias:
            pairs["ffn.proj_up.bias"] = ("ffn.proj_up.bias", "")
            pairs["ffn.proj_down.bias"] = ("ffn.proj_down.bias", "")
    return {o + k: (u + ours, conv) for k, (ours, conv) in pairs.items()}


def _key_map(config: xLSTMConfig) -> dict[str, tuple[str, str]]:
    mapping = {"token_embedding.weight": ("embedding.weight", ""),
               "xlstm_block_stack.post_blocks_norm.weight": ("post_norm.weight", "norm")}
    if not config.tie_weights:
        mapping["lm_head.weight"] = ("lm_head.weight", "")
    for j in range(config.num_blocks):
        mapping.update(_block_map(config, j))
    return mapping


def _slstm_from_official(kind: str, t: torch.Tensor, NH: int, d: int, layout: str) -> torch.Tensor:
    if kind == "recurrent":  # ours: (NH, d_in, 4, d_out)
        if layout == "vanilla":  # (NH, 4*d_out, d_in)
            return t.reshape(NH, 4, d, d).permute(0, 3, 1, 2)
        return t.reshape(NH, d, 4, d)  # cuda: (NH, d_in, 4*d_out)
    if layout == "vanilla":  # bias, gate-major like ours
        return t.reshape(-1)
    return t.reshape(NH, 4, d).permute(1, 0, 2).reshape(-1)  # cuda: head-major


def _implicit_keys(mapping: dict, parts: dict[str, bool]) -> dict[str, str]:
    """official key -> "zeros" or "ones" for the parameters our model has and the reference model of these
    ``parts`` does not: a bias it leaves out (zero) or a group norm without weight (one, after the offset)."""
    implicit = {}
    for key in mapping:
        if key.endswith(".bias") and (".ffn." in key and not parts["ffn_bias"] or
                                      ".xlstm." in key and "conv" not in key and "_cell." not in key and
                                      not parts["mlstm_bias"]):
            implicit[key] = "zeros"
        elif key.endswith("group_norm.weight") and not parts["group_norm_weight"]:
            implicit[key] = "ones"
    return implicit


def _load_dtype(state_dict: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype to build the model in: the widest floating dtype of the state dict, so that no weight loses
    precision (float64 weights stay float64; a mix is widened, which is exact)."""
    dtypes = {t.dtype for t in state_dict.values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if not dtypes:
        raise ValueError("load_official: the state dict holds no floating-point tensors")
    return functools.reduce(torch.promote_types, sorted(dtypes, key=str))


def load_official(config: Mapping, state_dict: Mapping[str, torch.Tensor]) -> xLSTMLM:
    """Build our ``xLSTMLM`` from an ``xlstm`` package model's config dict and state dict, in the state dict's
    dtype (the widest one if they differ)."""
    ours = config_from_official(config)
    dtype = _load_dtype(state_dict)
    model = xLSTMLM(ours).to(dtype)
    mapping = _key_map(ours)
    implicit = _implicit_keys(mapping, _official_parts(config))
    mapping = {k: v for k, v in mapping.items() if k not in implicit}
    extra = sorted(k for k in state_dict if k not in mapping and not (ours.tie_weights and k == "lm_head.weight"))
    missing = sorted(k for k in mapping if k not in state_dict)
    if extra or missing:
        raise ValueError(f"load_official: the state dict does not match the config "
                         f"(unexpected keys: {extra[:6]}{'...' if len(extra) > 6 else ''}; "
                         f"missing keys: {missing[:6]}{'...' if len(missing) > 6 else ''})")
    NH, d = ours.slstm_num_heads, ours.embedding_dim // ours.slstm_num_heads
    own = model.state_dict()
    converted = {target: (torch.zeros_like if fill == "zeros" else torch.ones_like)(own[target])
                 for key, fill in implicit.items() for target, _ in [_key_map(ours)[key]]}
    for key, (target, conv) in mapping.items():
        t = state_dict[key].detach().to(dtype)
        if conv == "norm":
            t = t + 1.0
        elif conv == "conv":
            t = t.reshape(t.shape[0], -1)
        elif conv == "recurrent":
            layout = "vanilla" if tuple(t.shape) == (NH, 4 * d, d) else "cuda" if tuple(t.shape) == (NH, d, 4 * d) else None
            if layout is None:
                raise ValueError(f"load_official: {key} has shape {tuple(t.shape)}; expected {(NH, 4 * d, d)} "
                                 f"(vanilla layout) or {(NH, d, 4 * d)} (CUDA layout)")
            bias_key = key.replace("_recurrent_kernel_", "_bias_")
            converted[mapping[bias_key][0]] = _slstm_from_official("bias", state_dict[bias_key].detach().to(dtype), NH,
                                                                   d, layout)
            t = _slstm_from_official("recurrent", t, NH, d, layout)
        elif conv == "slstm_bias":
            continue  # converted with its recurrent kernel, whose shape tells the layout
        converted[target] = t
    if ours.tie_weights:
        converted["lm_head.weight"] = converted["embedding.weight"]
    for key, t in converted.items():
        if own[key].shape != t.shape:
            raise ValueError(f"load_official: {key} has shape {tuple(t.shape)}, the config implies {tuple(own[key].shape)}")
    model.load_state_dict(converted, strict=True)
    return model


def _check_exportable(config: xLSTMConfig) -> None:
    """Refuse what the reference's config cannot express (the exported model would compute something else)."""
    def refuse(what: str):
        raise ValueError(f"save_official: {what}; the xlstm package cannot express it, so the exported model would "
                         f"give other outputs")

    if config.slstm_at and config.slstm_forget_gate != "sigmoid":
        refuse(f"slstm_forget_gate={config.slstm_forget_gate!r} (the reference's sLSTM forget gate is a sigmoid)")
    if config.norm_eps != OFFICIAL_NORM_EPS:
        refuse(f"norm_eps={config.norm_eps!r} (the reference's norms use eps={OFFICIAL_NORM_EPS})")
    if config.has_mlstm and config.mlstm_conv_kernel == 0:
        refuse("mlstm_conv_kernel=0 (the reference's mLSTM layer always has a convolution)")


def config_to_official(config: xLSTMConfig) -> dict:
    """An ``xLSTMLMModelConfig`` as a dict (for ``dacite.from_dict`` or the package's own loaders); a ValueError
    for a config the reference cannot express."""
    _check_exportable(config)
    mlstm_block = None
    if config.has_mlstm:
        mlstm_block = {"mlstm": {"conv1d_kernel_size": config.mlstm_conv_kernel,
                                 "qkv_proj_blocksize": config.mlstm_qkv_blocksize,
                                 "num_heads": config.mlstm_num_heads, "proj_factor": config.mlstm_proj_factor,
                                 "embedding_dim": config.embedding_dim, "bias": config.bias,
                                 "dropout": config.dropout, "context_length": config.context_length}}
    slstm_block = None
    if config.slstm_at:
        slstm_block = {"slstm": {"backend": "vanilla", "num_heads": config.slstm_num_heads,
                                 "conv1d_kernel_size": config.slstm_conv_kernel,
                                 "bias_init": config.slstm_bias_init, "embedding_dim": config.embedding_dim,
                                 "dropout": config.dropout},
                       "feedforward": {"proj_factor": config.ffn_proj_factor,
                                       "act_fn": _ACT_TO_OFFICIAL[config.ffn_activation],
                                       "embedding_dim": config.embedding_dim, "dropout": config.dropout,
                                       "bias": config.bias}}
    return {"mlstm_block": mlstm_block, "slstm_block": slstm_block, "context_length": config.context_length,
            "num_blocks": config.num_blocks, "embedding_dim": config.embedding_dim, "add_post_blocks_norm": True,
            "bias": config.bias, "dropout": config.dropout, "slstm_at": list(config.slstm_at),
            "vocab_size": config.vocab_size, "tie_weights": config.tie_weights,
            "weight_decay_on_embedding": config.weight_decay_on_embedding, "add_embedding_dropout": False}


def save_official(model: xLSTMLM) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) for the ``xlstm`` package's ``xLSTMLMModel`` (sLSTM in vanilla layout), in the
    model's dtype; a ValueError for a model the reference cannot compute exactly."""
    config = model.config
    _check_exportable(config)
    own = model.state_dict()
    NH, d = config.slstm_num_heads, config.embedding_dim // config.slstm_num_heads
    out = {}
    for key, (target, conv) in _key_map(config).items():
        t = own[target].detach().clone()
        if conv == "norm":
            t = t - 1.0
        elif conv == "conv":
            t = t[:, None, :]
        elif conv == "recurrent":  # ours (NH, d_in, 4, d_out) -> vanilla (NH, 4*d_out, d_in)
            t = t.permute(0, 2, 3, 1).reshape(NH, 4 * d, d)
        out[key] = t.contiguous()
    if config.tie_weights:
        out["lm_head.weight"] = out["token_embedding.weight"]
    return config_to_official(config), out


__all__ = ["load_official", "save_official", "config_from_official", "config_to_official"]
