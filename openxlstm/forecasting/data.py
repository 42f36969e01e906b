"""Series in and forecasts out: CSV (long or wide) and Parquet files, and packed training windows.

Long layout (AutoGluon's and fev's): one row per series and time step, columns ``item_id``, ``timestamp``,
``target`` (each name overridable); the rows of a series in time order. Wide layout: an optional timestamp
column and one column per series (the column name is its id). Empty cells, "nan", "NA" and "null" are
missing values (NaN). Parquet needs pandas and pyarrow.

Forecast files have one row per series and step: ``item_id``, ``timestamp`` (the series' time stamps
continued at their last spacing when they are dates or numbers, else empty), ``step`` (1..H), ``mean`` and
one column per quantile level ("0.1", ...).

Training windows (``pack_windows``): each window is an input of whole patches and its labels (the patch
after each input patch); windows are laid end to end in rows of a fixed length with ``cu_seqlens`` marking
where each starts, the rest of a row a window of missing values that scores nothing.
"""

from __future__ import annotations

import calendar
import csv
import datetime as dt
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import UserError

MISSING = {"", "nan", "NaN", "NAN", "na", "NA", "N/A", "null", "NULL", "None"}
LAYOUTS = ("auto", "long", "wide")


@dataclass
class Series:
    """One series: its id, values (float64, NaN missing) and time stamps as written in the file (or None)."""

    item_id: str
    values: np.ndarray
    timestamps: Optional[list] = field(default=None)


# -- reading -----------------------------------------------------------------------------------------------
def _number(text, where: str) -> float:
    if text is None:
        return math.nan
    if isinstance(text, (int, float, np.number)):
        return float(text)
    s = str(text).strip()
    if s in MISSING:
        return math.nan
    try:
        return float(s)
    except ValueError:
        raise UserError(f"{where}: {s!r} is not a number (missing values are empty cells, nan or NA)") from None


def _table(path: Path) -> tuple[list[str], list[list]]:
    """(header, rows) of a CSV or Parquet file."""
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pandas as pd
            frame = pd.read_parquet(path)
        except ImportError:
            raise UserError(f"{str(path)!r}: reading Parquet needs pandas and pyarrow (pip install pandas pyarrow), "
                            f"or pass a CSV file") from None
        except Exception as e:  # pyarrow raises its own types for corrupt files
            raise UserError(f"cannot read {str(path)!r} as Parquet ({type(e).__name__}: {e})") from None
        header = [str(c) for c in frame.columns]
        rows = [[None if (isinstance(v, float) and math.isnan(v)) else v for v in r]
                for r in frame.itertuples(index=False, name=None)]
        return header, rows
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [r for r in reader if r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {str(path)!r} as CSV ({e})") from None
    if not header:
        raise UserError(f"{str(path)!r} is empty: expected a header row and one row per time step")
    return [h.strip() for h in header], rows


def read_series(path, layout: str = "auto", id_column: str = "item_id", timestamp_column: str = "timestamp",
                target_column: str = "target") -> list[Series]:
    """The series of a CSV or Parquet file (see the module docstring); ``layout`` "auto" takes the long layout
    when the id and target columns are there, else the wide one."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"data file {str(path)!r} does not exist")
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    header, rows = _table(p)
    if len(set(header)) != len(header):
        raise UserError(f"{str(p)!r}: the header repeats a column name ({header})")
    col = {name: j for j, name in enumerate(header)}
    if layout == "auto":
        layout = "long" if id_column in col and target_column in col else "wide"
    if layout == "long":
        missing = [c for c in (id_column, target_column) if c not in col]
        if missing:
            raise UserError(f"{str(p)!r}: no column {missing[0]!r} for the long layout (columns: {header}); name the "
                            f"columns with --id-column / --target-column, or pass --layout wide")
        by_id: dict[str, tuple[list, list]] = {}
        t_col = col.get(timestamp_column)
        for k, r in enumerate(rows, start=2):
            if len(r) != len(header):
                raise UserError(f"{str(p)!r} line {k}: {len(r)} cells, the header has {len(header)}")
            vals, stamps = by_id.setdefault(str(r[col[id_column]]).strip(), ([], []))
            vals.append(_number(r[col[target_column]], f"{str(p)!r} line {k}, column {target_column!r}"))
            stamps.append(None if t_col is None else r[t_col])
        out = [Series(i, np.asarray(v, dtype=np.float64), None if t_col is None else s) for i, (v, s) in by_id.items()]
    else:
        t_col = col.get(timestamp_column)
        value_cols = [j for j in range(len(header)) if j != t_col]
        if not value_cols:
            raise UserError(f"{str(p)!r}: no series columns (the wide layout has one column per series)")
        for k, r in enumerate(rows, start=2):
            if len(r) != len(header):
                raise UserError(f"{str(p)!r} line {k}: {len(r)} cells, the header has {len(header)}")
        stamps = None if t_col is None else [r[t_col] for r in rows]
        out = [Series(header[j], np.asarray([_number(r[j], f"{str(p)!r} line {k}, column {header[j]!r}")
                                             for k, r in enumerate(rows, start=2)], dtype=np.float64), stamps)
               for j in value_cols]
        for s in out:  # a wide file pads shorter series with empty cells at the end: drop them
            last = np.flatnonzero(~np.isnan(s.values))
            end = int(last[-1]) + 1 if len(last) else 0
            s.values = s.values[:end]
            s.timestamps = None if s.timestamps is None else s.timestamps[:end]
    out = [s for s in out if len(s.values)]
    if not out:
        raise UserError(f"{str(p)!r} holds no series with values")
    return out


# -- time stamps -------------------------------------------------------------------------------------------
def _parse_time(v):
    if isinstance(v, (dt.datetime, dt.date)):
        return v
    if hasattr(v, "to_pydatetime"):
        return v.to_pydatetime()
    s = str(v).strip()
    try:
        return float(s) if "." in s or "e" in s.lower() else int(s)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(s)
    except ValueError:
        return None


def _format_like(value, example) -> str:
    if isinstance(value, dt.datetime):
        text = str(example).strip()
        if len(text) == 10 and value.hour == value.minute == value.second == 0:
            return value.date().isoformat()
        return value.isoformat(sep=" ") if " " in text else value.isoformat()
    return str(value)


def _add_months(t: dt.datetime, months: int) -> dt.datetime:
    """t plus whole months; a month's last day stays the last day (Jan 31 + 1 month = Feb 28/29)."""
    y, m = divmod(t.month - 1 + months, 12)
    year, month = t.year + y, m + 1
    end = calendar.monthrange(year, month)[1]
    day = end if t.day == calendar.monthrange(t.year, t.month)[1] else min(t.day, end)
    return t.replace(year=year, month=month, day=day)


def future_timestamps(stamps: Optional[list], horizon: int) -> list[str]:
    """The next ``horizon`` time stamps after ``stamps``, at the spacing of the last two (whole months for
    monthly or quarterly dates); empty strings when they cannot be continued."""
    blank = [""] * horizon
    if not stamps or len(stamps) < 2:
        return blank
    a, b = _parse_time(stamps[-2]), _parse_time(stamps[-1])
    if a is None or b is None or type(a) is not type(b):
        return blank
    if isinstance(b, (int, float)):
        return [str(b + (b - a) * k) for k in range(1, horizon + 1)]
    if not isinstance(b, dt.datetime):
        a, b = dt.datetime.combine(a, dt.time()), dt.datetime.combine(b, dt.time())
    months = (b.year - a.year) * 12 + b.month - a.month
    if months > 0 and _add_months(a, months) == b:
        return [_format_like(_add_months(b, months * k), stamps[-1]) for k in range(1, horizon + 1)]
    step = b - a
    if step <= dt.timedelta(0):
        return blank
    return [_format_like(b + step * k, stamps[-1]) for k in range(1, horizon + 1)]


# -- writing -----------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def forecast_rows(series: Sequence[Series], quantiles: np.ndarray, mean: np.ndarray,
                  levels: Sequence[float]) -> tuple[list[str], list[list]]:
    """(header, rows) of a forecast file: quantiles (B, H, Q), mean (B, H)."""
    header = ["item_id", "timestamp", "step", "mean"] + [f"{q:g}" for q in levels]
    rows = []
    for j, s in enumerate(series):
        stamps = future_timestamps(s.timestamps, mean.shape[1])
        for h in range(mean.shape[1]):
            rows.append([s.item_id, stamps[h], h + 1, float(mean[j, h])] + [float(v) for v in quantiles[j, h]])
    return header, rows


def write_table(path, header: list[str], rows: list[list], overwrite: bool = False) -> Path:
    """Write a CSV (or Parquet, by suffix) atomically; an existing file is replaced only with ``overwrite``."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"--out {str(p)!r} is a directory; name the forecast file")
    if p.exists() and not overwrite:
        raise UserError(f"--out {str(p)!r} exists; add --overwrite to replace it, or choose another name")
    if not p.parent.is_dir():
        raise UserError(f"--out {str(p)!r}: the folder {str(p.parent)!r} does not exist")
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    parquet = p.suffix.lower() in (".parquet", ".pq")
    try:
        if parquet:
            try:
                import pandas as pd
                pd.DataFrame(rows, columns=header).to_parquet(tmp, index=False)
            except ImportError:
                raise UserError("writing Parquet needs pandas and pyarrow (pip install pandas pyarrow); or write "
                                "a .csv file") from None
        else:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(header)
                w.writerows([[f"{v:.7g}" if isinstance(v, float) else v for v in r] for r in rows])
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {str(p)!r}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


# -- training windows --------------------------------------------------------------------------------------
@dataclass
class Window:
    """One training or evaluation window: input (n * P,) values, labels (n * P,) targets (NaN: not scored)."""

    input: np.ndarray
    labels: np.ndarray


def pack_windows(windows: Sequence[Window], row_len: int, patch_size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    """Windows laid end to end into rows of ``row_len`` values (first fit, in order; a longer window is cut
    to its last row_len values). Returns input (B, row_len) float32, labels (B, row_len) float32 and
    cu_seqlens (D+1,) int64 over the B*row_len values, every row start and window start a boundary."""
    if row_len % patch_size:
        raise ValueError(f"pack_windows: row_len {row_len} is not a multiple of the patch size {patch_size}")
    rows: list[list[Window]] = []
    used: list[int] = []
    for w in windows:
        if len(w.input) % patch_size or len(w.input) != len(w.labels) or not len(w.input):
            raise ValueError("pack_windows: every window needs input and labels of one length, whole patches")
        if len(w.input) > row_len:
            w = Window(w.input[-row_len:], w.labels[-row_len:])
        for j in range(len(rows)):
            if used[j] + len(w.input) <= row_len:
                rows[j].append(w)
                used[j] += len(w.input)
                break
        else:
            rows.append([w])
            used.append(len(w.input))
    x = np.full((len(rows), row_len), np.nan, dtype=np.float32)
    y = np.full((len(rows), row_len), np.nan, dtype=np.float32)
    cu = [0]
    for j, row in enumerate(rows):
        at = 0
        for w in row:
            x[j, at:at + len(w.input)] = w.input
            y[j, at:at + len(w.labels)] = w.labels
            at += len(w.input)
            cu.append(j * row_len + at)
        if at < row_len:
            cu.append((j + 1) * row_len)
    return torch.from_numpy(x), torch.from_numpy(y), torch.tensor(cu, dtype=torch.int64)


__all__ = ["Series", "Window", "read_series", "future_timestamps", "forecast_rows", "write_table", "pack_windows",
           "LAYOUTS"]
