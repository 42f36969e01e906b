"""``openxlstm forecast`` / ``forecast-train``: the round trip from a CSV of series to a fine-tuned model and
its forecast file and plot; one-line errors (exit status 2) and nothing overwritten without --overwrite."""

import csv
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers_forecasting import build_tirex, save_tirex, tirex_float32

from openxlstm.cli import main


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data(tmp_path):
    """A long CSV: three monthly series of different lengths, one value missing."""
    path = tmp_path / "series.csv"
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "timestamp", "target"])
        for item, n in (("a", 150), ("b", 90), ("c", 40)):
            for t in range(n):
                y = 10 + 3 * math.sin(2 * math.pi * t / 12) + 0.2 * rng.standard_normal()
                value = "" if (item, t) == ("a", 33) else f"{y:.4f}"
                w.writerow([item, f"{2000 + t // 12}-{t % 12 + 1:02d}-01", value])
    return path


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_forecast_from_a_tirex_checkpoint_equals_tirex(tmp_path, data):
    theirs, hp = build_tirex(seed=9)
    ckpt = save_tirex(tmp_path / "model.ckpt", theirs, hp)
    out = tmp_path / "fc.csv"
    assert main(["forecast", "--model", str(ckpt), "--data", str(data), "--horizon", "12", "--out", str(out)]) == 0
    rows = read(out)
    assert len(rows) == 36 and list(rows[0]) == ["item_id", "timestamp", "step", "mean", "0.1", "0.2", "0.3",
                                                 "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
    assert rows[0]["timestamp"] == "2012-07-01" and rows[12]["item_id"] == "b" and rows[12]["step"] == "1"
    series = [torch.tensor([np.nan if v == "" else float(v) for v in vals]) for vals in _columns(data)]
    with tirex_float32():
        q, _ = theirs.forecast(series, prediction_length=12)
    got = np.array([[float(r[f"0.{k}"]) for k in range(1, 10)] for r in rows]).reshape(3, 12, 9)
    assert np.allclose(got, q.numpy(), rtol=1e-5, atol=1e-5 * float(q.abs().max()))


def test_plot(tmp_path, data):
    pytest.importorskip("matplotlib")
    theirs, hp = build_tirex()
    ckpt = save_tirex(tmp_path / "model.ckpt", theirs, hp)
    png = tmp_path / "fc.png"
    argv = ["forecast", "--model", str(ckpt), "--data", str(data), "--horizon", "6", "--out", str(tmp_path / "f.csv"),
            "--plot", str(png), "--plot-series", "2"]
    assert main(argv) == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert main(argv) == 2  # neither the forecasts nor the plot are replaced without --overwrite
    assert main(argv + ["--overwrite"]) == 0


def _columns(path):
    by = {}
    for r in read(path):
        by.setdefault(r["item_id"], []).append(r["target"])
    return list(by.values())


def test_train_then_forecast_round_trip(tmp_path, data, capsys):
    run = tmp_path / "run"
    args = ["forecast-train", "--preset", "tiny", "--data", str(data), "--out", str(run), "--steps", "4",
            "--batch-size", "4", "--horizon", "12", "--device", "cpu", "--log-every", "2"]
    assert main(args) == 0
    assert "held-out pinball loss" in capsys.readouterr().out
    assert main(args) == 2  # the run is there: refused
    assert "already holds a run" in capsys.readouterr().err
    assert main(args[:-6] + ["--steps", "6", "--batch-size", "4", "--resume", "--device", "cpu"]) == 0
    assert (run / "ckpt-000006").is_dir()
    out = tmp_path / "fc.csv"
    assert main(["forecast", "--model", str(run), "--data", str(data), "--horizon", "5", "--out", str(out),
                 "--quantiles", "0.1,0.5,0.9", "--rollout", "state"]) == 0
    rows = read(out)
    assert len(rows) == 15 and list(rows[0])[3:] == ["mean", "0.1", "0.5", "0.9"]
    assert all(math.isfinite(float(r["mean"])) and r["mean"] == r["0.5"] for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["forecast", "--model", "{tmp}/none", "--data", "{data}", "--horizon", "3", "--out", "{tmp}/o.csv"],
     "does not exist"),
    (["forecast", "--model", "{ckpt}", "--data", "{data}", "--horizon", "0", "--out", "{tmp}/o.csv"],
     "argument --horizon: expected an integer >= 1"),
    (["forecast", "--model", "{ckpt}", "--data", "{data}", "--horizon", "3", "--out", "{data}"],
     "exists; add --overwrite"),
    (["forecast", "--model", "{ckpt}", "--data", "{data}", "--horizon", "3", "--out", "{tmp}/o.csv",
      "--quantiles", "0.33"], "0.33 is not one the model predicts"),
    (["forecast", "--model", "{ckpt}", "--data", "{data}", "--horizon", "3", "--out", "{tmp}/o.csv",
      "--plot", "{tmp}/p.jpg"], "must end in .png"),
    (["forecast-train", "--preset", "huge", "--data", "{data}", "--out", "{tmp}/r"], "--preset 'huge'"),
    (["forecast-train", "--preset", "tiny", "--init", "{ckpt}", "--data", "{data}", "--out", "{tmp}/r"],
     "choose one of --init, --preset and --config"),
    (["forecast-train", "--config", '{{"patch": 4}}', "--data", "{data}", "--out", "{tmp}/r"], "unknown field"),
])
def test_user_errors_are_one_line(tmp_path, data, capsys, argv, message):
    theirs, hp = build_tirex()
    ckpt = save_tirex(tmp_path / "model.ckpt", theirs, hp)
    argv = [a.format(tmp=tmp_path, data=data, ckpt=ckpt) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_module_runs_as_a_command(tmp_path, data):
    theirs, hp = build_tirex()
    ckpt = save_tirex(tmp_path / "model.ckpt", theirs, hp)
    r = subprocess.run([sys.executable, "-m", "openxlstm", "forecast", "--model", str(tmp_path),
                        "--data", str(data), "--horizon", "4", "--out", str(tmp_path / "f.csv")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert ckpt.exists() and len(read(tmp_path / "f.csv")) == 12
