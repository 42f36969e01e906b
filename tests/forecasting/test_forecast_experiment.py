"""``openxlstm experiment forecasting --scale smoke`` end to end (as CI runs it), and its scores against
direct computations: MASE, the weighted quantile loss, the seasonal naive forecast."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("statsmodels")

from openxlstm.experiments import forecasting as fx  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_scores_against_direct_computation():
    context = np.array([1.0, 2, 4, 3, np.nan, 5])
    target = np.array([6.0, 4, np.nan])
    median = np.array([5.0, 5, 5])
    filled = np.array([1.0, 2, 4, 3, 4, 5])
    scale = np.mean(np.abs(np.diff(filled)))
    assert fx.mase(context, target, median, 1) == pytest.approx(1.0 / scale)
    q = np.tile(np.linspace(3, 7, 9), (3, 1))
    lv = np.array(fx.LEVELS)
    loss = sum(max(l * (y - p), (l - 1) * (y - p)) for y in (6.0, 4.0) for l, p in zip(lv, q[0]))
    num, den = fx.wql_terms(target, q)
    assert num == pytest.approx(2 * loss / 9) and den == 10.0
    sn = fx.seasonal_naive(np.arange(10.0), 4, 6)
    assert np.allclose(sn[:, 4], [6, 7, 8, 9, 6, 7])
    assert np.all(np.diff(sn, axis=1) >= 0) and sn[4, 8] - sn[4, 4] > sn[0, 8] - sn[0, 4]  # bands widen per season


def test_kernel_synth_and_mixtures():
    gp = fx.kernel_synth(5, 64, seed=3)
    assert len(gp) == 5 and all(s.shape == (64,) and np.isfinite(s).all() for s in gp)
    assert not np.allclose(gp[0], gp[1])
    mix = fx.mixtures(gp, 4, seed=4)
    assert len(mix) == 4 and all(abs(m.mean()) < 1.0 for m in mix)
    assert np.allclose(fx.kernel_synth(2, 64, seed=3)[1], gp[1])  # seeded


def test_smoke_scale_end_to_end(tmp_path):
    logs = []
    rows = fx.run_forecasting(fx.SCALES["smoke"], tmp_path, log=logs.append)
    table = (tmp_path / "results.md").read_text()
    for method in fx.METHODS:
        assert method in table
    assert "geometric mean, relative to seasonal naive" in table
    per = [r for r in rows if r["dataset"] != "geometric mean, relative to seasonal naive"]
    assert len(per) == 6 * (len(fx.METHODS) + 2)  # the TiRex rows also with the stateful rollout
    assert "Stateful rollout" in table
    assert all(math.isfinite(r["mase"]) and math.isfinite(r["wql"]) for r in per)
    assert (tmp_path / "pretrain" / "ckpt-000012").is_dir() and (tmp_path / "finetune" / "ckpt-000006").is_dir()
    again = []
    fx._pretrained(fx.SCALES["smoke"], tmp_path, 0, "cpu", again.append)  # a finished run is reused
    assert again == [f"pretrained model: {tmp_path / 'pretrain' / 'ckpt-000012'} (reused)"]
    assert (tmp_path / "results.csv").read_text().count("\n") == len(rows) + 1
