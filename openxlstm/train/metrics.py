"""Run logs: a metrics CSV (appendable across resumes), TensorBoard when installed, and a PNG loss plot."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Optional

from ..errors import UserError

FIELDS = ["step", "tokens", "elapsed_s", "lr", "train_loss", "val_loss", "val_bpb", "tokens_per_s", "peak_mem_gib"]


class MetricsLog:
    """Rows of FIELDS in ``out/metrics.csv``; on resume, rows after the resumed step are dropped."""

    def __init__(self, out_dir: Path, resume_step: Optional[int] = None, tensorboard: bool = True):
        self.path = Path(out_dir) / "metrics.csv"
        rows = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:  # rows cut short by a crash or unreadable are dropped
                rows = [r for r in csv.DictReader(f)
                        if (r.get("step") or "").isdigit() and int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:
                self.tb = None

    def log(self, **row) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS).writerow({k: row.get(k, "") for k in FIELDS})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics CSV with "step" and "tokens" as ints and the losses as floats (None where a row
    has none); a file that is not such a CSV is a UserError naming the file and the line."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("step", "tokens", "train_loss", "val_loss") if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{str(path)!r} is not a metrics CSV of openxlstm train: no column {missing[0]!r}")
            rows = []
            for line, r in enumerate(reader, start=2):
                try:
                    row = {"step": int(r["step"]), "tokens": int(r["tokens"])}
                    for key in ("train_loss", "val_loss"):
                        row[key] = float(r[key]) if r.get(key) else None
                except (TypeError, ValueError):
                    raise UserError(f"{str(path)!r}, line {line}: not a row of numbers ({r.get('step')!r}, "
                                    f"{r.get('tokens')!r}, ...); the file is damaged") from None
                rows.append({**r, **row})
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {str(path)!r}: {e}") from None


def plot_losses(csv_paths: dict, png_path: Path, title: str = "") -> Optional[Path]:
    """Plot train (thin) and validation (markers) loss against tokens for one or more runs.

    csv_paths: {label: metrics.csv path}. Returns the PNG path, or None without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for j, (label, path) in enumerate(csv_paths.items()):
        rows = read_metrics(path)
        color = f"C{j}"
        finite = lambda v: v is not None and math.isfinite(v)  # noqa: E731
        train = [(r["tokens"], r["train_loss"]) for r in rows if finite(r["train_loss"])]
        val = [(r["tokens"], r["val_loss"]) for r in rows if finite(r["val_loss"])]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.45, lw=1, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), color=color, marker="o", ms=3, lw=1.5, label=f"{label} val")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.tmp-{os.getpid()}{png_path.suffix}")
    try:
        fig.savefig(tmp)  # then renamed: an image being replaced is never left half written
        os.replace(tmp, png_path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return png_path


__all__ = ["MetricsLog", "read_metrics", "plot_losses", "FIELDS"]
