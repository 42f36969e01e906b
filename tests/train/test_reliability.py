"""Reliability: every bad input a one-line error, runs never clobbered, resumes and checkpoints that
always work, results files that never count a broken row. Fast: tiny models, a few steps, in-process calls."""

import argparse
import csv
import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY, one_line_error, tiny_args, tiny_model
from openxlstm import cli, xLSTMConfig
from openxlstm.cli import build_parser, main, unescape
from openxlstm.errors import UserError
from openxlstm.models import build_model
from openxlstm.train import (CosineSchedule, Engine, EngineConfig, TrainConfig, load_model, resolve_checkpoint,
                             save_checkpoint)
from openxlstm.io import run as ckpt_mod
from openxlstm.train.rundir import RunLock
from openxlstm.baselines import LSTMConfig, TransformerConfig
from openxlstm.experiments import runner
from openxlstm.experiments.runner import CSV_FIELDS, CellSpec, append_result, read_results, run_grid
from openxlstm.models.xlstm_large import xLSTMLargeConfig


def grid_row(seed, score="0.5"):
    spec = asdict(CellSpec(task="parity", model="lstm", seed=seed, steps=3))
    return {**spec, "params": 10, "steps_done": 3, "final_loss": 0.7, "train_accuracy": 0.5, "accuracy": 0.5,
            "chance": 0.5, "scaled_accuracy": 0.0, "score": score, "seconds": 1.0, "finished_at": "2026-01-01T00:00:00",
            "status": "ok"}


def test_grid_results_count_only_whole_finite_rows(tmp_path):
    """A nan score without the "diverged" status (as versions before the status column wrote a diverged cell) and
    a row cut short by a crash are not results: a rerun runs them again, and a row appended after a cut line
    starts on a line of its own."""
    path = tmp_path / "results.csv"
    append_result(path, grid_row(0))
    append_result(path, grid_row(1, score="nan"))
    append_result(path, grid_row(2))
    text = path.read_text()
    path.write_text(text[: text.rindex("2026")])  # the last row cut mid-way, no newline
    assert [r["seed"] for r in read_results(path)] == ["0"]
    append_result(path, grid_row(3))
    assert [r["seed"] for r in read_results(path)] == ["0", "3"]
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == CSV_FIELDS and rows[-1][2] == "3" and len(rows[-1]) == len(CSV_FIELDS)
    data = path.read_bytes()
    assert data.endswith(b",ok\r\n")
    path.write_bytes(data[:-4])  # cut right after the comma before the status: not a result either
    assert [r["seed"] for r in read_results(path)] == ["0"]
    ablation = tmp_path / "ablation.csv"  # the ablation's CSV: its score is val_bpb
    ablation.write_text("model,val_bpb,finished_at\nlstm,2.5,t\nreslstm,nan,t\nxlstm,2.4,\n")
    assert [r["model"] for r in read_results(ablation)] == ["lstm"]


GRID_TINY = dict(width=16, steps=4, batch_size=8, train_max_len=6, test_min_len=7, test_max_len=9, eval_batches=1,
                 eval_batch_size=4)


def test_a_diverged_grid_cell_is_recorded_and_the_grid_goes_on(tmp_path, capsys):
    """A cell whose training loss becomes nan/inf (here: a learning rate of 1e10) is a row with status "diverged"
    (score nan, no accuracies); the grid trains the next cell, the table and heat-map say "diverged", and a rerun
    does not run it again. The same through the command line: exit status 0, the row written."""
    bad = CellSpec(task="parity", model="xlstm[0:1]", lr=1e10, **GRID_TINY)
    good = CellSpec(task="parity", model="xlstm[0:1]", **GRID_TINY)
    logs = []
    rows = run_grid([bad, good], tmp_path, log=logs.append)
    assert [r["status"] for r in rows] == ["diverged", "ok"]
    saved = read_results(tmp_path / "results.csv")
    assert [(float(r["lr"]), r["status"]) for r in saved] == [(1e10, "diverged"), (1e-3, "ok")]
    assert saved[0]["score"] == "nan" and saved[0]["accuracy"] == "" and int(saved[0]["steps_done"]) < 4
    assert math.isfinite(float(saved[1]["score"])) and int(saved[1]["steps_done"]) == 4
    assert any("diverged: the training loss is" in line for line in logs)
    table = (tmp_path / "results.md").read_text()
    assert "lr=10000000000.0" in table and "| diverged |" in table and (tmp_path / "heatmap.png").is_file()
    assert run_grid([bad, good], tmp_path, log=logs.append) == []  # a diverged cell is finished: not rerun
    assert any("2 cells, 2 already in" in line for line in logs)
    # several seeds: the diverged ones are counted, not averaged
    assert runner._cell_text([math.nan]) == "diverged"
    assert runner._cell_text([math.nan, math.nan]) == "diverged (n=2)"
    assert runner._cell_text([0.5, math.nan]) == "0.50 (1 diverged)"
    assert runner._cell_text([0.5, 0.7, math.nan]) == "0.60 ± 0.14, max 0.70 (n=2, 1 diverged)"
    out = tmp_path / "cli"
    args = ["experiment", "grid", "--tasks", "parity", "--models", "xlstm[0:1]", "--width", "16", "--steps", "4",
            "--batch-size", "8", "--train-max-len", "6", "--test-lengths", "7-9", "--eval-batches", "1",
            "--eval-batch-size", "4", "--lr", "1e10", "--out", str(out)]
    assert main(args) == 0
    assert [r["status"] for r in read_results(out / "results.csv")] == ["diverged"]
    assert "| xlstm[0:1] | diverged |" in (out / "results.md").read_text()
    capsys.readouterr()
    assert main(args) == 0 and "1 already in" in capsys.readouterr().out


def test_a_weight_gone_nan_is_divergence_too():
    """``fit_or_diverge``: a weight that is nan after training (every loss finite) is divergence as well."""
    model = runner.build_model("lstm", 8, width=8, num_blocks=1, context_length=8)
    engine = Engine(model, CosineSchedule(lr=1e-3, min_lr=1e-4, warmup_steps=1, max_steps=4),
                    EngineConfig(device="cpu"))
    batch = (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    logs = []
    assert runner.fit_or_diverge(engine, lambda step: batch, 1, log=logs.append) is not None
    train_step = engine.train_step

    def step_then_break(*args):  # the loss is finite, the update leaves a nan weight
        loss = train_step(*args)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
        return loss

    engine.train_step = step_then_break
    assert runner.fit_or_diverge(engine, lambda step: batch, 2, log=logs.append) is None
    assert "a weight is nan or inf at step 2" in logs[-1]


def test_old_grid_csv_without_status_is_read_and_upgraded(tmp_path):
    """A results.csv written before the status column: its finite rows are results ("ok"), its nan rows are not
    (they run again); resuming rewrites it with the column (the original kept as .bak, without replacing the
    .bak of an earlier upgrade)."""
    old_fields = [c for c in CSV_FIELDS if c != "status"]
    path = tmp_path / "results.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields)
        w.writeheader()
        for seed, score in ((0, "0.5"), (1, "nan")):
            w.writerow({k: v for k, v in grid_row(seed, score).items() if k in old_fields})
    assert [r["seed"] for r in read_results(path)] == ["0"] and "status" not in read_results(path)[0]
    assert runner.write_report(tmp_path, log=lambda _: None) is not None  # the report reads it as it is
    original = path.read_bytes()
    (tmp_path / "results.csv.bak").write_text("an earlier upgrade's backup\n")
    assert [r["status"] for r in runner.upgrade_results(path)] == ["ok"]
    assert (tmp_path / "results.csv.bak").read_text() == "an earlier upgrade's backup\n"
    assert (tmp_path / "results.csv.bak.1").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir() if "results.csv" in p.name) == [
        "results.csv", "results.csv.bak", "results.csv.bak.1"]
    with path.open(newline="") as f:
        assert next(csv.reader(f)) == CSV_FIELDS
    assert runner.upgrade_results(path)[0]["seed"] == "0"  # already upgraded: nothing rewritten
    assert not (tmp_path / "results.csv.bak.2").exists()


def test_a_diverged_ablation_rung_is_recorded_and_a_cut_line_is_not_joined(tmp_path):
    """ablation.csv: a rung that diverges is a row with status "diverged" (shown as such; not rerun), and a row
    appended after a last line cut short by a crash (no newline) starts on a line of its own (the grid's writer,
    ``results.append_row``)."""
    from openxlstm.experiments import ablation, results

    assert ablation.append_row is results.append_row and runner.append_row is results.append_row
    tiny = dict(width=16, num_blocks=2, seq_len=16, batch_size=2, steps=3, eval_tokens=64, max_bytes=200_000)
    logs = []
    rows = ablation.run_ablation(["xlstm[0:1]"], tmp_path, log=logs.append, lr=1e10, **tiny)
    assert [r["status"] for r in rows] == ["diverged"]
    rows = ablation.run_ablation(["lstm"], tmp_path, log=logs.append, **tiny)  # the ladder goes on
    assert [r["status"] for r in rows] == ["ok"]
    path = tmp_path / "ablation.csv"
    saved = read_results(path)
    assert [(r["model"], r["status"]) for r in saved] == [("xlstm[0:1]", "diverged"), ("lstm", "ok")]
    assert saved[0]["val_bpb"] == "nan" and "| diverged |" in (tmp_path / "ablation.md").read_text()
    assert ablation.run_ablation(["xlstm[0:1]"], tmp_path, log=logs.append, lr=1e10, **tiny) == []  # not rerun
    # a crash cut the last line short: the next row must not be glued to it
    text = path.read_bytes()
    path.write_bytes(text[:-12])  # mid-way through lstm's row, no newline at the end
    again = ablation.run_ablation(["lstm", "reslstm"], tmp_path, log=logs.append, **tiny)
    assert [r["model"] for r in again] == ["lstm", "reslstm"]  # lstm's row was cut: it runs again
    with path.open(newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ablation.CSV_FIELDS and all(len(line) == len(ablation.CSV_FIELDS) for line in lines[-2:])
    assert [r["model"] for r in read_results(path)] == ["xlstm[0:1]", "lstm", "reslstm"]


@pytest.mark.parametrize("make", [
    lambda **kw: xLSTMConfig(vocab_size=64, embedding_dim=32, num_blocks=2, slstm_at=[1], mlstm_num_heads=2,
                             slstm_num_heads=2, **kw),
    lambda **kw: LSTMConfig(**kw),
    lambda **kw: TransformerConfig(**kw),
    lambda **kw: xLSTMLargeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=2,
                                  **{"tie_word_embeddings" if "tie_weights" in kw else k: v for k, v in kw.items()}),
], ids=["xlstm", "lstm", "transformer", "xlstm-large"])
def test_config_booleans_are_strict(make):
    """tie_weights="no" is an error naming the field, not a truthy string that ties the weights."""
    for value in ("no", 0, "false"):
        with pytest.raises(ValueError, match=r"tie(_word_embeddings|_weights) must be true or false"):
            make(tie_weights=value)
    cfg = make(tie_weights=True)
    assert getattr(cfg, "tie_weights", getattr(cfg, "tie_word_embeddings", None)) is True


def test_config_numbers_are_strict():
    with pytest.raises(ValueError, match="dropout must be a finite number"):
        LSTMConfig(dropout=float("nan"))
    with pytest.raises(ValueError, match="embedding_dim must be an integer"):
        TransformerConfig(embedding_dim=64.0)
    with pytest.raises(ValueError, match="norm_eps must be a finite number"):
        xLSTMConfig(norm_eps=float("inf"))


# ---------------------------------------------------------------------------------------------------------
# runs: a tiny finished run, shared (never modified by the tests that use it)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "xlstm"
    assert main(tiny_args("xlstm", corpus, out)) == 0
    return out


@pytest.fixture(scope="module")
def id_run(tmp_path_factory):
    """A run on a token file of ids up to 299, without a tokenizer: a model of token ids."""
    root = tmp_path_factory.mktemp("ids")
    np.random.default_rng(0).integers(0, 300, size=4000).astype(np.uint16).tofile(root / "tokens.bin")
    assert main(tiny_args("lstm", root / "tokens.bin", root / "run")) == 0
    return root / "run"


def snapshot(directory) -> dict:
    """Every file under a directory with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def test_bad_input_is_one_line_naming_what_is_allowed(run, id_run, corpus, tmp_path, capsys):
    """The mistakes a user makes with each command: exit status 2 and one line that names the option (or file)
    and what it allows, no traceback."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "bad.csv").write_text("step,tokens,train_loss,val_loss\n10,abc,1.0,\n")
    (tmp_path / "badrun").mkdir()
    (tmp_path / "badrun" / "metrics.csv").write_text("step,tokens,train_loss,val_loss\n10,abc,1.0,\n")
    (tmp_path / "exists.png").write_bytes(b"png")
    tiny = tiny_args("xlstm", corpus, tmp_path / "new")
    gen = ["generate", "--checkpoint", str(run), "--prompt", "a"]
    cases = [
        (tiny + ["--lr", "nan"], "--lr: expected a number > 0"),
        (tiny + ["--seed", "-1"], "--seed: expected an integer in [0,"),
        (tiny + ["--bin-dtype", "foo"], "--bin-dtype: invalid choice: 'foo' (choose from 'uint8'"),
        (tiny + ["--device", "mps"], "--device: expected auto, cpu, cuda or cuda:N"),
        (tiny + ["--max-steps", "0"], "--max-steps: expected an integer >= 1"),
        (tiny + ["--val-fraction", "1.5"], "--val-fraction: expected a number in (0, 1)"),
        (tiny + ["--out", str(tmp_path / "file")], "is a file"),
        (["train", "--arch", "lstm", "--config", json.dumps({**TINY["lstm"], "tie_weights": "no"}), "--data",
          str(corpus), "--out", str(tmp_path / "t")], "tie_weights must be true or false"),
        (gen + ["--temperature", "nan"], "--temperature: expected a number >= 0"),
        (gen + ["--top-p", "0"], "--top-p: expected a number in (0, 1]"),
        (gen + ["--top-k", "0"], "--top-k: expected an integer >= 1"),
        (gen + ["--max-new-tokens", "-1"], "--max-new-tokens: expected an integer >= 0"),
        (gen + ["--stop", ""], "--stop is empty"),
        (gen + ["--stop", "\\U00110000"], "--stop '\\\\U00110000': invalid escape"),
        (["generate", "--checkpoint", str(run), "--prompt", "caf\udce9"], "not UTF-8"),
        (["generate", "--checkpoint", str(id_run), "--prompt", "hello"], "this model reads token ids"),
        (["generate", "--checkpoint", str(id_run), "--prompt", "1 2 300"], "outside the model's vocabulary of 300"),
        (["generate", "--checkpoint", str(id_run), "--prompt", "1", "--stop", "x"], "--stop needs a tokenizer"),
        (["eval", "--checkpoint", str(run), "--context", "abc"], "comma-separated integers"),
        (["eval", "--checkpoint", str(run), "--max-tokens", "0"], "--max-tokens: expected an integer >= 1"),
        (["eval", "--checkpoint", str(id_run), "--data", str(corpus)], "--data must be a token file"),
        (["plot", str(tmp_path / "badrun"), "--out", str(tmp_path / "p.png")], "line 2: not a row of numbers"),
        (["plot", str(run), "--out", str(tmp_path / "exists.png")], "exists; add --overwrite"),
        (["plot", str(run), "--out", str(tmp_path / "p.bmpx")], "must end in .png"),
        (["plot", str(tmp_path), "--out", str(tmp_path / "p.png")], "has no metrics.csv"),
        (["experiment", "grid", "--log-every", "0", "--out", str(tmp_path / "g")], "argument --log-every: expected an integer >= 1"),
        (["experiment", "grid", "--lr", "nan", "--out", str(tmp_path / "g")], "--lr: expected a number > 0"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ]
    for args, needle in cases:
        assert main(args) == 2, args
        one_line_error(capsys, needle)
    assert not (tmp_path / "g").exists()


def test_wordlevel_tokenizer_without_unknown_token(corpus, tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"the": 0, "fox": 1}))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "wl.json"))
    assert main(tiny_args("lstm", corpus, tmp_path / "o", extra=["--tokenizer", str(tmp_path / "wl.json")])) == 2
    one_line_error(capsys, "needs an unknown token (unk_token)")
    from openxlstm.data.tokenizer import HFTokenizer

    def fails_without_message(text):
        raise Exception()

    with pytest.raises(UserError, match=r"cannot encode this text \(Exception\)"):  # not an IndexError
        HFTokenizer._run(fails_without_message, "x")


def test_train_config_checks_every_field():
    """The Python API checks what the command line checks, naming the option."""
    for field, value, needle in [("lr", float("nan"), "--lr must be a number > 0"), ("seed", -1, "--seed"),
                                 ("bin_dtype", "foo", "--bin-dtype must be one of uint8"),
                                 ("device", "mps", "--device must be auto, cpu, cuda or cuda:N"),
                                 ("progress", "no", "--progress must be true or false"),
                                 ("min_lr", 1.0, "--min-lr 1 is above --lr")]:
        with pytest.raises(UserError, match=needle):
            TrainConfig(**{field: value})


def test_help_of_every_option(capsys):
    """Every option of train, generate, eval and plot says what it does and its default; the experiment
    commands' options show their defaults."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("train", "generate", "eval", "plot"):
        for action in sub.choices[name]._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = action.help or ""
            assert len(text) > 10, (name, action.dest)
            assert "default" in text or action.required or action.default not in (None, False), (name, action.dest)
        if name == "generate":
            assert "(default: 200)" in sub.choices[name].format_help()
    grid = sub.choices["experiment"]._actions[-1].choices["grid"].format_help()
    assert "--eval-batch-size EVAL_BATCH_SIZE\n                        sequences per test batch (default: 64)" in grid


def _options_without_help(parser: argparse.ArgumentParser) -> list[str]:
    """The options of ``parser`` (but -h) whose help, as ``--help`` shows it, does not say what the option does
    (a few words besides the default) and its default ("default" in the text; a required option: "required")."""
    formatter = parser._get_formatter()
    bad = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        what = re.sub(r"\(?(the )?default[^)]*\)?", "", (action.help or "").replace("%(default)s", ""))
        shown = formatter._expand_help(action) if action.help else ""
        says_default = "default" in shown.lower() or (action.required and "required" in shown.lower())
        if len(what.split()) < 2 or not says_default:
            bad.append(f"{parser.prog.split()[-1]} {action.option_strings[-1]}")
    return bad


def test_every_experiment_option_says_what_it_does_and_its_default(capsys):
    """``openxlstm experiment <name> --help`` for every experiment subcommand: each option has a help text that
    says what it does and its default (argparse's %(default)s, which the help formatter adds when the text does
    not mention a default, or in words: an option whose default is None or off must say it)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    experiment = sub.choices["experiment"]
    names = next(a for a in experiment._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"grid", "ablation", "lra", "speed", "scaling", "report"} <= set(names)
    offending = []
    for name, p in names.items():
        offending += _options_without_help(p)
        with pytest.raises(SystemExit):  # --help itself renders (no stray % in a help text)
            main(["experiment", name, "--help"])
        assert "--out" in capsys.readouterr().out
    assert offending == []
    # the check fails where it should: no help, a bare default, a default of None not said in words
    probe = cli._Parser(prog="openxlstm experiment probe")
    probe.add_argument("--bare", type=int, default=3)
    probe.add_argument("--silent", type=int, default=None, help="stop after this many minutes")
    probe.add_argument("--flag", action="store_true", help="turn something on")
    probe.add_argument("--out", required=True, help="output folder")
    probe.add_argument("--fine", type=int, default=3, help="number of things")
    assert _options_without_help(probe) == ["probe --bare", "probe --silent", "probe --flag", "probe --out"]


# ---------------------------------------------------------------------------------------------------------
# run directories: never clobbered, one run at a time, finished runs left alone
# ---------------------------------------------------------------------------------------------------------
def test_a_fresh_run_never_overwrites(run, corpus, tmp_path, capsys):
    """Into a directory holding a run: refused (nothing changed) unless --resume or --overwrite; --overwrite
    replaces the run's own files and leaves the user's; a directory of other files is refused."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = snapshot(out)
    assert main(tiny_args("xlstm", corpus, out)) == 2
    one_line_error(capsys, "already holds a run (ckpt-000004, latest, loss.png, metrics.csv, ...): continue it with "
                           "--resume, replace it with --overwrite")
    assert snapshot(out) == before
    (out / "notes.txt").write_text("mine")
    (out / "ckpt-000002").mkdir()  # an older checkpoint of that run: replaced too
    assert main(tiny_args("xlstm", corpus, out, steps=2, extra=["--overwrite"])) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "latest").read_text().strip() == "ckpt-000002"
    assert not (out / "ckpt-000004").exists() and json.loads((out / "summary.json").read_text())["steps"] == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("x")
    assert main(tiny_args("xlstm", corpus, other)) == 2
    one_line_error(capsys, "is not empty (data.txt): a run needs a new or empty directory")


def test_resuming_a_finished_run_changes_nothing(run, capsys):
    before = snapshot(run)
    assert main(["train", "--resume", "--out", str(run)]) == 0
    assert "is at step 4, --max-steps 4 reached: nothing to do, nothing changed" in capsys.readouterr().out
    assert main(["train", "--resume", "--out", str(run), "--stop-at", "2"]) == 0
    assert "--stop-at 2 reached" in capsys.readouterr().out
    assert snapshot(run) == before and not (run / ".lock").exists()


def test_run_lock(run, corpus, tmp_path, capsys):
    """A second run in a directory in use is refused; the lock of a process that died is taken over."""
    out = tmp_path / "run"
    lock = RunLock(out).acquire()
    try:
        assert main(tiny_args("xlstm", corpus, out)) == 2
        one_line_error(capsys, f"is in use by process {os.getpid()} on ")
    finally:
        lock.release()
    holder = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
              "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'process 1'); os._exit(0)")
    subprocess.run([sys.executable, "-c", holder, str(out / ".lock")], check=True)  # dies holding it
    assert (out / ".lock").read_text() == "process 1"
    assert main(tiny_args("xlstm", corpus, out, steps=2)) == 0
    assert not (out / ".lock").exists()


def test_resume_from_an_older_checkpoint_needs_overwrite(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    shutil.copytree(out / "ckpt-000004", out / "ckpt-000002")
    cfg = json.loads((out / "ckpt-000002" / "config.json").read_text())
    (out / "ckpt-000002" / "config.json").write_text(json.dumps({**cfg, "step": 2}))
    before = snapshot(out)
    assert main(["train", "--resume", str(out / "ckpt-000002"), "--max-steps", "5"]) == 2
    one_line_error(capsys, "resuming from ckpt-000002 would replace the later checkpoints of")
    assert snapshot(out) == before


def test_leftovers_of_a_crash_are_cleaned_on_resume(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / ".ckpt-000006.tmp").mkdir()
    (out / ".latest.tmp-12345").write_text("ckpt-000006\n")
    (out / ".loss.png.tmp-12345.png").write_bytes(b"half an image")
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "5", "--save-every", "5"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert (out / "latest").read_text().strip() == "ckpt-000005"


# ---------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------
def tiny_lstm():
    return tiny_model("lstm").train()


def test_latest_names_a_whole_checkpoint_at_every_moment(tmp_path, monkeypatch):
    """Saving a step again (its checkpoint already there and named by latest): after every rename and removal,
    latest resolves to a complete checkpoint; nothing temporary is left."""
    model = tiny_lstm()
    save_checkpoint(tmp_path, 3, model)
    seen = []

    def check():
        ckpt = resolve_checkpoint(tmp_path)
        assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
        seen.append(ckpt.name)

    real_replace, real_rmtree = os.replace, shutil.rmtree
    monkeypatch.setattr(ckpt_mod.os, "replace", lambda a, b: (real_replace(a, b), check()))
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", lambda p, **kw: (real_rmtree(p, **kw), check()))
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    save_checkpoint(tmp_path, 3, model)
    assert ".ckpt-000003.prev" in seen and seen[-1] == "ckpt-000003"
    loaded, _, _ = load_model(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000003", "latest"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_disk_full_or_forbidden_is_one_line_and_keeps_the_last_checkpoint(corpus, tmp_path, monkeypatch, capsys, code):
    out = tmp_path / "run"
    assert main(tiny_args("xlstm", corpus, out, steps=2)) == 0
    before = snapshot(out)

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(out / ".ckpt-000003.tmp" / "model.safetensors"))

    monkeypatch.setattr(ckpt_mod, "st_save_model", full)
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "3", "--save-every", "1"]) == 2
    line = one_line_error(capsys, f"cannot write checkpoint 3 into {str(out)!r}: {os.strerror(code)}")
    assert "nothing written before was changed" in line
    assert (out / "latest").read_text().strip() == "ckpt-000002" and not list(out.glob(".ckpt-*"))
    assert {k: v for k, v in snapshot(out).items() if k.startswith("ckpt-")} == \
           {k: v for k, v in before.items() if k.startswith("ckpt-")}


def test_an_edited_config_is_noticed(run, tmp_path, capsys):
    """config.json changed after saving (an activation: no weight shape shows it) is an error, not another model."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    path = out / "ckpt-000004" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["model"]["ffn_activation"] = "relu"
    path.write_text(json.dumps(cfg))
    assert main(["generate", "--checkpoint", str(out), "--prompt", "a", "--max-new-tokens", "1"]) == 2
    one_line_error(capsys, "config.json was changed after the weights were saved (ffn_activation: 'relu' in "
                           "config.json, 'gelu' when saved)")


@pytest.mark.parametrize("content", [[1, 2], {"step": "x"}, {"step": 4, "rng": {}}])
def test_a_malformed_trainer_state_is_one_line(run, tmp_path, capsys, content):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    torch.save(content, out / "ckpt-000004" / "trainer.pt")
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "5"]) == 2
    one_line_error(capsys, "is corrupt: trainer.pt")


def test_a_corrupt_latest_pointer(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "latest").write_text("../../etc\n")
    assert main(["eval", "--checkpoint", str(out)]) == 2
    one_line_error(capsys, "the 'latest' pointer is corrupt")


# ---------------------------------------------------------------------------------------------------------
# models of token ids, stop strings, the progress bar
# ---------------------------------------------------------------------------------------------------------
def test_token_file_runs_read_and_write_ids(id_run, capsys):
    """A token-file run records that it has no tokenizer (and its vocabulary); generate takes and prints ids,
    eval scores ids above 255."""
    meta = json.loads((id_run / "ckpt-000004" / "config.json").read_text())
    assert meta["tokenizer"] == {"type": "none", "vocab_size": 300}
    assert main(["generate", "--checkpoint", str(id_run), "--prompt", "1 2 299", "--max-new-tokens", "4",
                 "--seed", "0"]) == 0
    ids = [int(t) for t in capsys.readouterr().out.split()]
    assert ids[:3] == [1, 2, 299] and len(ids) == 7 and max(ids) < 300
    assert main(["eval", "--checkpoint", str(id_run), "--context", "16", "--max-tokens", "64"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[:2] == ["16", "64"]


def test_stop_escapes_are_read(run, monkeypatch):
    r"""--stop "\n\n" (the docs' example) stops at a blank line, not at the four characters."""
    assert unescape(r"\n\n", "--stop") == "\n\n" and unescape(r"a\tb\\n\x41é", "--stop") == "a\tb\\nAé"
    seen = {}

    def fake_generate(model, prompt, **kw):
        seen.update(kw)
        return ""

    monkeypatch.setattr(cli, "generate", fake_generate)
    assert main(["generate", "--checkpoint", str(run), "--prompt", "a", "--stop", r"\n\n"]) == 0
    assert seen["stop"] == "\n\n"


def test_the_finished_progress_bar_is_printed_once(capsys):
    """With a progress bar, the last row (with its validation) comes after the finished bar, which is not
    drawn again after it."""
    engine = Engine(tiny_lstm(), CosineSchedule(1e-3, 1e-4, 1, 4), EngineConfig(device="cpu"))
    batch = (torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    engine.fit(lambda step: batch, 4, eval_every=2, evaluate=lambda: {"val_loss": 1.0}, progress=True,
               log=lambda msg: print(msg, file=sys.stderr))
    err = capsys.readouterr().err
    assert "step 4/4" in err and "4/4 [" not in err[err.index("step 4/4"):]
