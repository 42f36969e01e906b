"""``openxlstm experiment forecasting``: pretrain a small TiRex on synthetic series, then forecast real ones
zero-shot and after fine-tuning, against seasonal naive, ETS and Theta (statsmodels) in the same run.

1. Pretraining data (nothing downloaded): KernelSynth-like Gaussian-process samples (a random composition of
   1-4 kernels from a bank of constant, linear, RBF, rational-quadratic, periodic and white-noise kernels,
   joined by + or *) and mixtures of them (convex combinations of 2-3 standardized samples, Dirichlet
   weights, as Chronos' TSMixup).
2. A small TiRex (``pad_context=False``: packed windows, no padding) is pretrained on them through the
   training engine, with pinball loss and contiguous patch masking (``openxlstm.forecasting.train``).
3. Real series that ship with statsmodels (``statsmodels.datasets``): Mauna Loa CO2 (weekly, with missing
   weeks), El Nino sea-surface temperatures (monthly), sunspots and Nile flow (yearly), US macro series
   (quarterly, ``macrodata``), interest rate and inflation (quarterly), and fertility rates of the first
   countries of ``fertility`` (yearly). The last H values of every series are the test window.
4. Each method forecasts every test window from the values before it: seasonal naive (Gaussian quantiles
   from its in-sample errors), ETS (additive errors, damped trend, seasonal where the period allows),
   Theta, our TiRex zero-shot, and the same TiRex fine-tuned on the real series' values before their test
   windows (the last window before the test one held out for validation).
5. Scores per dataset: MASE (mean absolute error of the median over the in-sample seasonal naive error,
   averaged over series) and WQL (the weighted quantile loss at the levels 0.1 .. 0.9: 2 x pinball loss
   summed over series and steps, over the summed |target|, averaged over levels); an aggregate row with the
   geometric mean over datasets of each score relative to seasonal naive.

Output (``--out``, default runs/forecasting): results.csv (one row per dataset and method), results.md
(the table), the pretraining and fine-tuning run directories (resumed when rerun). ``--scale smoke`` runs in
seconds (CI), ``--scale cpu`` is the documented run.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..device import resolve_device
from ..errors import UserError
from ..options import add_options, arg_type, int_range
from ..train.config import TrainConfig

LEVELS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
METHODS = ("seasonal naive", "ETS", "Theta", "TiRex zero-shot", "TiRex fine-tuned")
STATE = ", state rollout"  # the TiRex rows again with rollout="state" (results.csv and the second table)


@dataclass(frozen=True)
class ForecastScale:
    name: str
    synthetic_series: int  # Gaussian-process samples (as many mixtures again)
    synthetic_length: int
    model: dict  # TiRexConfig fields
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float
    max_series: int  # per dataset (fertility has ~200 countries, macrodata 12 series)


SCALES = {
    "smoke": ForecastScale("smoke", synthetic_series=24, synthetic_length=192,
                           model=dict(patch_size=16, embedding_dim=32, num_heads=2, num_blocks=2, input_ff_dim=64,
                                      train_ctx_len=128, pad_context=False),
                           pretrain_steps=12, pretrain_batch=16, pretrain_lr=2e-3, finetune_steps=6, finetune_batch=16,
                           finetune_lr=5e-4, max_series=3),
    "cpu": ForecastScale("cpu", synthetic_series=800, synthetic_length=768,
                         model=dict(patch_size=16, embedding_dim=128, num_heads=4, num_blocks=4, input_ff_dim=256,
                                    train_ctx_len=512, pad_context=False),
                         pretrain_steps=3000, pretrain_batch=64, pretrain_lr=1e-3, finetune_steps=300,
                         finetune_batch=32, finetune_lr=1e-4, max_series=30),
}


# -- 1. synthetic series -----------------------------------------------------------------------------------
PERIODS = [4, 6, 7, 12, 14, 24, 26, 30, 48, 52, 60, 96, 168, 365]


def _kernel(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """One kernel matrix of the bank on time points t in [0, 1]."""
    d = t[:, None] - t[None, :]
    kind = rng.choice(["constant", "linear", "rbf", "rq", "periodic", "periodic", "white"])
    if kind == "constant":
        return np.full_like(d, rng.uniform(0.1, 1.0))
    if kind == "linear":
        c = rng.uniform(0, 1)
        return rng.uniform(0.1, 1.0) * (t[:, None] - c) * (t[None, :] - c)
    if kind == "rbf":
        ls = rng.choice([0.02, 0.05, 0.1, 0.3, 1.0])
        return np.exp(-0.5 * (d / ls) ** 2)
    if kind == "rq":
        ls, a = rng.choice([0.05, 0.1, 0.3, 1.0]), rng.choice([0.1, 1.0, 10.0])
        return (1 + d**2 / (2 * a * ls**2)) ** -a
    if kind == "periodic":
        period = rng.choice(PERIODS) / len(t)
        return np.exp(-2 * np.sin(np.pi * np.abs(d) / period) ** 2 / rng.choice([0.5, 1.0, 2.0]) ** 2)
    return np.eye(len(t)) * rng.uniform(0.01, 0.1)


def kernel_synth(n: int, length: int, seed: int) -> list[np.ndarray]:
    """n Gaussian-process samples of ``length`` points, each from a random composition of 1-4 kernels."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, length)
    out = []
    for _ in range(n):
        K = _kernel(rng, t)
        for _ in range(int(rng.integers(0, 4))):
            K = K + _kernel(rng, t) if rng.random() < 0.5 else K * _kernel(rng, t)
        K = K + 1e-5 * np.eye(length) * max(float(np.trace(K)) / length, 1e-3)
        try:
            L = np.linalg.cholesky(K)
        except np.linalg.LinAlgError:  # rounding made it indefinite: the PSD part of its eigendecomposition
            w, V = np.linalg.eigh((K + K.T) / 2)
            L = V * np.sqrt(np.clip(w, 0, None))
        out.append(L @ rng.standard_normal(length))
    return out


def mixtures(series: list[np.ndarray], n: int, seed: int) -> list[np.ndarray]:
    """n convex combinations of 2-3 standardized series (Dirichlet weights)."""
    rng = np.random.default_rng(seed)
    z = [(s - s.mean()) / (s.std() + 1e-8) for s in series]
    out = []
    for _ in range(n):
        k = int(rng.integers(2, 4))
        pick = rng.choice(len(z), size=k, replace=False)
        w = rng.dirichlet([1.5] * k)
        out.append(sum(wj * z[j] for wj, j in zip(w, pick)))
    return out


def synthetic_corpus(scale: ForecastScale, seed: int) -> list[np.ndarray]:
    gp = kernel_synth(scale.synthetic_series, scale.synthetic_length, seed)
    return gp + mixtures(gp, scale.synthetic_series, seed + 1)


# -- 3. real series ----------------------------------------------------------------------------------------
@dataclass
class Dataset:
    name: str
    season: int  # m of the seasonal naive forecast and of MASE
    horizon: int
    series: list  # (id, values) pairs


def real_datasets(max_series: int) -> list[Dataset]:
    """The statsmodels datasets of the module docstring (at most ``max_series`` series each)."""
    try:
        from statsmodels import datasets as smd
    except ImportError:
        raise UserError("the forecasting experiment needs statsmodels (its datasets and the ETS / Theta "
                        "baselines): pip install statsmodels") from None
    out = []
    co2 = smd.co2.load_pandas().data["co2"].to_numpy(dtype=float)
    out.append(Dataset("co2 (weekly)", 52, 52, [("co2", co2)]))
    el = smd.elnino.load_pandas().data.drop(columns="YEAR").to_numpy(dtype=float).reshape(-1)
    out.append(Dataset("elnino (monthly)", 12, 24, [("elnino", el)]))
    sun = smd.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(dtype=float)
    nile = smd.nile.load_pandas().data["volume"].to_numpy(dtype=float)
    out.append(Dataset("sunspots, nile (yearly)", 1, 10, [("sunspots", sun), ("nile", nile)]))
    macro = smd.macrodata.load_pandas().data.drop(columns=["year", "quarter"])
    out.append(Dataset("macrodata (quarterly)", 4, 8,
                       [(c, macro[c].to_numpy(dtype=float)) for c in macro.columns][:max_series]))
    ii = smd.interest_inflation.load_pandas().data
    out.append(Dataset("interest_inflation (quarterly)", 4, 8, [(c, ii[c].to_numpy(dtype=float)) for c in ("Dp", "R")]))
    fert = smd.fertility.load_pandas().data
    years = [c for c in fert.columns if c.isdigit()]
    rows = []
    for _, r in fert.iterrows():
        v = r[years].to_numpy(dtype=float)
        if np.isfinite(v).sum() >= 40:
            v = v[:int(np.flatnonzero(np.isfinite(v))[-1]) + 1]
            rows.append((str(r["Country Code"]), v))
    out.append(Dataset("fertility (yearly)", 1, 6, rows[:max_series]))
    return out


# -- 4. baselines ------------------------------------------------------------------------------------------
def _filled(v: np.ndarray) -> np.ndarray:
    """Missing values linearly interpolated (ends held), for the baselines that need complete series."""
    v = np.asarray(v, dtype=float)
    ok = np.isfinite(v)
    if ok.all():
        return v
    idx = np.arange(len(v))
    return np.interp(idx, idx[ok], v[ok])


def _normal_quantiles(point: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    from statistics import NormalDist

    z = np.array([NormalDist().inv_cdf(q) for q in LEVELS])
    return point[:, None] + sigma[:, None] * z[None, :]


def seasonal_naive(v: np.ndarray, m: int, H: int) -> np.ndarray:
    """(H, Q): the value one season back, Gaussian bands from the in-sample seasonal errors."""
    y = _filled(v)
    m = m if len(y) > m else 1
    point = np.array([y[len(y) - m + (h % m)] for h in range(H)])
    resid = y[m:] - y[:-m]
    sigma = np.sqrt(np.mean(resid**2)) if len(resid) else 0.0
    return _normal_quantiles(point, sigma * np.sqrt(np.arange(H) // m + 1))


def _from_intervals(point: np.ndarray, interval: Callable[[float], tuple]) -> np.ndarray:
    q = np.empty((len(point), len(LEVELS)))
    for j, level in enumerate(LEVELS):
        if abs(level - 0.5) < 1e-9:
            q[:, j] = point
            continue
        lo, hi = interval(2 * min(level, 1 - level))
        q[:, j] = lo if level < 0.5 else hi
    return q


def ets(v: np.ndarray, m: int, H: int) -> np.ndarray:
    """(H, Q): statsmodels ETS, additive errors and damped trend, additive season when 2 seasons fit."""
    import pandas as pd
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    y = pd.Series(_filled(v))  # its prediction intervals need a pandas index
    seasonal = "add" if m > 1 and len(y) >= 2 * m + 2 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ETSModel(y, error="add", trend="add", damped_trend=True, seasonal=seasonal,
                       seasonal_periods=m if seasonal else None).fit(disp=False, maxiter=200)
        pred = res.get_prediction(start=len(y), end=len(y) + H - 1)
        point = np.asarray(pred.predicted_mean)

        def interval(alpha):
            pi = np.asarray(pred.pred_int(alpha=alpha))
            return pi[:, 0], pi[:, 1]

        return _from_intervals(point, interval)


def theta(v: np.ndarray, m: int, H: int) -> np.ndarray:
    """(H, Q): statsmodels' Theta method (additive deseasonalizing where the period allows)."""
    from statsmodels.tsa.forecasting.theta import ThetaModel

    y = _filled(v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        season = m > 1 and len(y) >= 2 * m
        res = ThetaModel(y, period=m if season else 1, deseasonalize=season, method="additive").fit()
        point = np.asarray(res.forecast(H))

        def interval(alpha):
            pi = np.asarray(res.prediction_intervals(H, alpha=alpha))
            return pi[:, 0], pi[:, 1]

        return _from_intervals(point, interval)


def _safe(method, v, m, H) -> np.ndarray:
    """A baseline's forecast, or seasonal naive's where the model fails to fit (reported in the log)."""
    try:
        q = method(v, m, H)
        if np.isfinite(q).all():
            return q
    except Exception as e:  # noqa: BLE001 - statsmodels raises many types on degenerate series
        print(f"    {method.__name__} failed ({type(e).__name__}); seasonal naive instead", file=sys.stderr)
    return seasonal_naive(v, m, H)


# -- 5. scores ---------------------------------------------------------------------------------------------
def mase(context: np.ndarray, target: np.ndarray, median: np.ndarray, m: int) -> float:
    y = _filled(context)
    m = m if len(y) > m else 1
    scale = np.mean(np.abs(y[m:] - y[:-m]))
    ok = np.isfinite(target)
    if not ok.any() or not scale > 0:
        return math.nan
    return float(np.mean(np.abs(target[ok] - median[ok])) / scale)


def wql_terms(target: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """(sum over steps and levels of 2 x pinball loss / number of levels, sum |target|) of one series."""
    ok = np.isfinite(target)
    y = target[ok][:, None]
    diff = y - q[ok]
    lv = np.asarray(LEVELS)[None, :]
    loss = np.maximum(lv * diff, (lv - 1) * diff)
    return float(2 * loss.sum() / len(LEVELS)), float(np.abs(y).sum())


# -- the run -----------------------------------------------------------------------------------------------
def _pretrained(scale: ForecastScale, out: Path, seed: int, device: str, log) -> "torch.nn.Module":
    from ..forecasting import TiRex, TiRexConfig
    from ..forecasting import from_pretrained as load_forecaster
    from ..forecasting.train import FitConfig, fit

    run = out / "pretrain"
    done = _finished(run, scale.pretrain_steps)
    if done is not None:
        log(f"pretrained model: {done} (reused)")
        return load_forecaster(done)
    t0 = time.time()
    corpus = synthetic_corpus(scale, seed)
    log(f"synthetic corpus: {len(corpus)} series of {scale.synthetic_length} values ({time.time() - t0:.1f}s)")
    torch.manual_seed(seed)
    model = TiRex(TiRexConfig(**scale.model))
    log(f"pretraining a {model.num_params() / 1e6:.2f}M-parameter TiRex for {scale.pretrain_steps} steps")
    resume = _latest(run)
    if resume is not None:
        model = load_forecaster(resume)
    cfg = FitConfig(steps=scale.pretrain_steps, batch_size=scale.pretrain_batch, lr=scale.pretrain_lr,
                    horizon=model.config.patch_size * 2, seed=seed, device=device,
                    log_every=max(1, scale.pretrain_steps // 10), save_every=max(1, scale.pretrain_steps // 4))
    fit(model.train(), corpus, cfg, run_dir=run, resume=resume, log=log)
    return load_forecaster(_finished(run, scale.pretrain_steps))


def _latest(run: Path) -> Optional[Path]:
    p = run / "latest"
    if p.is_file():
        c = run / p.read_text().strip()
        if (c / "trainer.pt").is_file():
            return c
    return None


def _finished(run: Path, steps: int) -> Optional[Path]:
    c = _latest(run)
    return c if c is not None and c.name == f"ckpt-{steps:06d}" else None


def _fine_tuned(model, datasets: list[Dataset], scale: ForecastScale, out: Path, seed: int, device: str, log):
    from ..forecasting import from_pretrained as load_forecaster
    from ..forecasting.train import FitConfig, fit

    run = out / "finetune"
    done = _finished(run, scale.finetune_steps)
    if done is not None:
        log(f"fine-tuned model: {done} (reused)")
        return load_forecaster(done)
    train = [v[:-d.horizon] for d in datasets for _, v in d.series]  # never the test windows
    resume = _latest(run)
    tuned = load_forecaster(resume) if resume is not None else copy.deepcopy(model)
    cfg = FitConfig(steps=scale.finetune_steps, batch_size=scale.finetune_batch, lr=scale.finetune_lr,
                    horizon=max(d.horizon for d in datasets), seed=seed + 7, device=device,
                    log_every=max(1, scale.finetune_steps // 5), save_every=max(1, scale.finetune_steps // 2))
    log(f"fine-tuning on the {len(train)} real series (values before their test windows) for "
        f"{scale.finetune_steps} steps")
    fit(tuned.train(), train, cfg, run_dir=run, resume=resume, log=log)
    return load_forecaster(_finished(run, scale.finetune_steps))


def evaluate_methods(datasets: list[Dataset], models: dict, log) -> list[dict]:
    """One row per dataset and method: MASE (mean over series) and WQL, with the series count."""
    rows = []
    for d in datasets:
        contexts = [v[:-d.horizon] for _, v in d.series]
        targets = [v[-d.horizon:] for _, v in d.series]
        forecasts = {
            "seasonal naive": [seasonal_naive(c, d.season, d.horizon) for c in contexts],
            "ETS": [_safe(ets, c, d.season, d.horizon) for c in contexts],
            "Theta": [_safe(theta, c, d.season, d.horizon) for c in contexts],
        }
        for name, (model, rollout) in models.items():
            q, _ = model.forecast([torch.tensor(c, dtype=torch.float32) for c in contexts], d.horizon,
                                  quantile_levels=LEVELS, rollout=rollout)
            forecasts[name] = list(q.cpu().numpy().astype(float))
        for name, fc in forecasts.items():
            m = [mase(c, t, f[:, LEVELS.index(0.5)], d.season) for c, t, f in zip(contexts, targets, fc)]
            terms = [wql_terms(t, f) for t, f in zip(targets, fc)]
            denom = sum(b for _, b in terms)
            row = {"dataset": d.name, "method": name, "series": len(d.series), "horizon": d.horizon,
                   "mase": float(np.nanmean(m)) if np.isfinite(m).any() else math.nan,
                   "wql": sum(a for a, _ in terms) / denom if denom > 0 else math.nan, "rollout_gap": ""}
            base = name.replace(STATE, "")
            if name.endswith(STATE) and base in forecasts:  # the stateful rollout against the sliding window
                a, b = np.stack(fc), np.stack(forecasts[base])
                row["rollout_gap"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
            rows.append(row)
        done = rows[-len(forecasts):]
        log(f"  {d.name}: " + ", ".join(f"{r['method']} {r['mase']:.3f}/{r['wql']:.3f}" for r in done))
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Per method: the geometric mean over datasets of MASE and WQL relative to seasonal naive."""
    base = {(r["dataset"], k): r[k] for r in rows if r["method"] == "seasonal naive" for k in ("mase", "wql")}
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        agg = {"dataset": "geometric mean, relative to seasonal naive", "method": method}
        for k in ("mase", "wql"):
            ratios = [r[k] / base[(r["dataset"], k)] for r in rows if r["method"] == method
                      and math.isfinite(r[k]) and base[(r["dataset"], k)] > 0]
            agg[k] = float(np.exp(np.mean(np.log(ratios)))) if ratios else math.nan
        out.append(agg)
    return out


def write_report(out: Path, rows: list[dict], agg: list[dict], header: str) -> Path:
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["dataset", "method", "series", "horizon", "mase", "wql", "rollout_gap"])
        w.writeheader()
        w.writerows(rows + [dict(a, series="", horizon="", rollout_gap="") for a in agg])
    lines = _table(header, rows, agg, [m for m in dict.fromkeys(r["method"] for r in rows) if not m.endswith(STATE)])
    state = [r for r in rows if r["method"].endswith(STATE)]
    if state:
        lines += ["", "Stateful rollout (rollout=\"state\": the window once, then one sLSTM step per further patch) "
                  "against TiRex's sliding window: MASE / WQL, and the relative difference of the two forecasts "
                  "(norm over the dataset's quantiles)", "",
                  "| dataset (series, horizon) | zero-shot, window | zero-shot, state | gap | fine-tuned, window | "
                  "fine-tuned, state | gap |", "|---|---|---|---|---|---|---|"]
        by = {(r["dataset"], r["method"]): r for r in rows}
        for d in dict.fromkeys(r["dataset"] for r in rows):
            cells = []
            for base in ("TiRex zero-shot", "TiRex fine-tuned"):
                w, st = by[(d, base)], by[(d, base + STATE)]
                cells += [f"{w['mase']:.3f} / {w['wql']:.3f}", f"{st['mase']:.3f} / {st['wql']:.3f}",
                          f"{st['rollout_gap']:.1e}"]
            lines.append(f"| {d} ({by[(d, 'TiRex zero-shot')]['series']}, {by[(d, 'TiRex zero-shot')]['horizon']}) | "
                         + " | ".join(cells) + " |")
        g = {a["method"]: a for a in agg}
        cells = []
        for base in ("TiRex zero-shot", "TiRex fine-tuned"):
            cells += [f"{g[m]['mase']:.3f} / {g[m]['wql']:.3f}" for m in (base, base + STATE)] + [""]
        lines.append(f"| {agg[0]['dataset']} | " + " | ".join(cells) + " |")
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _table(header: str, rows: list[dict], agg: list[dict], methods: list[str]) -> list[str]:
    """The main table: one row per dataset and the aggregate, a MASE / WQL cell per method."""
    lines = [header, "", "MASE / WQL (lower is better; best of each row in bold)", "",
             "| dataset (series, horizon) | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    table = {}
    for r in rows:
        table.setdefault((r["dataset"], r["series"], r["horizon"]), {})[r["method"]] = r
    for (name, n, H), by in list(table.items()) + [((a["dataset"], None, None), None) for a in agg[:1]]:
        if by is None:
            by = {a["method"]: a for a in agg}
            label = name
        else:
            label = f"{name} ({n}, {H})"
        best = {k: min((by[m][k] for m in methods if math.isfinite(by[m][k])), default=math.nan)
                for k in ("mase", "wql")}

        def cell(m):
            parts = []
            for k in ("mase", "wql"):
                v = by[m][k]
                s = "n/a" if not math.isfinite(v) else f"{v:.3f}"
                parts.append(f"**{s}**" if math.isfinite(v) and v == best[k] else s)
            return " / ".join(parts)

        lines.append(f"| {label} | " + " | ".join(cell(m) for m in methods) + " |")
    return lines


def run_forecasting(scale: ForecastScale, out, seed: int = 0, device: str = "cpu", log=print,
                    threads: Optional[int] = 1) -> list[dict]:
    """The whole experiment (see the module docstring); returns the result rows (aggregate rows last).

    threads: torch's and numpy's BLAS threads during the run (None: leave them); on a CPU shared with other
    jobs more threads spin while they wait and slow every step down (several times on 2 busy cores)."""
    if threads is None:
        return _run(scale, out, seed, device, log)
    from contextlib import nullcontext

    try:  # numpy's BLAS (the Gaussian processes, statsmodels) spins like torch's OpenMP threads
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads) if threadpool_limits is not None else nullcontext():
            return _run(scale, out, seed, device, log)
    finally:
        torch.set_num_threads(before)


def _run(scale: ForecastScale, out, seed: int, device: str, log) -> list[dict]:

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    datasets = real_datasets(scale.max_series)
    log("real series: " + ", ".join(f"{d.name} {len(d.series)}" for d in datasets))
    pretrained = _pretrained(scale, out, seed, device, log)
    tuned = _fine_tuned(pretrained, datasets, scale, out, seed, device, log)
    log("evaluating on the test windows:")
    models = {"TiRex zero-shot": (pretrained, "window"), "TiRex fine-tuned": (tuned, "window"),
              "TiRex zero-shot" + STATE: (pretrained, "state"), "TiRex fine-tuned" + STATE: (tuned, "state")}
    rows = evaluate_methods(datasets, models, log)
    agg = aggregate(rows)
    n_params = pretrained.num_params()
    header = (f"Forecasting experiment, scale {scale.name}: a {n_params / 1e6:.2f}M-parameter TiRex pretrained "
              f"{scale.pretrain_steps} steps on {2 * scale.synthetic_series} synthetic series, fine-tuned "
              f"{scale.finetune_steps} steps; seed {seed}; {time.time() - t0:.0f} s.")
    path = write_report(out, rows, agg, header)
    log(path.read_text())
    return rows + agg


# -- command line ------------------------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``forecasting`` on the subparsers of ``openxlstm experiment``."""
    p = subparsers.add_parser("forecasting", help="TiRex pretrained on synthetic series: zero-shot and fine-tuned "
                                                  "forecasts of real series against seasonal naive, ETS, Theta")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                   help="smoke: seconds (CI); cpu: the documented run, about half an hour on 2 cores")
    p.add_argument("--out", default="runs/forecasting", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=arg_type(int_range(0, 2**63 - 1), int), default=0,
                   help="seed of the synthetic data, the model and the windows (default: %(default)s)")
    p.add_argument("--threads", type=arg_type(int_range(1), int), default=1,
                   help="torch CPU threads (default: %(default)s: on a shared CPU more threads spin and slow every "
                        "step down)")
    add_options(p, TrainConfig, names=("device",))
    return p


def run(args) -> int:
    device = str(resolve_device(args.device or TrainConfig.device))
    run_forecasting(SCALES[args.scale], args.out, seed=args.seed, device=device, threads=args.threads)
    return 0


__all__ = ["SCALES", "ForecastScale", "run_forecasting", "kernel_synth", "mixtures", "real_datasets",
           "seasonal_naive", "ets", "theta", "mase", "wql_terms", "aggregate", "add_parser", "run"]
