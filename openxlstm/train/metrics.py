"""Run logs: a metrics CSV (appendable across resumes), TensorBoard when installed, and a PNG loss plot."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

FIELDS = ["step", "tokens", "elapsed_s", "lr", "train_loss", "val_loss", "val_bpb", "tokens_per_s", "peak_mem_gib"]


class MetricsLog:
    """Rows of FIELDS in ``out/metrics.csv``; on resume, rows after the resumed step are dropped."""

    def __init__(self, out_dir: Path, resume_step: Optional[int] = None, tensorboard: bool = True):
        self.path = Path(out_dir) / "metrics.csv"
        rows = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
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
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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
        train = [(int(r["tokens"]), float(r["train_loss"])) for r in rows if r["train_loss"]]
        val = [(int(r["tokens"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
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
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


__all__ = ["MetricsLog", "read_metrics", "plot_losses", "FIELDS"]
