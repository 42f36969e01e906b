"""Parity with the authors' xlstm package: load its models (vanilla and CUDA sLSTM layouts), save ours."""

import dataclasses

import dacite
import pytest
import torch
from conftest import rel_err
from xlstm import (FeedForwardConfig, mLSTMBlockConfig, mLSTMLayerConfig, sLSTMBlockConfig, sLSTMLayerConfig,
                   xLSTMLMModel, xLSTMLMModelConfig)

from openxlstm import load_official, save_official

STACKS = {"mlstm-only": [], "slstm-only": [0, 1, 2], "mixed": [1]}


def official(slstm_at, num_blocks=3, E=64, context=32, vocab=97, tie=False, seed=0):
    torch.manual_seed(seed)
    config = xLSTMLMModelConfig(
        mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(conv1d_kernel_size=4, qkv_proj_blocksize=4, num_heads=4)),
        slstm_block=sLSTMBlockConfig(slstm=sLSTMLayerConfig(backend="vanilla", num_heads=4, conv1d_kernel_size=4),
                                     feedforward=FeedForwardConfig(proj_factor=1.3, act_fn="gelu")),
        context_length=context, num_blocks=num_blocks, embedding_dim=E, slstm_at=slstm_at, vocab_size=vocab,
        tie_weights=tie)
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
