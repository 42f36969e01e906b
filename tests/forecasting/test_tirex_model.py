"""TiRex on our layers against tirex-ts itself: random models built with its classes, saved in its checkpoint
format, loaded with ``openxlstm.forecasting.from_pretrained``, forecasts compared in float32 (its
recurrence's bfloat16 cast turned off) to 1e-5 relative error per series. Measured: 1e-7 to 4e-7."""

import math

import numpy as np
import pytest
import torch
from helpers_forecasting import build_tirex, random_walks, row_rel_err, save_tirex, tirex_float32

from openxlstm.errors import UserError
from openxlstm.forecasting import TiRex, TiRexConfig, from_pretrained

TOL = 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(tirex-ts model, ours loaded from its model.ckpt): 2 blocks of width 32, patch 8, context 64."""
    theirs, hp = build_tirex()
    path = save_tirex(tmp_path_factory.mktemp("tirex") / "model.ckpt", theirs, hp)
    return theirs, from_pretrained(path)


def theirs_f32(model, ctx, H, steps=1):
    with tirex_float32():
        return model._forecast_quantiles(ctx, H, max_accelerated_rollout_steps=steps)


@pytest.mark.parametrize("L", [20, 61, 64, 150])  # shorter than, equal to and longer than the 64-value context
@pytest.mark.parametrize("H", [8, 21])  # one patch, and three patches cut to 21 values
def test_forecast_equals_tirex_float32(pair, L, H):
    theirs, ours = pair
    ctx = random_walks(3, L)
    q_ref, mean_ref = theirs_f32(theirs, ctx, H)
    q, mean = ours.forecast(ctx, H)
    assert q.shape == (3, H, 9) and mean.shape == (3, H)
    assert row_rel_err(q, q_ref).max() <= TOL
    assert row_rel_err(mean, mean_ref).max() <= TOL


def test_bfloat16_difference_is_tirex_cast(pair):
    """tirex-ts's default (bfloat16 recurrence) differs from float32 by ~1e-3; ours follows float32."""
    theirs, ours = pair
    ctx = random_walks(4, 100)
    q32 = theirs_f32(theirs, ctx, 16)[0]
    q16 = theirs._forecast_quantiles(ctx, 16)[0]
    q = ours.forecast(ctx, 16)[0]
    gap = row_rel_err(q16, q32).max()
    assert 1e-4 < gap < 5e-2
    assert row_rel_err(q, q32).max() <= TOL < gap


def test_list_of_series_of_different_lengths(pair):
    """A list of series is left-padded with NaN to the longest, as tirex-ts's forecast() does; arrays too."""
    theirs, ours = pair
    series = [random_walks(1, L, seed=L)[0] for L in (30, 90, 7)]
    with tirex_float32():
        q_ref, mean_ref = theirs.forecast(series, prediction_length=12)
    q, mean = ours.forecast([s.numpy() for s in series], prediction_length=12)
    assert row_rel_err(q, q_ref).max() <= TOL
    q_np, _ = ours.forecast(np.stack([np.asarray(series[1])] * 2), 12)
    assert row_rel_err(q_np[:1], q_ref[1:2]).max() <= TOL


@pytest.mark.parametrize("backend", ["recurrent", "fused", "triton"])
def test_every_backend(tmp_path, backend):
    """Each sLSTM backend runs TiRex (Triton under its interpreter on CPU, at a tiny size)."""
    theirs, hp = build_tirex(embedding_dim=16, num_heads=2, num_blocks=1, patch=8, ff_dim=16, train_ctx=32, seed=3)
    ours = from_pretrained(save_tirex(tmp_path / "model.ckpt", theirs, hp)).set_backends(slstm=backend)
    ctx = random_walks(2, 27)
    q_ref = theirs_f32(theirs, ctx, 8)[0]
    assert row_rel_err(ours.forecast(ctx, 8)[0], q_ref).max() <= TOL


def test_saturated_forget_gates(tmp_path):
    """TiRex clamps the forget pre-activation at 15 before its log-sigmoid; we do not. With every forget gate
    far past the clamp (pre-activations ~40) the forecasts still agree to float32 rounding."""
    theirs, hp = build_tirex(forget_bias=40.0, seed=5)
    ours = from_pretrained(save_tirex(tmp_path / "model.ckpt", theirs, hp))
    ctx = random_walks(3, 64)
    q_ref = theirs_f32(theirs, ctx, 24)[0]
    assert row_rel_err(ours.forecast(ctx, 24)[0], q_ref).max() <= TOL


@pytest.mark.parametrize("H", [8, 30])
def test_stateful_rollout_equals_tirex_accelerated_rollout(pair, H):
    """rollout="state" (prefill once, one sLSTM step per further patch) computes what tirex-ts's
    max_accelerated_rollout_steps does in one pass (NaN patches appended to the window)."""
    theirs, ours = pair
    ctx = random_walks(3, 50)
    steps = -(-H // 8)
    q_ref = theirs_f32(theirs, ctx, H, steps=steps)[0]
    assert row_rel_err(ours.forecast(ctx, H, rollout="state")[0], q_ref).max() <= TOL


def test_checkpoint_directory_and_older_key_names(tmp_path):
    theirs, hp = build_tirex(seed=7)
    save_tirex(tmp_path / "model.ckpt", theirs, hp, old_keys=True)
    ours = from_pretrained(tmp_path)  # the directory, keys prefixed "block_stack."
    ctx = random_walks(2, 40)
    assert row_rel_err(ours.forecast(ctx, 8)[0], theirs_f32(theirs, ctx, 8)[0]).max() <= TOL
    assert ours.config.pad_context and ours.config.train_ctx_len == 64 and ours.config.patch_size == 8


def test_quantile_levels_and_mean(pair):
    _, ours = pair
    ctx = random_walks(2, 40)
    q, mean = ours.forecast(ctx, 10)
    q2, mean2 = ours.forecast(ctx, 10, quantile_levels=[0.1, 0.5, 0.9])
    assert torch.equal(q2, q[..., [0, 4, 8]]) and torch.equal(mean2, q[..., 4]) and torch.equal(mean, mean2)
    with pytest.raises(UserError, match="0.25 is not one the model predicts"):
        ours.forecast(ctx, 10, quantile_levels=[0.25])
    for bad, msg in [(dict(prediction_length=0), "prediction_length"), (dict(rollout="beam"), "rollout"),
                     (dict(max_context=-3), "max_context")]:
        with pytest.raises(UserError, match=msg):
            ours.forecast(ctx, **({"prediction_length": 4} | bad))
    with pytest.raises(UserError, match="1-D"):
        ours.forecast([np.zeros((2, 3))])
    with pytest.raises(UserError, match="tensor, an array or a list"):
        ours.forecast("1,2,3")


def test_unpadded_model_forecasts_each_series_alone():
    """pad_context=False (models trained here on packed series): in a batch with longer series a short one
    starts the recurrence at its own first patch, so its forecast is the one it gets alone."""
    torch.manual_seed(0)
    model = TiRex(TiRexConfig(patch_size=8, embedding_dim=32, num_heads=4, num_blocks=2, input_ff_dim=32,
                              train_ctx_len=64, pad_context=False)).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.slstm.recurrent.normal_(0, 0.3)
    series = [random_walks(1, L, seed=L, missing=False)[0] for L in (13, 64, 40)]
    for rollout in ("window", "state"):
        q_batch, _ = model.forecast(series, 16, rollout=rollout)
        for j, s in enumerate(series):
            q_alone, _ = model.forecast(s, 16, rollout=rollout)
            assert row_rel_err(q_batch[j:j + 1], q_alone).max() <= TOL


def test_all_missing_series_and_constant_series(pair):
    """TiRex's scaling conventions: no observed value -> loc 0, scale 1; zero spread -> scale |mean| + 1e-5."""
    theirs, ours = pair
    ctx = torch.stack([torch.full((40,), math.nan), torch.full((40,), 5.0), torch.zeros(40)])
    q_ref = theirs_f32(theirs, ctx, 8)[0]
    q = ours.forecast(ctx, 8)[0]
    assert torch.isfinite(q).all()
    assert row_rel_err(q, q_ref).max() <= TOL


def test_longer_context_than_training(pair):
    """max_context beyond train_ctx_len runs the recurrence over the whole longer context (TiRex cuts it to
    its training context): the same as a TiRex trained on that context length."""
    _, ours = pair
    ctx = random_walks(2, 160)
    longer = TiRex(TiRexConfig(**{**ours.config.to_dict(), "train_ctx_len": 160})).eval()
    longer.load_state_dict(ours.state_dict())
    q = ours.forecast(ctx, 20, max_context=160)[0]
    assert torch.equal(q, longer.forecast(ctx, 20)[0])
    assert row_rel_err(q, ours.forecast(ctx, 20)[0]).min() > 1e-3  # the older values change the forecast


def test_bfloat16_matmuls(pair):
    """set_backends(matmul="bfloat16"): projections and FFNs under bfloat16 autocast, the recurrence and the
    residual stream in float32: within 2e-2 of float32 (tirex-ts's default bfloat16 recurrence: ~3e-3)."""
    theirs, ours = pair
    ctx = random_walks(4, 64)
    q32 = theirs_f32(theirs, ctx, 16)[0]
    try:
        q = ours.set_backends(matmul="bfloat16").forecast(ctx, 16)[0]
    finally:
        ours.set_backends(matmul="float32")
    err = row_rel_err(q, q32).max()
    assert 1e-5 < err < 2e-2
    with pytest.raises(ValueError, match="unknown matmul precision"):
        ours.set_backends(matmul="float16")
