"""The openxlstm command: smoke runs of train / generate / eval for each architecture, data formats, and
one-line errors (exit status 2, no traceback) for bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import TINY, tiny_args
from openxlstm.cli import main
from openxlstm.models import LANGUAGE_MODELS


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "xlstm"
    assert main(tiny_args("xlstm", corpus, out, extra=["--samples", "1", "--sample-tokens", "8"])) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(LANGUAGE_MODELS))
def test_every_architecture_trains_generates_and_evaluates(arch, corpus, tmp_path, capsys):
    """Every name ``train --arch`` offers: two steps from the command line, then generate and eval of the run."""
    out = tmp_path / arch
    assert main(tiny_args(arch, corpus, out, steps=2)) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--prompt", "def ", "--max-new-tokens", "6", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["eval", "--checkpoint", str(out), "--context", "16", "--max-tokens", "128"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[0] == "16"


def test_train_writes_everything(run, capsys):
    assert (run / "latest").is_file() and (run / "loss.png").stat().st_size > 1000
    assert (run / "metrics.csv").read_text().startswith("step,tokens")
    ckpt = run / (run / "latest").read_text().strip()
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "config.json", "trainer.pt"}
    assert json.loads((run / "summary.json").read_text())["val_bpb"] > 0


def test_generate_and_eval(run, capsys):
    assert main(["generate", "--checkpoint", str(run), "--prompt", "The", "--max-new-tokens", "5", "--seed", "1"]) == 0
    one = capsys.readouterr().out
    assert one.startswith("The") and main(["generate", "--checkpoint", str(run), "--prompt", "The",
                                           "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out == one
    assert main(["generate", "--checkpoint", str(run), "--prompt", "a", "--prompt", "bc", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 2
    assert main(["eval", "--checkpoint", str(run), "--context", "16,64", "--max-tokens", "256"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-3].split()[:2] == ["context", "tokens"] and table[-1].split()[0] == "64"


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_baselines_train_with_the_same_loop(arch, corpus, tmp_path):
    assert main(tiny_args(arch, corpus, tmp_path / arch)) == 0
    assert json.loads((tmp_path / arch / "summary.json").read_text())["arch"] == arch


def test_token_files(tmp_path):
    ids = np.random.default_rng(0).integers(0, 300, size=5000).astype(np.uint16)
    np.save(tmp_path / "tokens.npy", ids)
    assert main(tiny_args("lstm", tmp_path / "tokens.npy", tmp_path / "npy")) == 0
    ids.tofile(tmp_path / "tokens.bin")
    assert main(tiny_args("lstm", tmp_path / "tokens.bin", tmp_path / "bin")) == 0
    cfg = json.loads((tmp_path / "bin" / "ckpt-000004" / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == 300


def test_bpe_tokenizer(corpus, tmp_path):
    pytest.importorskip("tokenizers")
    assert main(tiny_args("transformer", corpus, tmp_path / "bpe", extra=["--tokenizer", "bpe:300"])) == 0
    assert (tmp_path / "bpe" / "ckpt-000004" / "tokenizer.json").is_file()
    assert main(["generate", "--checkpoint", str(tmp_path / "bpe"), "--prompt", "def", "--max-new-tokens", "3"]) == 0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "openxlstm", *args], capture_output=True, text=True, timeout=120)


def test_bad_input_is_one_line(run, corpus, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    bad_ckpt = tmp_path / "bad"
    bad_ckpt.mkdir()
    (bad_ckpt / "config.json").write_text("{broken")
    cases = [
        (["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"], "does not exist"),
        (["generate", "--checkpoint", str(bad_ckpt), "--prompt", "x"], "corrupt"),
        (["train", "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")], "no text found"),
        (tiny_args("xlstm", corpus, tmp_path / "o2", extra=["--seq-len", "10000000"]), "larger than"),
        (["train", "--config", json.dumps({**TINY["lstm"], "vocab_size": 1000}), "--arch", "lstm", "--data",
          str(corpus), "--out", str(tmp_path / "o3")], "vocab"),
        (["eval", "--checkpoint", str(run), "--context", "100000000"], "larger than"),
        (tiny_args("xlstm", corpus, tmp_path / "o4", extra=["--fsdp"]), "torchrun"),
        (tiny_args("xlstm", corpus, tmp_path / "o5", extra=["--compile", "nonsense"]), "backend"),
        (tiny_args("xlstm", corpus, tmp_path / "o6", extra=["--grad-accum", "3"]), "divisible"),
    ]
    for args, needle in cases:
        assert main(args) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (args, lines)
    proc = run_cli(*cases[1][0])  # a real process: one line on stderr, no traceback
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip()[7:]}"]
    assert "corrupt" in proc.stderr
