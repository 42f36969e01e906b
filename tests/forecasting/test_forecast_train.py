"""Fine-tuning and training through the training engine: the held-out pinball loss drops, a resumed run
repeats the uninterrupted one, the validation loss is the loss of the stateful forecast, and contiguous patch
masking hides input patches but keeps their targets."""

import numpy as np
import pytest
import torch
from helpers_forecasting import build_tirex, save_tirex

from openxlstm.forecasting import TiRex, TiRexConfig, from_pretrained
from openxlstm.forecasting.train import FitConfig, fit, heldout_loss, sample_window, split_heldout


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def seasonal_series(n=3, length=320, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    return [20 + 0.02 * k * t + 4 * np.sin(2 * np.pi * t / 12 + k) + 0.3 * rng.standard_normal(length)
            for k in range(n)]


def test_fine_tuning_a_tirex_checkpoint_lowers_the_heldout_loss(tmp_path):
    theirs, hp = build_tirex(seed=4)
    model = from_pretrained(save_tirex(tmp_path / "model.ckpt", theirs, hp)).train()
    series = seasonal_series()
    before = heldout_loss(model, series, horizon=16)
    report = fit(model, series, FitConfig(steps=40, batch_size=16, lr=3e-3, horizon=16, device="cpu", log_every=20),
                 run_dir=tmp_path / "run", log=lambda s: None)
    assert report.heldout_before == pytest.approx(before, rel=1e-5)
    assert report.heldout_after < 0.6 * before
    assert heldout_loss(model, series, horizon=16) == pytest.approx(report.heldout_after, rel=1e-4)
    tuned = from_pretrained(tmp_path / "run")  # the run directory's latest checkpoint
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), model.state_dict().values()))


def test_resumed_run_repeats_the_uninterrupted_one(tmp_path):
    def fresh():
        torch.manual_seed(0)
        return TiRex(TiRexConfig(patch_size=8, embedding_dim=16, num_heads=2, num_blocks=2, input_ff_dim=16,
                                 train_ctx_len=64, pad_context=False))

    series = seasonal_series(n=4, length=200, seed=1)
    quiet = dict(log=lambda s: None)
    cfg = FitConfig(steps=6, batch_size=8, lr=1e-3, horizon=8, device="cpu", save_every=3)
    whole = fresh()  # six steps in one go, checkpointing at steps 3 and 6
    fit(whole, series, cfg, run_dir=tmp_path / "a", **quiet)
    ckpt = tmp_path / "a" / "ckpt-000003"
    resumed = from_pretrained(ckpt).train()  # a run interrupted after step 3, continued
    fit(resumed, series, cfg, run_dir=tmp_path / "b", resume=ckpt, **quiet)
    assert (tmp_path / "b" / "ckpt-000006").is_dir()
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_heldout_loss_is_the_loss_of_the_stateful_forecast():
    """The validation window (context, then missing patches) scores what forecast(rollout="state") predicts:
    its pinball loss in the series' scaled units."""
    torch.manual_seed(1)
    model = TiRex(TiRexConfig(patch_size=8, embedding_dim=16, num_heads=2, num_blocks=2, input_ff_dim=16,
                              train_ctx_len=64, pad_context=False))
    with torch.no_grad():
        for blk in model.blocks:
            blk.slstm.recurrent.normal_(0, 0.3)
    series = seasonal_series(n=2, length=90)
    H = 20
    _, held = split_heldout(series, H, min_context=8)
    levels = torch.tensor(model.config.quantiles)
    losses, counts = [], []
    for context, target in held:
        q, _ = model.forecast(torch.tensor(context, dtype=torch.float32), H, rollout="state")
        window = torch.tensor(context[-64:], dtype=torch.float32)
        scale = window.std(unbiased=False)
        diff = (torch.tensor(target, dtype=torch.float32)[:, None] - q[0]) / scale
        losses.append(torch.maximum(levels * diff, (levels - 1) * diff).sum())
        counts.append(H * len(levels))
    assert heldout_loss(model, series, H) == pytest.approx(float(sum(losses) / sum(counts)), rel=1e-4)


def test_contiguous_patch_masking_and_padding():
    rng = np.random.default_rng(0)
    v = np.arange(200, dtype=float)
    masked = 0
    for _ in range(50):
        w = sample_window(v, rng, context=64, P=8, pad=False, mask_prob=1.0, max_mask=3)
        assert len(w.input) % 8 == 0 and len(w.input) <= 64
        ok = ~np.isnan(w.labels)
        assert np.array_equal(w.labels[ok], np.arange(200, dtype=float)[w.labels[ok].astype(int)])
        assert np.allclose(w.labels[ok][:-1] + 1, w.labels[ok][1:])  # labels untouched: consecutive values
        gone = np.isnan(w.input) & (np.arange(len(w.input)) >= np.flatnonzero(~np.isnan(w.input))[0])
        if gone.any():
            masked += 1
            run = np.flatnonzero(gone)
            assert len(run) % 8 == 0 and len(run) <= 24 and np.all(np.diff(run) == 1)
        known = ~np.isnan(w.input)
        assert np.array_equal(w.input[known] + 8, w.labels[known])
    assert masked > 40
    w = sample_window(v[:20], rng, context=64, P=8, pad=True, mask_prob=0.0, max_mask=3)
    assert len(w.input) == 64 and np.isnan(w.input[:40]).all()
