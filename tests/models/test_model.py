"""Model-level behaviour: state carrying, configs, presets, initialization, optimizer groups, errors."""

import json

import pytest
import torch
from conftest import rel_err

from openxlstm import preset, xLSTMConfig, xLSTMLM

STACKS = {"mlstm": [], "slstm": "all", "mixed": [1, 3]}


def tiny(slstm_at, **kw):
    cfg = dict(vocab_size=37, embedding_dim=32, num_blocks=4, slstm_at=slstm_at, mlstm_num_heads=2, slstm_num_heads=2)
    cfg.update(kw)
    return xLSTMConfig(**cfg)


def randomized(config, seed=0):
    torch.manual_seed(seed)
    model = xLSTMLM(config).double()
    with torch.no_grad():  # move off the structured init so every weight matters (R, gate weights, ...)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("stack", list(STACKS))
def test_prefill_then_step_equals_one_pass(stack):
    model = randomized(tiny(STACKS[stack]))
    ids = torch.randint(0, 37, (3, 23))
    full = model(ids)
    for t in (1, 9):
        logits, state = model(ids[:, :t], return_state=True)
        outs = [logits]
        for j in range(t, ids.shape[1]):
            logits, state = model(ids[:, j : j + 1], state, return_state=True)
            outs.append(logits)
        assert rel_err(torch.cat(outs, dim=1), full) <= 1e-12


@pytest.mark.parametrize("stack", list(STACKS))
def test_chunked_forward_with_state_equals_one_pass(stack):
    model = randomized(tiny(STACKS[stack]), seed=1).set_backends(chunk_size=4)
    ids = torch.randint(0, 37, (2, 30))
    full = model(ids)
    a, state = model(ids[:, :13], return_state=True)
    b = model(ids[:, 13:], state)
    assert rel_err(torch.cat([a, b], 1), full) <= 1e-12


def test_state_is_not_mutated_and_batch_rows_are_independent():
    model = randomized(tiny([1]))
    ids = torch.randint(0, 37, (2, 10))
    _, state = model(ids[:, :5], return_state=True)
    snapshot = [None if t is None else t.clone() for s in state for t in s]
    model(ids[:, 5:6], state, return_state=True)
    assert all(a is None or torch.equal(a, b) for a, b in zip(snapshot, [t for s in state for t in s]))
    assert rel_err(model(ids[1:]), model(ids)[1:]) <= 1e-14


def test_backends_agree_at_model_level():
    model = randomized(tiny([1]))
    ids = torch.randint(0, 37, (2, 21))
    ref = model.set_backends(mlstm="parallel", slstm="recurrent")(ids)
    out = model.set_backends(mlstm="chunkwise", slstm="fused", chunk_size=8)(ids)
    assert rel_err(out, ref) <= 1e-12


def test_float32_and_gradients_flow_everywhere():
    model = xLSTMLM(tiny([1]))
    ids = torch.randint(0, 37, (2, 12))
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad


@pytest.mark.parametrize("size,ratio,millions", [
    ("125m", "1:0", 163.8), ("125m", "7:1", 163.7), ("350m", "1:0", 409.3), ("350m", "7:1", 408.4),
    ("760m", "1:0", 840.4), ("760m", "7:1", 839.7), ("1.3b", "1:0", 1422.6), ("1.3b", "7:1", 1420.1)])
def test_preset_parameter_counts_match_the_paper(size, ratio, millions):
    config = preset(size, ratio)
    with torch.device("meta"):
        model = xLSTMLM(config)
    assert round(model.num_params() / 1e6, 1) == millions
    assert config.vocab_size == 50304 and not config.tie_weights


def test_preset_placements():
    assert preset("125m", "7:1").slstm_at == [3, 20]
    assert preset("350m", "xLSTM[7:1]").slstm_at == [3, 5, 7, 40, 42, 44]
    assert preset("125m", "1:0").slstm_at == []
    assert preset("125m", "0:1").slstm_at == list(range(24))
    assert xLSTMConfig(num_blocks=2, slstm_at="1:1").slstm_at == [1]
    with pytest.raises(ValueError, match="unknown preset size"):
        preset("7b")


def test_config_json_round_trip(tmp_path):
    config = tiny([0, 2], tie_weights=True, slstm_forget_gate="exp")
    path = tmp_path / "config.json"
    config.to_json(path)
    assert xLSTMConfig.from_json(path) == config
    assert xLSTMConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown field"):
        xLSTMConfig.from_dict({**config.to_dict(), "heads": 3})
    assert json.loads(config.to_json())["slstm_at"] == [0, 2]


@pytest.mark.parametrize("kwargs,message", [
    (dict(mlstm_num_heads=5), "divisible by mlstm_num_heads=5"),
    (dict(slstm_at=[1], slstm_num_heads=5), "divisible by slstm_num_heads=5"),
    (dict(slstm_at=[4]), r"out of range for num_blocks=4"),
    (dict(slstm_at=[1, 1]), "repeated"),
    (dict(slstm_at=[-1]), "out of range"),
    (dict(slstm_at="3-1"), "invalid xLSTM ratio"),
    (dict(embedding_dim=0), "embedding_dim must be a positive integer"),
    (dict(num_blocks=2.5), "num_blocks must be a positive integer"),
    (dict(mlstm_qkv_blocksize=5), "mlstm_qkv_blocksize=5"),
    (dict(slstm_forget_gate="tanh"), "slstm_forget_gate"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny([], **kwargs) if "slstm_at" not in kwargs else tiny(**kwargs)


def test_reference_initialization():
    config = xLSTMConfig(vocab_size=100, embedding_dim=256, num_blocks=4, slstm_at=[1, 3])
    torch.manual_seed(0)
    model = xLSTMLM(config)
    E, L = 256, 4
    assert abs(model.embedding.weight.std().item() - (2 / (5 * E)) ** 0.5) < 0.002
    m_layer, s_layer = model.blocks[0].layer, model.blocks[3].layer
    assert abs(m_layer.proj_down.weight.std().item() - 2 / L / E**0.5) < 0.002
    assert torch.equal(m_layer.fgate.bias, torch.linspace(3, 6, 4)) and not m_layer.fgate.weight.any()
    assert not m_layer.igate.weight.any() and abs(m_layer.igate.bias.std().item() - 0.1) < 0.1
    assert torch.equal(m_layer.skip, torch.ones_like(m_layer.skip))
    assert not s_layer.recurrent.any()
    d = E // 4
    fbias = s_layer.bias[E : 2 * E].view(4, d)
    expected = -(-5.0 + 12.0 * (torch.arange(d) / (d - 1)) ** (0.3 + 1.3 * 3 / 3))
    assert torch.allclose(fbias, expected.expand(4, d))
    assert not s_layer.bias[:E].any() and not s_layer.bias[2 * E :].any()
    for block in model.blocks:
        assert torch.equal(block.norm.weight, torch.ones(E))


def test_weight_decay_groups_match_the_reference():
    from openxlstm import save_official
    from openxlstm.io.official import _key_map
    from xlstm import xLSTMLMModel
    import dacite
    from xlstm import xLSTMLMModelConfig

    model = xLSTMLM(tiny([1, 2]))
    decay, no_decay = model.weight_decay_groups()
    ours = {id(p) for p in decay}
    names = {n for n, p in model.named_parameters() if id(p) in ours}
    config_dict, _ = save_official(model)
    theirs = xLSTMLMModel(dacite.from_dict(xLSTMLMModelConfig, config_dict))
    their_decay, _ = theirs.get_weight_decay_optim_group_param_names()
    key_map = _key_map(model.config)
    assert names == {key_map[k][0] for k in their_decay}
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    assert "embedding.weight" not in names and "blocks.1.layer.recurrent" not in names


def test_bad_input_ids_raise_clear_errors():
    model = xLSTMLM(tiny([1]))
    with pytest.raises(RuntimeError, match=r"token ids must lie in \[0, 37\)"):  # a device-side assert: no sync
        model(torch.tensor([[1, 37]]))
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, S\)"):
        model(torch.zeros(3, dtype=torch.long))
    _, state = model(torch.zeros(2, 3, dtype=torch.long), return_state=True)
    with pytest.raises(ValueError, match="batch size 2"):
        model(torch.zeros(1, 1, dtype=torch.long), state)
    with pytest.raises(ValueError, match="one entry per block"):
        model(torch.zeros(2, 1, dtype=torch.long), state[:2])
