"""Experiments: every generator's labels against a brute-force computation; tiny end-to-end grids."""

from collections import Counter

import pytest
import torch

from openxlstm.experiments import IGNORE, TASKS, MQARTask, build_model, get_task
from openxlstm.experiments.ablation import ablation_table, run_ablation
from openxlstm.cli import main as openxlstm_main
from openxlstm.models import arch_of


def cli_main(args):
    return openxlstm_main(["experiment", *args])
from openxlstm.experiments.formal import CYCLE, MOD, OPS
from openxlstm.experiments.runner import grid_specs, read_results, run_grid, write_report

LENGTHS = (1, 2, 3, 8, 41)


def _even_pairs(s):
    pairs = sum(1 for i in range(len(s) - 1) if s[i : i + 2] in ("ab", "ba"))
    return int(pairs % 2 == 0)


def _cycle(moves):
    pos = 0
    for m in moves:
        pos = {0: pos, 1: (pos + 1) % CYCLE, 2: (pos - 1) % CYCLE}[m]
    return pos


def _mod_arith(x):
    expr = "".join(str(t) if t < MOD else OPS[t - MOD] for t in x)
    return eval(expr) % MOD  # Python's precedence and floor modulo: the brute-force reference


def _majority(x):
    counts = Counter(x).most_common()
    assert len(counts) == 1 or counts[0][1] > counts[1][1], "ties must be redrawn"
    return counts[0][0]


BRUTE = {
    "parity": lambda x: [sum(x) % 2],
    "even_pairs": lambda x: [_even_pairs("".join("ab"[t] for t in x))],
    "cycle_nav": lambda x: [_cycle(x)],
    "mod_arith": lambda x: [_mod_arith(x)],
    "majority": lambda x: [_majority(x)],
    "bucket_sort": sorted,
    "repetition": list,
}


def test_every_task_has_a_brute_force_check():
    assert set(BRUTE) == set(TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("n", LENGTHS)
def test_formal_labels_match_brute_force(name, n):
    task = get_task(name)
    tokens, targets = task.sample(256, n, torch.Generator().manual_seed(n))
    assert tokens.shape == targets.shape and tokens.dtype == targets.dtype == torch.int64
    m = int((targets != IGNORE).sum(1)[0])
    n_in = n - 1 + n % 2 if name == "mod_arith" else n  # an expression has an odd number of tokens
    if task.sequence_output:
        assert m == n_in and tokens.shape[1] == 2 * n_in
    else:
        assert m == 1 and tokens.shape[1] == n_in
    for row_tokens, row_targets in zip(tokens.tolist(), targets.tolist()):
        x = row_tokens[:n_in]
        assert all(0 <= t < task.num_symbols for t in x)
        if task.sequence_output:
            assert row_tokens[n_in:] == [task.sep] + [task.blank] * (n_in - 1)
        assert row_targets[:-m] == [IGNORE] * (len(row_tokens) - m)
        assert row_targets[-m:] == list(BRUTE[name](x))
        assert all(0 <= y < task.num_classes for y in row_targets[-m:])


def _brute_or_ignore(name, prefix):
    if name == "mod_arith" and len(prefix) % 2 == 0:
        return IGNORE  # an expression ending in an operator has no value
    if name == "majority":
        counts = Counter(prefix).most_common()
        if len(counts) > 1 and counts[0][1] == counts[1][1]:
            return IGNORE
    return BRUTE[name](prefix)[0]


@pytest.mark.parametrize("name", [t for t in sorted(TASKS) if not TASKS[t].sequence_output])
def test_formal_prefix_labels_match_brute_force(name):
    """Dense supervision: the target at input position t is the label of x_1 .. x_t."""
    task = get_task(name)
    tokens, targets = task.sample(64, 13, torch.Generator().manual_seed(1), prefix_labels=True)
    plain_tokens, plain_targets = task.sample(64, 13, torch.Generator().manual_seed(1))
    assert torch.equal(tokens, plain_tokens) and torch.equal(targets[:, -1], plain_targets[:, -1])
    for x, row_targets in zip(tokens.tolist(), targets.tolist()):
        assert row_targets == [_brute_or_ignore(name, x[: t + 1]) for t in range(len(x))]


def test_formal_labels_are_balanced_enough_to_learn():
    """Both parity classes and every cycle position occur."""
    for name in ("parity", "cycle_nav", "mod_arith"):
        task = get_task(name)
        _, targets = task.sample(512, 20, torch.Generator().manual_seed(0))
        assert set(targets[:, -1].tolist()) == set(range(task.num_classes))


def test_formal_bad_input():
    with pytest.raises(ValueError, match="unknown formal-language task"):
        get_task("palindrome")
    with pytest.raises(ValueError, match="positive integer"):
        get_task("parity").sample(4, 0, torch.Generator())


@pytest.mark.parametrize("context,pairs,vocab", [(64, 8, 64), (16, 4, 16), (40, 1, 8)])
def test_mqar_labels_match_brute_force(context, pairs, vocab):
    task = MQARTask(context=context, num_pairs=pairs, vocab_size=vocab)
    tokens, targets = task.sample(128, torch.Generator().manual_seed(context))
    assert tokens.shape == targets.shape == (128, context)
    k_lo, k_hi = task.key_range
    v_lo, v_hi = task.value_range
    for row, tgt in zip(tokens.tolist(), targets.tolist()):
        memory = {}
        for j in range(pairs):
            key, value = row[2 * j], row[2 * j + 1]
            assert k_lo <= key < k_hi and v_lo <= value < v_hi and key not in memory
            memory[key] = value
        queried = [p for p, t in enumerate(tgt) if t != IGNORE]
        assert sorted(row[p] for p in queried) == sorted(memory)  # every key asked once
        for p in queried:
            assert p >= 2 * pairs and tgt[p] == memory[row[p]] and row[p + 1] == memory[row[p]]
        others = set(range(2 * pairs, context)) - set(queried) - {p + 1 for p in queried}
        assert all(row[p] == 0 for p in others)


def test_mqar_bad_input():
    with pytest.raises(ValueError, match="at least 4"):
        MQARTask(context=16, num_pairs=8)
    with pytest.raises(ValueError, match="distinct keys"):
        MQARTask(context=64, num_pairs=8, vocab_size=16)


def test_zoo_names_build_registered_models():
    """The zoo's names are aliases of the registry: each builds a registered architecture (whose contract
    tests/models/test_contract.py checks)."""
    assert {arch_of(build_model(name, 11, width=32)) for name in ("xlstm[1:1]", "lstm", "reslstm", "transformer")} == \
        {"xlstm", "lstm", "reslstm", "transformer"}


def test_zoo_block_layout():
    assert build_model("xLSTM[1:1]", 4).config.slstm_at == [1]
    assert build_model("xlstm[0:1]", 4).config.slstm_at == [0, 1]
    assert build_model("xlstm[1:0]", 4).config.slstm_at == []
    with pytest.raises(ValueError, match="unknown model"):
        build_model("mamba", 4)


TINY = dict(width=16, steps=3, batch_size=8, train_max_len=6, test_min_len=7, test_max_len=9, eval_batches=1,
            eval_batch_size=4, mqar_context=16, mqar_pairs=2, mqar_vocab=16)


def test_tiny_grid_end_to_end_and_resume(tmp_path):
    """One task per model (parity for all five, MQAR for one), then a rerun that skips them all."""
    models = ["xlstm[1:0]", "xlstm[0:1]", "xlstm[1:1]", "lstm", "transformer"]
    specs = grid_specs(["parity"], models, [0], **TINY) + grid_specs(["mqar"], ["xlstm[1:0]"], [0], **TINY)
    logs = []
    rows = run_grid(specs, tmp_path, log=logs.append)
    assert len(rows) == 6
    saved = read_results(tmp_path / "results.csv")
    assert [(r["task"], r["model"]) for r in saved] == [(s.task, s.model) for s in specs]
    for r in saved:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and int(r["steps_done"]) == 3
    table = (tmp_path / "results.md").read_text()
    for m in models:
        assert f"| {m} |" in table
    assert "parity" in table and "mqar(T=16,N=2,V=16)" in table
    assert (tmp_path / "heatmap.png").stat().st_size > 1000
    assert run_grid(specs, tmp_path, log=logs.append) == []  # resumed: nothing left to run
    more = run_grid(grid_specs(["parity"], ["xlstm[1:0]"], [1], **TINY), tmp_path, log=logs.append)
    assert len(more) == 1 and len(read_results(tmp_path / "results.csv")) == 7
    assert "(n=2)" in (tmp_path / "results.md").read_text()
    assert write_report(tmp_path, log=logs.append, aggregate="max") is not None


def test_cli_grid_report_and_errors(tmp_path, capsys):
    out = str(tmp_path / "g")
    args = ["grid", "--tasks", "even_pairs", "--models", "xlstm[1:1]", "--width", "16", "--steps", "2",
            "--batch-size", "4", "--train-max-len", "5", "--test-lengths", "6-8", "--eval-batches", "1",
            "--eval-batch-size", "4", "--out", out]
    assert cli_main(args) == 0
    assert cli_main(["report", "--out", out, "--aggregate", "max"]) == 0
    assert "| xlstm[1:1] |" in capsys.readouterr().out
    assert cli_main(["grid", "--tasks", "palindrome", "--out", out]) == 2
    assert cli_main(["grid", "--tasks", "mqar", "--mqar-context", "8", "--out", out]) == 2
    assert cli_main(["grid", "--test-lengths", "9", "--out", out]) == 2
    assert "error:" in capsys.readouterr().err


def test_main_cli_runs_experiments(tmp_path, capsys):
    """``openxlstm experiment ...`` is the same command as ``python -m openxlstm.experiments ...``."""
    from openxlstm.cli import main as openxlstm_main

    out = str(tmp_path / "g")
    args = ["experiment", "grid", "--tasks", "parity", "--models", "xlstm[0:1]", "--width", "16", "--steps", "2",
            "--batch-size", "4", "--train-max-len", "5", "--test-lengths", "6-8", "--eval-batches", "1",
            "--eval-batch-size", "4", "--out", out]
    assert openxlstm_main(args) == 0
    assert read_results(tmp_path / "g" / "results.csv")[0]["model"] == "xlstm[0:1]"
    assert "| xlstm[0:1] |" in (tmp_path / "g" / "results.md").read_text()
    assert openxlstm_main(["experiment", "grid", "--width", "0", "--out", out]) == 2
    assert "argument --width: expected an integer >= 1" in capsys.readouterr().err


def test_tiny_ablation(tmp_path):
    rows = run_ablation(["lstm", "reslstm", "xlstm[0:1]", "xlstm[7:1]"], tmp_path, log=lambda _: None,
                        width=16, num_blocks=2, seq_len=16, batch_size=2, steps=2, eval_tokens=64,
                        max_bytes=200_000)
    assert [r["model"] for r in rows] == ["lstm", "reslstm", "xlstm[0:1]", "xlstm[7:1]"]
    for r in rows:
        assert 0.0 < r["val_bpb"] < 12.0
    table = (tmp_path / "ablation.md").read_text()
    assert "+ matrix memory" in table and table.count("\n|") == 6
    assert ablation_table(read_results(tmp_path / "ablation.csv")) in table
    again = run_ablation(["lstm"], tmp_path, log=lambda _: None, width=16, num_blocks=2, seq_len=16, batch_size=2,
                         steps=2, eval_tokens=64, max_bytes=200_000)
    assert again == []  # resumed: the rung is already in ablation.csv


def test_lr_schedules(tmp_path, monkeypatch):
    """``--schedule``: the training loop's warm-up (5%), then cosine to 10% of the lr or constant; it reaches
    the optimizer and the CSV."""
    from openxlstm.experiments import runner
    from openxlstm.experiments.runner import CellSpec, lr_schedule

    for schedule in ("cosine", "constant"):
        assert lr_schedule(1.0, 100, schedule).lr_at(0) == pytest.approx(0.2)  # warm-up: 5 steps
        assert lr_schedule(1.0, 100, schedule).lr_at(4) == pytest.approx(1.0)
    assert lr_schedule(1.0, 100, "cosine").lr_at(99) == pytest.approx(0.1, abs=1e-3)
    assert lr_schedule(1.0, 100, "cosine").lr_at(50) < 1.0
    assert all(lr_schedule(1.0, 100, "constant").lr_at(s) == 1.0 for s in range(5, 100))
    with pytest.raises(ValueError, match="schedule"):
        lr_schedule(1.0, 100, "linear")
    with pytest.raises(ValueError, match="schedule"):
        CellSpec(task="parity", model="lstm", schedule="linear")

    seen = []

    def spy(*args):
        sched = lr_schedule(*args)
        apply = sched.apply
        sched.apply = lambda opt, step: seen.append((step, apply(opt, step), opt.param_groups[0]["lr"]))
        return sched

    monkeypatch.setattr(runner, "lr_schedule", spy)
    out = str(tmp_path / "g")
    args = ["grid", "--tasks", "parity", "--models", "lstm", "--width", "8", "--steps", "3", "--batch-size", "4",
            "--train-max-len", "5", "--test-lengths", "6-8", "--eval-batches", "1", "--eval-batch-size", "4",
            "--lr", "0.01", "--out", out]
    assert cli_main(args + ["--schedule", "constant"]) == 0
    assert seen == [(s, 0.01, 0.01) for s in range(3)]  # warm-up of 1 step, then constant, set on the optimizer
    assert cli_main(args) == 0  # the default, cosine, is another cell in the same CSV
    assert [r["schedule"] for r in read_results(tmp_path / "g" / "results.csv")] == ["constant", "cosine"]
    assert "schedule=constant" in (tmp_path / "g" / "results.md").read_text()
    assert cli_main(args + ["--schedule", "linear"]) == 2  # a one-line error, exit status 2


def test_old_results_folder_is_upgraded_and_resumed(tmp_path):
    """A results.csv written before a spec column existed gets the column's default and still resumes."""
    import csv

    from openxlstm.experiments.runner import CSV_FIELDS

    spec = grid_specs(["parity"], ["lstm"], [0], width=8, steps=2, batch_size=4, train_max_len=5, test_min_len=6,
                      test_max_len=8, eval_batches=1, eval_batch_size=4)
    run_grid(spec, tmp_path, log=lambda _: None)
    rows = read_results(tmp_path / "results.csv")
    old_fields = [c for c in CSV_FIELDS if c != "schedule"]
    with (tmp_path / "results.csv").open("w", newline="") as f:  # as the version before --schedule wrote it
        w = csv.DictWriter(f, fieldnames=old_fields)
        w.writeheader()
        w.writerows({k: r[k] for k in old_fields} for r in rows)
    assert run_grid(spec, tmp_path, log=lambda _: None) == []  # resumed: nothing to run
    assert [r["schedule"] for r in read_results(tmp_path / "results.csv")] == ["cosine"]
    assert (tmp_path / "results.csv.bak").is_file()
    with (tmp_path / "results.csv").open("w", newline="") as f:
        f.write("task,model,mystery\nparity,lstm,1\n")
    with pytest.raises(ValueError, match="mystery"):
        run_grid(spec, tmp_path, log=lambda _: None)


def test_cell_loss_is_the_models_over_the_task_classes():
    """A cell's head is cut to the task's classes: the model's own loss (labels, IGNORE where unscored) is the
    cross-entropy over the first C logits of the full-vocabulary model, as the runner computed it before."""
    import torch.nn.functional as F

    from openxlstm.experiments.runner import classifier_head

    task = get_task("cycle_nav")  # vocabulary 5 + 2, 5 classes
    tokens, targets = task.sample(4, 9, torch.Generator().manual_seed(0), prefix_labels=True)
    for name in ("xlstm[1:1]", "lstm", "transformer", "reslstm"):
        torch.manual_seed(0)
        model = build_model(name, task.vocab_size, width=16, num_blocks=2)
        with torch.no_grad():
            logits = model(tokens)[..., : task.num_classes]  # (B, S, C)
            mask = targets != IGNORE
            expected = F.cross_entropy(logits[mask], targets[mask])
            out = classifier_head(model, task.num_classes)(tokens, labels=targets, return_logits=True)
        assert out.logits.shape[-1] == task.num_classes and torch.allclose(out.logits, logits, atol=1e-6)
        assert abs(float(out.loss) - float(expected)) < 1e-6, name


def test_run_options_reach_the_cells(tmp_path, monkeypatch, capsys):
    """--activation-checkpointing and --compile reach the cells and the ablation rungs and change no result."""
    from openxlstm.experiments.runner import CellSpec, RunOptions, run_cell

    for model, options in (("xlstm[1:1]", RunOptions(activation_checkpointing=True)), ("lstm", RunOptions(compile="eager"))):
        spec = CellSpec(task="parity", model=model, **{**TINY, "steps": 2})
        plain, other = run_cell(spec, log=lambda _: None), run_cell(spec, log=lambda _: None, options=options)
        assert abs(other["final_loss"] - plain["final_loss"]) < 1e-4 and other["accuracy"] == plain["accuracy"]
    rows = run_ablation(["reslstm"], tmp_path, log=lambda _: None, options=RunOptions(activation_checkpointing=True),
                        width=16, num_blocks=2, seq_len=16, batch_size=2, steps=2, eval_tokens=64, max_bytes=200_000)
    assert rows[0]["val_bpb"] > 0
    grid = ["grid", "--tasks", "parity", "--models", "lstm", "--width", "8", "--steps", "1", "--out", str(tmp_path / "g")]
    assert cli_main(grid + ["--device", "cuda:7" if not torch.cuda.is_available() else "nonsense"]) == 2
    assert cli_main(grid + ["--compile", "nonsense"]) == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli_main(grid) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "one process" in err[-1] and "backend" in err[1]


def test_slstm_init_block0_changes_only_slstm_forget_biases(tmp_path):
    """--slstm-init block0 (the parity recipe) gives every sLSTM block block 0's forget-gate biases and leaves
    everything else, and every model without sLSTM blocks, as the reference builds it."""
    from openxlstm.layers.slstm import forget_bias_init

    for name in ("xlstm[1:1]", "xlstm[0:1]", "xlstm[1:0]", "transformer", "lstm"):
        torch.manual_seed(0)
        ref = build_model(name, 4, width=16, num_blocks=2)
        torch.manual_seed(0)
        new = build_model(name, 4, width=16, num_blocks=2, slstm_init="block0")
        changed = [n for (n, p), (_, q) in zip(ref.named_parameters(), new.named_parameters()) if not torch.equal(p, q)]
        sblocks = [j for j, b in enumerate(getattr(new, "blocks", [])) if getattr(b, "kind", "") == "s"]
        # block 0's profile is already the reference's at block 0: only deeper sLSTM blocks change
        assert changed == [f"blocks.{j}.layer.bias" for j in sblocks if j > 0], (name, changed)
        for j in sblocks:
            layer = new.blocks[j].layer
            want = forget_bias_init(layer.config, layer.head_dim, 0).repeat(layer.num_heads)
            assert torch.equal(layer.bias[16:32].detach(), want)
            assert torch.equal(layer.bias[:16].detach(), ref.blocks[j].layer.bias[:16].detach())
    with pytest.raises(ValueError, match="slstm_init"):
        build_model("xlstm[1:1]", 4, slstm_init="deep")
    out = tmp_path / "g"
    args = ["grid", "--tasks", "parity", "--models", "xlstm[1:1]", "--width", "16", "--steps", "1", "--eval-batches", "1",
            "--eval-batch-size", "4", "--batch-size", "4", "--slstm-init", "block0", "--out", str(out)]
    assert cli_main(args) == 0
    rows = read_results(out / "results.csv")
    assert [r["slstm_init"] for r in rows] == ["block0"]
