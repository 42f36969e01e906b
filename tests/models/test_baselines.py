"""The LSTM and Transformer baselines: sizes, optimizer groups, config round trips (the contract they share
with every model is tests/models/test_contract.py)."""

import pytest
import torch

from openxlstm.baselines import (LSTMConfig, LSTMLM, TransformerConfig, TransformerLM, sized_lstm_config,
                                 sized_transformer_config)
from conftest import rel_err

MODELS = {
    "lstm": lambda: LSTMLM(LSTMConfig(vocab_size=37, embedding_dim=24, num_layers=2)),
    "transformer": lambda: TransformerLM(TransformerConfig(vocab_size=37, embedding_dim=32, num_layers=2, num_heads=4)),
}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_optim_groups_and_config_round_trip(arch):
    model = MODELS[arch]()
    groups = model.optim_groups(0.1)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in model.parameters()}) == len({id(p) for p in grouped})
    assert model.embedding.weight in groups[1]["params"]
    assert all(p.dim() >= 2 for p in groups[0]["params"])
    assert model.num_params() == model.config.num_params()
    cfg = type(model.config).from_dict(model.config.to_dict())
    assert cfg == model.config
    with pytest.raises(ValueError, match="unknown field"):
        type(model.config).from_dict({**model.config.to_dict(), "bogus": 1})


def test_trains_one_step():
    torch.manual_seed(0)
    for arch in sorted(MODELS):
        model = MODELS[arch]()
        ids = torch.randint(0, 37, (2, 9))
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_sized_configs_match_target():
    for target in (1_000_000, 3_000_000):
        lstm = sized_lstm_config(target, vocab_size=256, num_layers=2)
        tr = sized_transformer_config(target, vocab_size=256, num_layers=4, head_dim=32)
        assert abs(LSTMLM(lstm).num_params() - target) / target < 0.1
        assert abs(tr.num_params() - target) / target < 0.15


def test_bad_inputs():
    model = MODELS["transformer"]()
    with pytest.raises(RuntimeError, match="token ids"):
        model(torch.tensor([[0, 99]]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="even size"):
        TransformerConfig(embedding_dim=30, num_heads=10)
