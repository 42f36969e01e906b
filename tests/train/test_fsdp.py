"""FSDP2 (``openxlstm train --fsdp`` under torchrun) on CPU with gloo: 2 processes follow the losses of one,
and sharded (DCP) checkpoints resume on another number of processes, sharded or not."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from helpers import tiny_args
from openxlstm.cli import main
from openxlstm.train import load_model

pytestmark = pytest.mark.slow  # subprocesses or compilation: tens of seconds

STEPS = 4


def args(corpus, out, *extra):
    # 33 validation windows: the processes evaluate unequal numbers of batches (FSDP must still gather alike)
    return tiny_args("xlstm", corpus, out, steps=STEPS, extra=["--log-every", "1", "--eval-tokens", "528", *extra])


def torchrun(nproc, cli_args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "openxlstm", *cli_args], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def losses(run) -> dict:
    """{step: (train loss, validation loss or None)} from a run's metrics.csv."""
    rows = [r.split(",") for r in (Path(run) / "metrics.csv").read_text().splitlines()[1:]]
    return {int(r[0]): (float(r[4]), float(r[5]) if r[5] else None) for r in rows}


def assert_close(run, ref, steps):
    got, want = losses(run), losses(ref)
    for s in steps:
        assert abs(got[s][0] - want[s][0]) < 1e-4, (s, got[s], want[s])
        if want[s][1] is not None:
            assert abs(got[s][1] - want[s][1]) < 1e-4, (s, got[s], want[s])


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """One process, uninterrupted; 2 FSDP processes stopped at step 2 (a sharded checkpoint)."""
    root = tmp_path_factory.mktemp("fsdp")
    assert main(args(corpus, root / "single")) == 0
    torchrun(2, args(corpus, root / "fsdp2", "--fsdp", "--stop-at", "2"))
    return root


def test_fsdp_two_processes_equal_one(runs):
    assert_close(runs / "fsdp2", runs / "single", [1, 2])
    ckpt = runs / "fsdp2" / "ckpt-000002"
    assert json.loads((ckpt / "config.json").read_text())["weights"] == "dcp"
    assert not (ckpt / "model.safetensors").exists()
    assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_fsdp_checkpoint_resumes_on_one_process(runs, tmp_path):
    """Saved by 2 FSDP processes, resumed by one plain process: the losses of the uninterrupted run; the
    sharded weights also load for generation / evaluation."""
    shutil.copytree(runs / "fsdp2", tmp_path / "run")
    model, _, meta = load_model(tmp_path / "run")
    assert meta["step"] == 2 and model.num_params() > 0
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--no-progress"]) == 0  # its saved settings
    assert_close(tmp_path / "run", runs / "single", [3, 4])
    ids = torch.randint(0, 256, (1, 8))
    final, _, _ = load_model(tmp_path / "run")
    reference, _, _ = load_model(runs / "single")
    assert rel_err(final(ids), reference(ids)) <= 1e-5  # 2e-6 measured: gradient reduction order through AdamW


def test_fsdp_checkpoint_resumes_on_other_process_counts(runs, corpus, tmp_path):
    """2 FSDP processes -> 1 FSDP process (step 3, a checkpoint sharded once) -> 2 FSDP processes (step 4)."""
    shutil.copytree(runs / "fsdp2", tmp_path / "run")
    torchrun(1, args(corpus, tmp_path / "run", "--fsdp", "--resume", "--stop-at", "3"))
    assert sorted(p.name for p in (tmp_path / "run" / "ckpt-000003" / "dcp").iterdir()) == [".metadata", "__0_0.distcp"]
    torchrun(2, args(corpus, tmp_path / "run", "--fsdp", "--resume"))
    assert_close(tmp_path / "run", runs / "single", [3, 4])


def test_fsdp_init_from_a_pretrained_run(runs, corpus, tmp_path):
    """train --init DIR --fsdp: only the main process reads DIR (the others build the model on the meta device
    and get their shards from it); the 2 processes follow one process's --init run."""
    init = ["train", "--init", str(runs / "single"), "--data", str(corpus), "--max-steps", "2", "--batch-size", "4",
            "--seq-len", "16", "--eval-every", "2", "--eval-tokens", "528", "--warmup", "1", "--samples", "0",
            "--log-every", "1", "--no-progress"]
    assert main([*init, "--out", str(tmp_path / "one")]) == 0
    torchrun(2, [*init, "--out", str(tmp_path / "two"), "--fsdp"])
    assert_close(tmp_path / "two", tmp_path / "one", [1, 2])
    first = losses(tmp_path / "one")[1][0]
    assert first < losses(runs / "single")[1][0]  # it starts from the trained weights, not a fresh init
