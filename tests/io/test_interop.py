"""Parity with the authors' xlstm package: load its models (vanilla and CUDA sLSTM layouts), save ours."""

import dataclasses

import dacite
import pytest
import torch
from conftest import rel_err
from xlstm import (FeedForwardConfig, mLSTMBlockConfig, mLSTMLayerConfig, sLSTMBlockConfig, sLSTMLayerConfig,
                   xLSTMLMModel, xLSTMLMModelConfig)

from openxlstm import load_official, save_official, xLSTMConfig, xLSTMLM

STACKS = {"mlstm-only": [], "slstm-only": [0, 1, 2], "mixed": [1]}


def official(slstm_at, num_blocks=3, E=64, context=32, vocab=97, tie=False, seed=0, bias=False, ffn_bias=False,
             group_norm_weight=True, act_fn="gelu"):
    torch.manual_seed(seed)
    config = xLSTMLMModelConfig(
        mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(conv1d_kernel_size=4, qkv_proj_blocksize=4, num_heads=4)),
        slstm_block=sLSTMBlockConfig(slstm=sLSTMLayerConfig(backend="vanilla", num_heads=4, conv1d_kernel_size=4,
                                                            group_norm_weight=group_norm_weight),
                                     feedforward=FeedForwardConfig(proj_factor=1.3, act_fn=act_fn, bias=ffn_bias)),
        context_length=context, num_blocks=num_blocks, embedding_dim=E, slstm_at=slstm_at, vocab_size=vocab,
        tie_weights=tie, bias=bias)
    model = xLSTMLMModel(config)
    model.reset_parameters()
    with torch.no_grad():  # random weights everywhere (recurrent kernels, gates and norms included)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return config, model.eval()


@pytest.mark.parametrize("stack", list(STACKS))
def test_logits_equal_reference(stack):
    config, theirs = official(STACKS[stack])
    ids = torch.randint(0, 97, (2, 32))
    ours = load_official(dataclasses.asdict(config), theirs.state_dict())
    with torch.no_grad():
        assert rel_err(ours(ids), theirs(ids)) <= 1e-5


def test_tied_weights_and_step_api():
    config, theirs = official([1], tie=True, seed=2)
    ids = torch.randint(0, 97, (1, 6))
    ours = load_official(dataclasses.asdict(config), theirs.state_dict())
    assert ours.lm_head.weight is ours.embedding.weight
    with torch.no_grad():
        state, outs = None, []
        for t in range(ids.shape[1]):  # their single-token step API against our prefill-free stepping
            logits, state = theirs.step(ids[:, t : t + 1], state)
            outs.append(logits)
        assert rel_err(ours(ids), torch.cat(outs, 1)) <= 1e-5


def test_cuda_layout_state_dict():
    """The same model saved from the CUDA backend stores the sLSTM kernel/bias in another order."""
    config, theirs = official([0, 2], seed=1)
    sd = dict(theirs.state_dict())
    NH, E = 4, 64
    d = E // NH
    for j in (0, 2):
        key = f"xlstm_block_stack.blocks.{j}.xlstm.slstm_cell."
        cell = theirs.xlstm_block_stack.blocks[j].xlstm.slstm_cell
        sd[key + "_recurrent_kernel_"] = cell.recurrent_kernel.clone().reshape(NH, d, 4 * d)  # (NH, d_in, 4*d_out)
        sd[key + "_bias_"] = cell.bias.clone().reshape(-1)  # head-major (NH, 4, d)
    ids = torch.randint(0, 97, (2, 20))
    ours = load_official(dataclasses.asdict(config), sd)
    with torch.no_grad():
        assert rel_err(ours(ids), theirs(ids)) <= 1e-5


def test_runs_beyond_reference_context_length():
    config, theirs = official([1], context=16)
    ids = torch.randint(0, 97, (1, 40))
    ours = load_official(dataclasses.asdict(config), theirs.state_dict())
    with torch.no_grad():
        with pytest.raises(Exception):
            theirs(ids)  # the reference's causal mask is sized to its context length
        long = ours(ids)
        assert rel_err(long[:, :16], theirs(ids[:, :16])) <= 1e-5
        assert torch.isfinite(long).all()


@pytest.mark.parametrize("stack", list(STACKS))
def test_save_official_round_trip(stack):
    config, theirs = official(STACKS[stack], seed=3)
    ours = load_official(dataclasses.asdict(config), theirs.state_dict())
    config_dict, sd = save_official(ours)
    again = xLSTMLMModel(dacite.from_dict(xLSTMLMModelConfig, config_dict))
    again.load_state_dict(sd)
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert rel_err(again.eval()(ids), theirs(ids)) <= 1e-6


def test_mismatched_state_dict_is_reported():
    config, theirs = official([1])
    sd = dict(theirs.state_dict())
    sd.pop("lm_head.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys: \['extra.weight'\].*missing keys: \['lm_head.weight'\]"):
        load_official(dataclasses.asdict(config), sd)
    with pytest.raises(TypeError, match="config must be a dict"):
        load_official(config, theirs.state_dict())


# every configuration the reference builds: biases on the mLSTM projections (the stack's bias) and on the
# feed-forward network (its own) independently, a group norm without weight, each feed-forward activation
VARIANTS = {"bias": dict(bias=True), "ffn-bias-relu^2": dict(ffn_bias=True, act_fn="relu^2"),
            "both-biases-no-gn-weight-selu": dict(bias=True, ffn_bias=True, group_norm_weight=False, act_fn="selu"),
            "sigmoid-swish": dict(act_fn="sigmoid")}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_every_reference_configuration(variant):
    """Loaded exactly (same logits), and saved back: the reference model built from our export gives them too."""
    config, theirs = official([1], seed=4, **VARIANTS[variant])
    ids = torch.randint(0, 97, (2, 16))
    ours = load_official(dataclasses.asdict(config), theirs.state_dict())
    config_dict, sd = save_official(ours)
    again = xLSTMLMModel(dacite.from_dict(xLSTMLMModelConfig, config_dict))
    again.load_state_dict(sd)
    with torch.no_grad():
        assert rel_err(ours(ids), theirs(ids)) <= 1e-5
        assert rel_err(again.eval()(ids), theirs(ids)) <= 1e-5


def test_float64_weights_stay_float64():
    """No silent cast: float64 weights give a float64 model (as exact as float64 allows) and export as float64."""
    config, theirs = official([0, 1, 2], seed=5)  # sLSTM only: the two compute the same in float64 (the mLSTM's
    theirs = theirs.double()                      # stabilizer floor differs by design, see the README)
    ours = load_official(dataclasses.asdict(config), theirs.state_dict())
    assert {p.dtype for p in ours.parameters()} == {torch.float64}
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert rel_err(ours(ids), theirs(ids)) <= 1e-12  # through float32 weights: ~1e-7
    assert {t.dtype for t in save_official(ours)[1].values()} == {torch.float64}


@pytest.mark.parametrize("field,value,message", [
    ("slstm_forget_gate", "exp", "forget gate is a sigmoid"),
    ("norm_eps", 1e-6, "eps=1e-05"),
    ("mlstm_conv_kernel", 0, "always has a convolution"),
])
def test_save_official_refuses_what_the_reference_cannot_express(field, value, message):
    """Exported exactly or refused: an exponential sLSTM forget gate or another norm eps would give other logits."""
    config = xLSTMConfig(vocab_size=97, embedding_dim=64, num_blocks=2, slstm_at=[1], **{field: value})
    with pytest.raises(ValueError, match=message):
        save_official(xLSTMLM(config))
