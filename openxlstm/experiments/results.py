"""Resumable result tables shared by the LRA, speed and scaling experiments.

Each experiment writes one CSV per output folder; a row is appended as soon as its cell finishes, keyed by
the spec fields that determine its result. A rerun skips the keys already there (a crashed or interrupted
cell is simply not there, so it runs again) and appends new ones.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Sequence, Union


def read_results(path: Union[str, Path]) -> list[dict]:
    """The finished rows of a results CSV (strings), or [] if it does not exist. A line cut short by a crash
    (missing fields, or no ``finished_at``) is not a finished row: a rerun runs its cell again."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if None not in r and None not in r.values() and r.get("finished_at")]


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


def append_row(path: Union[str, Path], row: dict, fields: Sequence[str]) -> None:
    """Append one row (the header first for a new file; after a line cut short, on a new line); columns
    outside ``fields`` are dropped."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open("rb") as f:
            f.seek(-1, 2)
            cut = f.read(1) != b"\n"
        if cut:  # the last line was cut short: start a new one
            with path.open("a", newline="") as f:
                f.write("\r\n")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in fields})


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


__all__ = ["row_key", "done_keys", "append_row", "markdown", "pyplot", "read_results"]
