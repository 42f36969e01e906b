"""``openxlstm forecast`` and ``openxlstm forecast-train``: quantile forecasts of the series in a file, and
fine-tuning or training a forecaster on them.

    openxlstm forecast --model DIR --data series.csv --horizon 48 --out forecasts.csv [--plot plot.png]
    openxlstm forecast-train --init DIR --data series.csv --horizon 48 --out runs/ft   # fine-tune TiRex
    openxlstm forecast-train --preset small --data series.csv --out runs/small         # from scratch

``--model`` / ``--init`` take TiRex's ``model.ckpt`` (or its directory), a forecaster directory of ours, or
a ``forecast-train`` run directory (its newest checkpoint). ``add_parser`` registers both commands on the
main parser's subparsers, ``run`` executes them; ``python -m openxlstm.forecasting.cli`` runs them alone.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from ..device import resolve_device
from ..errors import UserError
from ..options import arg_type, int_range
from .data import LAYOUTS, forecast_rows, read_series, write_table

ROLLOUT_HELP = ("window: TiRex's rollout, the whole window again per new patch; state: the window once, then "
                "one sLSTM step per new patch (faster for long horizons, see docs/forecasting.md)")


_positive_int = arg_type(int_range(1), int)
_number = arg_type(((lambda v: math.isfinite(v)), "a finite number"), float)


def _levels(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated quantile levels, got {text!r}") from None


def _data_options(p) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="CSV or Parquet file of series (long: item_id, timestamp, target "
                                                 "columns; or wide: one column per series)")
    g.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="long or wide (default: auto, long when the id and target columns exist)")
    g.add_argument("--id-column", default="item_id", help="series id column of the long layout (default: %(default)s)")
    g.add_argument("--timestamp-column", default="timestamp", help="time stamp column (default: %(default)s)")
    g.add_argument("--target-column", default="target", help="value column of the long layout (default: %(default)s)")


def add_parser(subparsers) -> None:
    """Register ``forecast`` and ``forecast-train`` on an argparse subparsers object."""
    p = subparsers.add_parser("forecast", help="quantile forecasts of time series with a TiRex forecaster",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="TiRex model.ckpt (or its folder), a forecaster directory or a "
                                                  "forecast-train run")
    _data_options(p)
    p.add_argument("--horizon", type=_positive_int, required=True, help="values to forecast per series")
    p.add_argument("--out", required=True, help="forecast file (.csv, or .parquet with pandas and pyarrow)")
    p.add_argument("--quantiles", type=_levels, default=None,
                   help="comma-separated levels among the model's (default: all, 0.1 ... 0.9 for TiRex)")
    p.add_argument("--rollout", choices=("window", "state"), default="window", help=ROLLOUT_HELP)
    p.add_argument("--max-context", type=_positive_int, default=None,
                   help="most recent values used per series (default: the model's training context, 2048 for "
                        "TiRex; more runs the recurrence over longer contexts)")
    p.add_argument("--batch-size", type=_positive_int, default=256,
                   help="series per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: a GPU when present)")
    p.add_argument("--backend", choices=("auto", "fused", "recurrent", "triton"), default="auto",
                   help="sLSTM kernel (default: auto, Triton on a GPU and fused elsewhere)")
    p.add_argument("--matmul", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: projections and FFNs in bfloat16 (about twice as fast where the CPU has "
                        "AVX512-BF16 or AMX; forecasts within ~1e-2), the recurrence stays float32")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw history and forecast bands of the first "
                                                              "series into this image (needs matplotlib)")
    p.add_argument("--plot-series", type=_positive_int, default=4, help="series in the plot (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and --plot) if they exist")

    t = subparsers.add_parser("forecast-train", help="fine-tune or train a TiRex forecaster on your series",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = t.add_argument_group("model (one of --init, --preset, --config; default --preset small)")
    src.add_argument("--init", default=None, help="start from this model: TiRex model.ckpt, a forecaster directory "
                                                  "or run")
    src.add_argument("--preset", default=None, help="a fresh model of this preset: small, tiny or tirex-35m")
    src.add_argument("--config", default=None, help="a fresh model of this TiRexConfig (JSON file or inline JSON)")
    _data_options(t)
    t.add_argument("--out", required=True, help="run directory (checkpoints, metrics.csv)")
    t.add_argument("--horizon", type=_positive_int, default=None,
                   help="values held out at the end of every series and scored as the validation forecast "
                        "(default: one patch)")
    t.add_argument("--context", type=_positive_int, default=None,
                   help="input values per training window, a multiple of the patch size (default: the model's)")
    t.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps (default: %(default)s)")
    t.add_argument("--batch-size", type=_positive_int, default=32, help="windows per step (default: %(default)s)")
    t.add_argument("--lr", type=_number, default=None, help="peak learning rate (default: 1e-4 with --init, else 1e-3)")
    t.add_argument("--min-lr", type=_number, default=None, help="end of the cosine decay (default: lr / 10)")
    t.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of --steps)")
    t.add_argument("--weight-decay", type=_number, default=0.01, help="AdamW weight decay on matrices")
    t.add_argument("--grad-clip", type=_number, default=1.0, help="gradient norm clip (0: none)")
    t.add_argument("--mask-prob", type=_number, default=0.5, help="share of windows with a run of input patches "
                                                                  "masked (contiguous patch masking)")
    t.add_argument("--max-mask-patches", type=_positive_int, default=4, help="longest masked run, in patches")
    t.add_argument("--eval-every", type=_positive_int, default=None, help="validate every this many steps "
                                                                          "(default: at the end)")
    t.add_argument("--save-every", type=_positive_int, default=None, help="checkpoint every this many steps "
                                                                          "(default: at the end)")
    t.add_argument("--log-every", type=_positive_int, default=10, help="print the loss every this many steps")
    t.add_argument("--max-minutes", type=_number, default=None, help="stop (and checkpoint) after this long")
    t.add_argument("--seed", type=int, default=0, help="seed of the windows and of a fresh model (default: 0)")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    t.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue the run in --out (or from checkpoint CKPT)")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")


# -- forecast ----------------------------------------------------------------------------------------------
def _device(text: str):
    return resolve_device(text)


def cmd_forecast(args) -> int:
    from . import from_pretrained

    out = Path(args.out).expanduser()
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {str(out)!r} exists; add --overwrite to replace it, or choose another name")
    if args.plot is not None:
        _check_plot_path(Path(args.plot), args.overwrite)
    model = from_pretrained(args.model, device=_device(args.device)).set_backends(slstm=args.backend,
                                                                                 matmul=args.matmul)
    series = read_series(args.data, args.layout, args.id_column, args.timestamp_column, args.target_column)
    levels = model.config.quantiles if args.quantiles is None else args.quantiles
    q, mean = model.forecast([s.values for s in series], args.horizon, quantile_levels=levels, rollout=args.rollout,
                             max_context=args.max_context, batch_size=args.batch_size)
    q, mean = q.cpu().numpy(), mean.cpu().numpy()
    header, rows = forecast_rows(series, q, mean, levels)
    write_table(out, header, rows, overwrite=args.overwrite)
    print(f"wrote {len(rows)} rows ({len(series)} series x {args.horizon} steps) to {out}")
    if args.plot is not None:
        plot_forecasts(Path(args.plot), series[:args.plot_series], q, mean, levels)
        print(f"wrote {args.plot}")
    return 0


def _check_plot_path(path: Path, overwrite: bool) -> None:
    if path.suffix.lower() != ".png":
        raise UserError(f"--plot {str(path)!r}: the image must end in .png")
    if path.exists() and not overwrite:
        raise UserError(f"--plot {str(path)!r} exists; add --overwrite to replace it")
    if not path.parent.is_dir():
        raise UserError(f"--plot {str(path)!r}: the folder {str(path.parent)!r} does not exist")


def plot_forecasts(path: Path, series, q: np.ndarray, mean: np.ndarray, levels) -> None:
    """One panel per series: the last values of its history, the mean forecast, and the bands between
    symmetric quantile levels (the widest lightest). Written atomically."""
    import os

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from None
    H = mean.shape[1]
    pairs = [(i, len(levels) - 1 - i) for i in range(len(levels) // 2)
             if abs(levels[i] + levels[len(levels) - 1 - i] - 1) < 1e-9]
    fig, axes = plt.subplots(len(series), 1, figsize=(9, 2.6 * len(series)), squeeze=False)
    for ax, s, j in zip(axes[:, 0], series, range(len(series))):
        hist = s.values[-max(3 * H, 64):]
        t_hist = np.arange(-len(hist), 0)
        t_fc = np.arange(0, H)
        ax.plot(t_hist, hist, color="#333333", lw=1, label="history")
        for k, (lo, hi) in enumerate(pairs):
            ax.fill_between(t_fc, q[j, :, lo], q[j, :, hi], color="#d94e4e", alpha=0.12 + 0.1 * k, lw=0,
                            label=f"{levels[lo]:g}-{levels[hi]:g}")
        ax.plot(t_fc, mean[j], color="#d94e4e", lw=1.3, label="forecast (median)")
        ax.axvline(-0.5, color="#888888", ls=":", lw=1)
        ax.set_title(str(s.item_id), fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=110)
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


# -- forecast-train ----------------------------------------------------------------------------------------
def _model_for_training(args):
    import torch

    from . import from_pretrained
    from ..models.tirex import PRESETS, TiRex, TiRexConfig, preset

    chosen = [name for name in ("init", "preset", "config") if getattr(args, name) is not None]
    if len(chosen) > 1:
        raise UserError(f"choose one of --init, --preset and --config (got --{' and --'.join(chosen)})")
    if args.init is not None:
        return from_pretrained(args.init).train()
    torch.manual_seed(args.seed)
    if args.config is not None:
        text = args.config
        try:
            data = json.loads(text if text.lstrip().startswith("{") else Path(text).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"--config: cannot read a JSON object from {text!r} ({e})") from None
        if isinstance(data, dict) and "model" in data and "arch" in data:  # a forecaster's config.json
            data = data["model"]
        try:
            return TiRex(TiRexConfig.from_dict(data))
        except (TypeError, ValueError) as e:
            raise UserError(f"--config: {e}") from None
    name = args.preset or "small"
    if name not in PRESETS:
        raise UserError(f"--preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
    return TiRex(preset(name))


def cmd_forecast_train(args) -> int:
    from ..train.rundir import prepare_run_dir
    from .train import FitConfig, fit

    out = Path(args.out).expanduser()
    resume = None
    if args.resume is not None:
        from ..io.run import resolve_checkpoint

        where = out if args.resume == "auto" else Path(args.resume).expanduser()
        if not where.is_dir():
            raise UserError(f"--resume: {str(where)!r} is not a run or checkpoint directory")
        resume = resolve_checkpoint(where)
        if not (resume / "trainer.pt").is_file():
            raise UserError(f"--resume: {str(resume)!r} holds no trainer state (trainer.pt); it cannot be resumed")
    series = read_series(args.data, args.layout, args.id_column, args.timestamp_column, args.target_column)
    if resume is not None:
        from . import from_pretrained as load_forecaster

        model = load_forecaster(resume).train()
    else:
        model = _model_for_training(args)
    lr = args.lr if args.lr is not None else (1e-4 if args.init is not None else 1e-3)
    cfg = FitConfig(steps=args.steps, batch_size=args.batch_size, context=args.context, horizon=args.horizon, lr=lr,
                    min_lr=args.min_lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                    grad_clip=args.grad_clip, mask_prob=args.mask_prob, max_mask_patches=args.max_mask_patches,
                    seed=args.seed, device=args.device, log_every=args.log_every, eval_every=args.eval_every,
                    save_every=args.save_every, max_minutes=args.max_minutes).check()
    lock = prepare_run_dir(out, resume, args.overwrite)
    try:
        print(f"{model.num_params() / 1e6:.2f}M-parameter TiRex, {len(series)} series, {args.steps} steps -> {out}")
        report = fit(model, [s.values for s in series], cfg, run_dir=out, resume=resume)
    finally:
        lock.release()
    if report.heldout_after is not None:
        before = "" if report.heldout_before is None else f"{report.heldout_before:.4f} -> "
        print(f"held-out pinball loss {before}{report.heldout_after:.4f}")
    print(f"checkpoint: {report.checkpoint} (forecast with --model {out})")
    return 0


COMMANDS = {"forecast": cmd_forecast, "forecast-train": cmd_forecast_train}


def run(args) -> int:
    """Run the command ``args.command`` ("forecast" or "forecast-train") parsed by ``add_parser``'s parsers."""
    return COMMANDS[args.command](args)
