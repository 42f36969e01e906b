"""Reliability (issue 14): every bad input a one-line error, runs never clobbered, resumes and checkpoints that
always work, results files that never count a broken row. Fast: tiny models, a few steps, in-process calls."""

import csv
from dataclasses import asdict

import pytest

from openxlstm import xLSTMConfig
from openxlstm.baselines import LSTMConfig, TransformerConfig
from openxlstm.experiments.runner import CSV_FIELDS, CellSpec, append_result, read_results
from openxlstm.large.model import xLSTMLargeConfig


def grid_row(seed, score="0.5"):
    spec = asdict(CellSpec(task="parity", model="lstm", seed=seed, steps=3))
    return {**spec, "params": 10, "steps_done": 3, "final_loss": 0.7, "train_accuracy": 0.5, "accuracy": 0.5,
            "chance": 0.5, "scaled_accuracy": 0.0, "score": score, "seconds": 1.0, "finished_at": "2026-01-01T00:00:00"}


def test_grid_results_count_only_whole_finite_rows(tmp_path):
    """A diverged cell (score nan) and a row cut short by a crash are not results: a rerun runs them again, and
    a row appended after a cut line starts on a line of its own."""
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
    assert make(tie_weights=True) is not None


def test_config_numbers_are_strict():
    with pytest.raises(ValueError, match="dropout must be a finite number"):
        LSTMConfig(dropout=float("nan"))
    with pytest.raises(ValueError, match="embedding_dim must be an integer"):
        TransformerConfig(embedding_dim=64.0)
    with pytest.raises(ValueError, match="norm_eps must be a finite number"):
        xLSTMConfig(norm_eps=float("inf"))
