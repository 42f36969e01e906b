"""Training: exact resume, DDP on 2 processes equal to 1, accumulation, checkpoints, sampler, schedule."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import rel_err
from helpers_train import TINY, tiny_args, write_corpus
from openxlstm.cli import main
from openxlstm.data import BatchSampler
from openxlstm.errors import UserError
from openxlstm.models import build_model, model_from_checkpoint
from openxlstm.train import CosineSchedule, TrainConfig, save_checkpoint, train
from openxlstm.train import checkpoint as ckpt_mod


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def weights(run):
    latest = (Path(run) / "latest").read_text().strip()
    return load_file(str(Path(run) / latest / "model.safetensors"))


def cfg(corpus, out, **kw):
    base = dict(arch="xlstm", model=dict(TINY["xlstm"]), data=str(corpus), out=str(out), max_steps=6, batch_size=4,
                seq_len=16, eval_every=3, eval_tokens=512, warmup=2, samples=0, progress=False)
    return TrainConfig(**{**base, **kw})


def test_resume_is_exact(corpus, tmp_path):
    """Stopped at step 3 and resumed: the same weights and validation loss as 6 uninterrupted steps."""
    full = train(cfg(corpus, tmp_path / "full"), log=lambda m: None)
    train(cfg(corpus, tmp_path / "part", stop_at=3), log=lambda m: None)
    assert (tmp_path / "part" / "latest").read_text().strip() == "ckpt-000003"
    resumed = train(cfg(corpus, tmp_path / "part"), resume="auto", log=lambda m: None)
    assert resumed["val_loss"] == full["val_loss"]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "part" / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["3", "6"]


def test_grad_accumulation_matches_one_batch(corpus, tmp_path):
    one = train(cfg(corpus, tmp_path / "one", max_steps=3), log=lambda m: None)
    acc = train(cfg(corpus, tmp_path / "acc", max_steps=3, grad_accum=2), log=lambda m: None)
    assert abs(one["val_loss"] - acc["val_loss"]) < 1e-5
    a, b = weights(tmp_path / "one"), weights(tmp_path / "acc")
    assert all(rel_err(a[k], b[k]) < 1e-4 for k in a)  # Adam turns float noise on tiny gradients into lr-sized steps


def test_ddp_two_processes_equal_one(corpus, tmp_path):
    """torchrun with 2 gloo processes and the same global batch reaches the weights of one process."""
    args = tiny_args("xlstm", corpus, tmp_path / "ddp", steps=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "openxlstm", *args], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main(tiny_args("xlstm", corpus, tmp_path / "single", steps=3)) == 0
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    assert all(rel_err(a[k], b[k]) < 1e-4 for k in a)
    val = [r.split(",")[5] for r in (tmp_path / "ddp" / "metrics.csv").read_text().splitlines()[1:]]
    ref = [r.split(",")[5] for r in (tmp_path / "single" / "metrics.csv").read_text().splitlines()[1:]]
    assert np.allclose([float(v) for v in val if v], [float(v) for v in ref if v], atol=1e-4)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_checkpoint_round_trip(arch, tmp_path):
    torch.manual_seed(0)
    model = build_model(arch, {**TINY[arch], "vocab_size": 256})
    save_checkpoint(tmp_path, 7, model)
    loaded, tokenizer, meta = model_from_checkpoint(tmp_path)
    assert meta["arch"] == arch and meta["step"] == 7 and tokenizer is not None
    ids = torch.randint(0, 256, (2, 9))
    assert torch.equal(model.eval()(ids), loaded(ids))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    model = build_model("xlstm", {**TINY["xlstm"], "vocab_size": 256})
    path = save_checkpoint(tmp_path, 1, model)
    blob = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="corrupt"):
        model_from_checkpoint(tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        model_from_checkpoint(tmp_path)


def test_crash_mid_write_keeps_latest(tmp_path, monkeypatch):
    model = build_model("lstm", {**TINY["lstm"], "vocab_size": 256})
    save_checkpoint(tmp_path, 1, model)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "st_save_model", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model)
    assert (tmp_path / "latest").read_text().strip() == "ckpt-000001"
    loaded, _, meta = model_from_checkpoint(tmp_path)
    assert meta["step"] == 1


def test_sampler_is_deterministic_and_sharded():
    tokens = np.arange(1000, dtype=np.uint16)
    one = BatchSampler(1000, 8, 6, seed=3)
    x, y = one.batch(tokens, 5)
    assert x.shape == (6, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, one.batch(tokens, 5)[0]) and not torch.equal(x, one.batch(tokens, 6)[0])
    shards = [BatchSampler(1000, 8, 6, seed=3, rank=r, world_size=2).batch(tokens, 5)[0] for r in range(2)]
    assert torch.equal(torch.cat(shards), x)
    with pytest.raises(UserError, match="larger than the training data"):
        BatchSampler(5, 8, 2, seed=0)


def test_schedule_warmup_and_cosine():
    s = CosineSchedule(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    assert s.lr_at(0) == 0.25 and s.lr_at(3) == 1.0
    assert abs(s.lr_at(9) - 0.55) < 1e-12 and abs(s.lr_at(14) - 0.1) < 1e-12
