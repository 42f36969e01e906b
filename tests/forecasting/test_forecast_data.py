"""Series files in and forecast files out (CSV long / wide, missing values, time stamps), and packed training
windows: the packed forward equals each window run alone."""

import math
import os

import numpy as np
import pytest
import torch

from openxlstm.errors import UserError
from openxlstm.forecasting import TiRex, TiRexConfig
from openxlstm.forecasting.data import Window, forecast_rows, future_timestamps, pack_windows, read_series, write_table


def write(path, text):
    path.write_text(text)
    return path


def test_long_csv_with_missing_values_and_custom_columns(tmp_path):
    f = write(tmp_path / "s.csv", "id,date,y,extra\na,2020-01-01,1.5,x\nb,2020-01-01,7,x\na,2020-02-01,,x\n"
                                  "a,2020-03-01,NA,x\nb,2020-02-01,8,x\na,2020-04-01,4,x\n")
    series = read_series(f, id_column="id", timestamp_column="date", target_column="y")
    assert [s.item_id for s in series] == ["a", "b"]
    assert np.array_equal(series[0].values, [1.5, np.nan, np.nan, 4.0], equal_nan=True)
    assert series[1].timestamps == ["2020-01-01", "2020-02-01"]
    with pytest.raises(UserError, match="no column 'target'"):
        read_series(f, layout="long", id_column="id")
    bad = write(tmp_path / "bad.csv", "item_id,timestamp,target\na,1,x1\n")
    with pytest.raises(UserError, match="line 2, column 'target': 'x1' is not a number"):
        read_series(bad)


def test_wide_csv_series_of_different_lengths(tmp_path):
    f = write(tmp_path / "w.csv", "timestamp,north,south\n1,1,10\n2,2,\n3,3,\n")
    north, south = read_series(f)
    assert north.item_id == "north" and np.array_equal(north.values, [1, 2, 3])
    assert np.array_equal(south.values, [10.0]) and south.timestamps == ["1"]
    with pytest.raises(UserError, match="does not exist"):
        read_series(tmp_path / "none.csv")
    with pytest.raises(UserError, match="is empty"):
        read_series(write(tmp_path / "e.csv", ""))


def test_future_timestamps():
    assert future_timestamps(["2020-11-30", "2020-12-31"], 3) == ["2021-01-31", "2021-02-28", "2021-03-31"]
    assert future_timestamps(["2020-01-01", "2020-04-01"], 2) == ["2020-07-01", "2020-10-01"]  # quarterly
    assert future_timestamps(["2021-03-01 10:00:00", "2021-03-01 11:00:00"], 2) == ["2021-03-01 12:00:00",
                                                                                    "2021-03-01 13:00:00"]
    assert future_timestamps(["1998", "1999"], 2) == ["2000", "2001"]
    assert future_timestamps(["w1", "w2"], 2) == ["", ""]
    assert future_timestamps(None, 1) == [""]


def test_forecast_file_written_atomically_never_over_a_file(tmp_path):
    from openxlstm.forecasting.data import Series

    s = [Series("a", np.arange(3.0), ["2020-01-01", "2020-01-02", "2020-01-03"])]
    q = np.arange(2 * 3, dtype=float).reshape(1, 2, 3)
    header, rows = forecast_rows(s, q, q[..., 1], [0.1, 0.5, 0.9])
    assert header == ["item_id", "timestamp", "step", "mean", "0.1", "0.5", "0.9"]
    assert rows[1] == ["a", "2020-01-05", 2, 4.0, 3.0, 4.0, 5.0]
    out = tmp_path / "f.csv"
    old = os.umask(0o027)
    try:
        write_table(out, header, rows)
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o640
    assert out.read_text().splitlines()[1] == "a,2020-01-04,1,1,0,1,2"
    with pytest.raises(UserError, match="exists; add --overwrite"):
        write_table(out, header, rows)
    write_table(out, header, rows[:1], overwrite=True)
    assert len(out.read_text().splitlines()) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["f.csv"]


def test_pack_windows_layout():
    P = 4
    ws = [Window(np.full(8, 1.0), np.full(8, 2.0)), Window(np.full(12, 3.0), np.full(12, 4.0)),
          Window(np.full(4, 5.0), np.full(4, 6.0))]
    x, y, cu = pack_windows(ws, 16, P)
    assert x.shape == (2, 16) and cu.tolist() == [0, 8, 12, 16, 28, 32]
    assert torch.isnan(x[0, 12:]).all() and x[1, 0] == 3.0 and x[0, 8] == 5.0
    with pytest.raises(ValueError, match="whole patches"):
        pack_windows([Window(np.ones(5), np.ones(5))], 16, P)


def test_packed_forward_equals_each_window_alone():
    """cu_seqlens: each packed window is scaled by its own statistics and runs from a zero state, so its
    quantiles and its share of the loss are those it gets alone."""
    torch.manual_seed(0)
    model = TiRex(TiRexConfig(patch_size=4, embedding_dim=16, num_heads=2, num_blocks=2, input_ff_dim=16,
                              train_ctx_len=16, pad_context=False))
    with torch.no_grad():
        for blk in model.blocks:
            blk.slstm.recurrent.normal_(0, 0.3)
    rng = np.random.default_rng(0)
    ws = [Window(rng.normal(5 * k, k + 1, n).astype(np.float32), rng.normal(5 * k, 1, n).astype(np.float32))
          for k, n in enumerate([8, 12, 4, 16])]
    ws[1].input[2] = np.nan
    ws[2].labels[:2] = np.nan
    x, y, cu = pack_windows(ws, 16, 4)
    out = model(x, labels=y, cu_seqlens=cu)
    total, count = 0.0, 0
    rows = {0: [0, 2], 1: [1], 2: [3]}  # first-fit: row 0 holds windows 0 and 2, row 1 window 1, row 2 window 3
    for r, members in rows.items():
        start = 0
        for k in members:
            n = len(ws[k].input)
            alone = model(torch.from_numpy(ws[k].input)[None], labels=torch.from_numpy(ws[k].labels)[None])
            got = out.quantiles[r, start // 4:(start + n) // 4]
            assert torch.allclose(got, alone.quantiles[0], atol=1e-5, rtol=1e-5)
            total += float(alone.loss) * int(alone.num_tokens)
            count += int(alone.num_tokens)
            start += n
    assert int(out.num_tokens) == count
    assert math.isclose(float(out.loss), total / count, rel_tol=1e-5)
