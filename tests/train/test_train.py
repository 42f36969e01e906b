"""Training: the engine (token-weighted accumulation, activation checkpointing, compile), exact resume, DDP on
2 processes equal to 1, accumulation, checkpoints, sampler, schedule. FSDP: test_fsdp.py."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import rel_err
from helpers import TINY, tiny_args, tiny_model
from openxlstm.cli import main
from openxlstm.data import BatchSampler
from openxlstm.errors import UserError
from openxlstm.models import build_model
from openxlstm.train import CosineSchedule, Engine, EngineConfig, TrainConfig, save_checkpoint, train
from openxlstm.io import run as ckpt_mod
from openxlstm.train import load_model as model_from_checkpoint


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
    assert not train(cfg(corpus, tmp_path / "part", stop_at=3), log=lambda m: None)["finished"]
    assert (tmp_path / "part" / "latest").read_text().strip() == "ckpt-000003"
    resumed = train(cfg(corpus, tmp_path / "part"), resume="auto", log=lambda m: None)
    assert resumed["val_loss"] == full["val_loss"] and resumed["finished"]
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


@pytest.mark.slow
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
    assert meta["arch"] == arch and meta["step"] == 7
    assert tokenizer is None and meta["tokenizer"] == {"type": "none", "vocab_size": 256}  # saved without one
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


def tiny_engine(arch, seed=0, **config):
    model = tiny_model(arch, seed).train()
    return Engine(model, CosineSchedule(lr=1e-2, min_lr=1e-3, warmup_steps=1, max_steps=4),
                  EngineConfig(device="cpu", **config))


def masked_batch(seed=0, rows=4, length=12):
    """(input_ids, labels) with -100 in a different number of places per row (row j scores j + 3 tokens)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (rows, length), generator=g)
    y = torch.randint(0, 64, (rows, length), generator=g)
    for j in range(rows):
        y[j, : length - (j + 3)] = -100
    return x, y


def test_engine_accumulation_weighs_tokens_not_micro_batches():
    """Micro-batches with different numbers of scored tokens: 2 accumulation steps follow one full batch (the
    loss is the mean over the global batch's scored tokens, not the mean of the micro-batch means)."""
    x, y = masked_batch()
    one, two = tiny_engine("transformer"), tiny_engine("transformer", grad_accum=2)
    for _ in range(3):
        assert abs(one.train_step(x, y) - two.train_step(x, y)) < 1e-6
    for (name, a), b in zip(one.model.named_parameters(), two.model.parameters()):
        assert rel_err(b, a) < 1e-5, name
    with torch.no_grad():
        full = tiny_engine("transformer").model(x, labels=y).loss
    assert abs(tiny_engine("transformer").evaluate([(x[:1], y[:1]), (x[1:], y[1:])]).loss - float(full)) < 1e-6


@pytest.mark.parametrize("arch", sorted(TINY))
def test_engine_activation_checkpointing_same_training(arch):
    """--activation-checkpointing reaches every architecture and trains exactly as without it."""
    x, y = masked_batch(1)
    plain, ckpt = tiny_engine(arch), tiny_engine(arch, activation_checkpointing=True)
    assert ckpt.model.activation_checkpointing and not plain.model.activation_checkpointing
    for _ in range(3):
        assert abs(plain.train_step(x, y) - ckpt.train_step(x, y)) < 1e-6
    for a, b in zip(plain.model.parameters(), ckpt.model.parameters()):
        assert rel_err(b, a) < 1e-5


def test_engine_accuracy_counts_scored_positions():
    x, y = masked_batch(2)
    engine = tiny_engine("lstm")
    logits = engine.model(x)
    hits = (logits.argmax(-1) == y)[y != -100]
    result = engine.evaluate([(x, y)], accuracy=True)
    assert result.tokens == int((y != -100).sum()) and result.accuracy == pytest.approx(float(hits.float().mean()))


def test_compile_checkpoints_the_bare_model_and_resumes(corpus, tmp_path):
    """--compile (the eager backend here: dynamo without code generation, for speed) trains as without it, saves
    the bare model's names (no ``_orig_mod.``) and resumes exactly; a bad backend is a one-line error."""
    kw = dict(max_steps=3, eval_every=3)
    full = train(cfg(corpus, tmp_path / "plain", **kw), log=lambda m: None)
    train(cfg(corpus, tmp_path / "part", stop_at=2, compile="eager", **kw), log=lambda m: None)
    assert not any("_orig_mod" in k for k in weights(tmp_path / "part"))
    resumed = train(cfg(corpus, tmp_path / "part", compile="eager", **kw), resume="auto", log=lambda m: None)
    assert abs(resumed["val_loss"] - full["val_loss"]) < 1e-6
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(rel_err(b[k], a[k]) < 1e-5 for k in a)
    with pytest.raises(UserError, match="not a torch.compile backend"):
        train(cfg(corpus, tmp_path / "bad", compile="nonsense", **kw), log=lambda m: None)
