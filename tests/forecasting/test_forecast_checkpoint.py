"""Our forecaster directories (save / load round trip, atomic, umask, never over a user's files), the
strict TiRexConfig, and one-line errors for TiRex checkpoints that are not what they claim."""

import json
import os

import pytest
import torch
from helpers_forecasting import build_tirex, random_walks, save_tirex

from openxlstm.errors import UserError
from openxlstm.models import build_model
from openxlstm.forecasting import TiRex, TiRexConfig, from_pretrained, preset


def small(**kw):
    torch.manual_seed(0)
    return TiRex(TiRexConfig(patch_size=8, embedding_dim=16, num_heads=2, num_blocks=1, input_ff_dim=16,
                             train_ctx_len=32, **kw))


def test_directory_round_trip_from_a_tirex_checkpoint(tmp_path):
    theirs, hp = build_tirex(seed=2)
    model = from_pretrained(save_tirex(tmp_path / "model.ckpt", theirs, hp))
    old = os.umask(0o077)
    try:
        path = model.save_pretrained(tmp_path / "ours")
    finally:
        os.umask(old)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in path.iterdir())
    meta = json.loads((path / "config.json").read_text())
    assert meta["arch"] == "tirex" and meta["model"] == model.config.to_dict()
    again = from_pretrained(path)
    ctx = random_walks(3, 70)
    assert torch.equal(again.forecast(ctx, 20)[0], model.forecast(ctx, 20)[0])
    with pytest.raises(UserError, match="is not empty: pass overwrite=True"):
        model.save_pretrained(path)
    small().save_pretrained(path, overwrite=True)
    assert from_pretrained(path).config.embedding_dim == 16
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_config_is_strict():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['patch'\]; known fields: \['embedding_dim'"):
        TiRexConfig.from_dict({"patch": 8})
    for bad, msg in [(dict(num_heads=3), "not divisible"), (dict(train_ctx_len=100), "multiple of patch_size"),
                     (dict(quantiles=[0.1, 0.9]), "include 0.5"), (dict(quantiles=[0.5, 0.2]), "increasing"),
                     (dict(num_blocks=True), "positive integer"), (dict(ffn_proj_factor=float("nan")), "positive")]:
        with pytest.raises(ValueError, match=msg):
            TiRexConfig(**bad)
    assert TiRexConfig.from_dict(TiRexConfig().to_dict()) == TiRexConfig()
    assert abs(TiRex(preset("tirex-35m")).num_params() - 35.29e6) < 0.01e6  # the published TiRex's size


def test_corrupt_or_foreign_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        from_pretrained(tmp_path / "missing")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read as a weights-only torch checkpoint"):
        from_pretrained(junk)
    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    with pytest.raises(UserError, match="not a Lightning checkpoint"):
        from_pretrained(tmp_path / "x.ckpt")
    theirs, hp = build_tirex()
    bad_hp = {"model_config": {k: v for k, v in hp["model_config"].items() if k != "input_ff_dim"},
              "train_ctx_len": 64}
    torch.save({"hyper_parameters": bad_hp, "state_dict": theirs.state_dict()}, tmp_path / "y.ckpt")
    with pytest.raises(UserError, match="lack input_ff_dim"):
        from_pretrained(tmp_path / "y.ckpt")
    state = dict(theirs.state_dict())
    state.pop("out_norm.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save({"hyper_parameters": hp, "state_dict": state}, tmp_path / "z.ckpt")
    with pytest.raises(UserError, match="has no 'out_norm.weight'"):
        from_pretrained(tmp_path / "z.ckpt")
    lm = build_model("xlstm", {"vocab_size": 16, "embedding_dim": 16, "num_blocks": 1}).save_pretrained(tmp_path / "lm")
    with pytest.raises(UserError, match="holds a xLSTMLM, not a TiRex"):
        from_pretrained(lm)
    d = small().save_pretrained(tmp_path / "ours")
    meta = json.loads((d / "config.json").read_text())
    meta["model"]["embedding_dim"] = 32
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="config.json was changed after the weights were saved"):
        from_pretrained(d)
