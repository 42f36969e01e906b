"""Resumable result tables shared by the experiments (grid, ablation, LRA, speed, scaling).

Each experiment writes one CSV per output folder; a row is appended as soon as its cell finishes, keyed by
the spec fields that determine its result. A rerun skips the keys already there (a crashed or interrupted
cell is simply not there, so it runs again) and appends new ones. A cell whose training diverged is a finished
row too, with ``status`` "diverged": the experiment goes on with the next cell, and a rerun does not repeat it.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

# A trained row's ``status``: "ok", or "diverged" when training diverged (the loss or a weight became nan or inf);
# a diverged row is finished (a rerun does not run it again) and tables show it as diverged. CSVs written before
# the column existed read as all "ok".
STATUS, OK, DIVERGED = "status", "ok", "diverged"
SCORE_FIELDS = ("score", "accuracy", "val_bpb", "val_loss")  # a finished "ok" row has these finite (those it has)


def is_diverged(row: Mapping) -> bool:
    """Whether a row records a diverged cell, rung or run."""
    return row.get(STATUS) == DIVERGED


def is_result(row: Mapping) -> bool:
    """A whole row (not a line cut short by a crash: missing or extra fields, no ``finished_at``, a ``status``
    empty or cut mid-word) that is either diverged, or ok with finite scores (``SCORE_FIELDS``; a CSV without the
    status column is all ok, and an older version wrote a diverged cell as a nan score, which is not a result: a
    rerun runs it again)."""
    if None in row or any(v is None for v in row.values()) or row.get("finished_at", "x") == "":
        return False
    status = row.get(STATUS, OK)
    if status == DIVERGED:
        return True
    if status != OK:
        return False
    try:
        return all(math.isfinite(float(row[k])) for k in SCORE_FIELDS if k in row)
    except ValueError:
        return False


def read_results(path: Union[str, Path]) -> list[dict]:
    """The finished rows of a results CSV (strings; see ``is_result``), or [] if it does not exist. Other rows
    are not results: a rerun runs their cells again."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if is_result(r)]


def row_key(row: dict, key_fields: Sequence[str]) -> tuple:
    """The key of a row (or a spec as a dict): its key fields as strings, as the CSV stores them."""
    return tuple(str(row.get(k, "")) for k in key_fields)


def done_keys(path: Union[str, Path], key_fields: Sequence[str]) -> set:
    """Keys of the rows already in ``path`` (empty if it does not exist). A CSV without the key fields is an
    error: it belongs to another experiment or version."""
    rows = read_results(path)
    if rows and any(k not in rows[0] for k in key_fields):
        missing = [k for k in key_fields if k not in rows[0]]
        raise ValueError(f"{path} lacks the columns {missing}: it was written by another experiment or version; "
                         "use another --out")
    return {row_key(r, key_fields) for r in rows}


def pending(specs: Sequence, path: Union[str, Path], fields: Sequence[str], key_fields: Sequence[str]) -> list:
    """The dataclass ``specs`` not yet in the results CSV ``path`` (their fields in order are its
    ``key_fields``), after upgrading an older CSV to ``fields`` (a missing status column reads as ok)."""
    upgrade_csv(path, fields, {STATUS: OK})
    done = done_keys(path, key_fields)
    return [s for s in specs if tuple(str(v) for v in asdict(s).values()) not in done]


def start_row(path: Union[str, Path]) -> bool:
    """Make ``path`` ready for one more row: True when it is new or empty (the header comes first); when its last
    line was cut short by a crash (no newline at the end), a newline, so the row starts a line of its own."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return True
    with path.open("rb") as f:
        f.seek(-1, 2)
        cut = f.read(1) != b"\n"
    if cut:
        with path.open("a", newline="") as f:
            f.write("\r\n")  # the csv module's line ending
    return False


def append_row(path: Union[str, Path], row: dict, fields: Sequence[str]) -> None:
    """Append one row (the header first for a new file; after a line cut short, on a new line); columns
    outside ``fields`` are dropped, missing ones left empty."""
    new = start_row(path)
    with Path(path).open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in fields})


def upgrade_csv(path: Union[str, Path], fields: Sequence[str], defaults: Mapping[str, object]) -> list[dict]:
    """The result rows of ``path``, the file first rewritten in the columns ``fields`` if an older version wrote it
    with fewer: a column added since (such as ``status``) gets its value in ``defaults`` (what the older version
    ran or meant), so the folder can still be resumed and appended to. The original is kept as ``<name>.bak``
    (``<name>.bak.N`` when that exists: an earlier upgrade's backup is never replaced), and ``path`` is replaced
    in one rename, so a crash leaves either the old or the new file. A CSV with columns outside ``fields``, or
    without one that has no default, is an error (nothing is rewritten)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    with path.open(newline="") as f:
        columns = next(csv.reader(f), [])
    if columns == list(fields):
        return read_results(path)
    unknown = [c for c in columns if c not in fields]
    missing = [c for c in fields if c not in columns]
    if unknown or any(c not in defaults for c in missing):
        raise ValueError(f"{path} has columns this version does not write ({', '.join(unknown or missing)}); "
                         f"use another --out")
    rows = [{**{c: defaults[c] for c in missing}, **r} for r in read_results(path)]
    backup, n = path.with_name(path.name + ".bak"), 0
    while backup.exists():
        n += 1
        backup = path.with_name(f"{path.name}.bak.{n}")
    tmp = path.with_name(f".{path.name}.upgrade")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in fields} for r in rows)
    shutil.copy2(path, backup)
    os.replace(tmp, path)
    return read_results(path)


def markdown(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


__all__ = ["STATUS", "OK", "DIVERGED", "SCORE_FIELDS", "is_diverged", "is_result", "row_key", "done_keys", "pending", "start_row",
           "append_row", "upgrade_csv", "markdown", "pyplot", "read_results"]
