"""Inference speed: xLSTM's fixed-size state against a Transformer's KV cache (the paper's Figure on
generation time and throughput), at equal parameter counts.

Two measurements per model (xLSTM[1:0], xLSTM[7:1] and the Transformer baseline, all untrained: speed does
not depend on the weights; greedy decoding):

  length   batch 1, a one-token prompt, then ``max_length`` generated tokens. ``path="step"``: the model's
           step loop (``model(tok, state, return_state=True)``), each step timed, reported as the mean time
           per token over the tokens in (L/2, L] and the total time to L; ``path="generate"``: the real
           generation path, ``openxlstm.generate(model, ids, max_new_tokens=L, temperature=0)``, timed as a
           whole for each L of ``generate_lengths``. Also the size of the state after L tokens.
  batch    ``openxlstm.generate`` at batch sizes 1, 2, 4, ... up to 256 (stops at the first that runs out of
           memory): a ``prompt``-token prompt, ``new_tokens`` generated; tokens/s = batch x new_tokens / time.

Rows go to ``speed.csv`` as each (measurement, model) finishes (a rerun skips them); ``speed.md`` (tables
with the device named) and ``speed.png`` (time per token and total time against length, tokens/s
against batch size) are rewritten from it.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch.utils._pytree import tree_leaves

from ..models.transformer import TransformerLM, sized_transformer_config
from ..generation import generate
from ..device import resolve_device
from .zoo import build_model
from .results import append_row, done_keys, markdown, pyplot, read_results

MODELS = ("xlstm[1:0]", "xlstm[7:1]", "transformer")


@dataclass(frozen=True)
class SpeedScale:
    name: str
    width: int  # the xLSTM models' embedding width; the Transformer is sized to xLSTM[1:0]'s parameters
    num_blocks: int
    vocab_size: int
    max_length: int  # batch-1 generation length
    generate_lengths: tuple[int, ...]  # lengths timed through openxlstm.generate
    batch_sizes: tuple[int, ...]
    prompt: int  # prompt tokens of the batch sweep
    new_tokens: int  # generated tokens of the batch sweep


SCALES = {
    "smoke": SpeedScale("smoke", 32, 2, 64, 32, (16, 32), (1, 2, 4), 4, 4),
    "cpu": SpeedScale("cpu", 256, 8, 256, 8192, (1024, 2048, 8192), (1, 2, 4, 8, 16, 32, 64, 128, 256), 64, 64),
    "paper": SpeedScale("paper", 1024, 24, 50304, 8192, (1024, 2048, 4096, 8192),
                        (1, 2, 4, 8, 16, 32, 64, 128, 256), 1024, 256),
}
KEY_FIELDS = ["measure", "model", "path", "batch", "scale", "device"]
CSV_FIELDS = KEY_FIELDS + ["params", "length", "ms_per_token", "total_s", "tokens_per_s", "state_mb", "note",
                           "finished_at"]


def device_name(device: torch.device) -> str:
    """The device in words: the GPU's name, or the CPU's model and the threads used."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU {name}, {torch.get_num_threads()} threads"


def speed_models(scale: SpeedScale, models=MODELS) -> dict:
    """{name: untrained model} at equal size: the xLSTM models at ``scale.width`` x ``scale.num_blocks``, the
    Transformer (as many layers, heads of 64, or of 16 below width 128) with the parameter count of
    xLSTM[1:0] as near as its width and then its FFN width allow."""
    out = {}
    for name in models:
        if name == "transformer":
            target = build_model("xlstm[1:0]", scale.vocab_size, scale.width, scale.num_blocks).num_params()
            config = sized_transformer_config(target, scale.vocab_size, num_layers=scale.num_blocks,
                                              head_dim=64 if scale.width >= 128 else 16)
            # then the FFN width (a multiple of 8) that brings the count closest to the target
            per_f = 3 * config.embedding_dim * config.num_layers
            rest = config.num_params() - per_f * config.ffn_dim
            ffn = max(8, 8 * round((target - rest) / per_f / 8))
            out[name] = TransformerLM(replace(config, ffn_dim=ffn))
        else:
            out[name] = build_model(name, scale.vocab_size, scale.width, scale.num_blocks)
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def state_mb(state) -> float:
    return sum(t.numel() * t.element_size() for t in tree_leaves(state) if isinstance(t, torch.Tensor)) / 2**20


@torch.no_grad()
def step_loop_times(model, max_length: int, device) -> tuple[list[float], list[float]]:
    """Batch 1, a one-token prompt, then ``max_length`` greedy tokens through the step loop ->
    (seconds of each step, state size in MB after each power of two and the last)."""
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    logits, state = model(tok, return_state=True)
    for _ in range(3):  # warm-up steps, not timed (their state is dropped)
        model(tok, state, return_state=True)
    times, sizes = [], {}
    for t in range(1, max_length + 1):
        _sync(device)
        t0 = time.perf_counter()
        tok = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        logits, state = model(tok, state, return_state=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if t & (t - 1) == 0 or t == max_length:
            sizes[t] = state_mb(state)
    return times, sizes


def checkpoints(max_length: int) -> list[int]:
    """Doublings from 128 (from max_length / 4 when that is less) up to max_length, and max_length."""
    out, L = [], max(1, min(128, max_length // 4))
    while L < max_length:
        out.append(L)
        L *= 2
    return out + [max_length]


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def run_speed(scale: SpeedScale, out_dir: Union[str, Path], device: str = "auto", models=MODELS,
              log: Callable[[str], None] = print) -> list[dict]:
    """Measure what ``out_dir/speed.csv`` lacks for this scale and device, then write the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "speed.csv"
    dev = resolve_device(device)
    dev_name = device_name(dev)
    done = done_keys(csv_path, KEY_FIELDS)
    zoo = speed_models(scale, models)
    rows: list[dict] = []
    base = dict(scale=scale.name, device=dev_name)

    def emit(row):
        row = {**base, **row, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        append_row(csv_path, row, CSV_FIELDS)
        rows.append(row)

    def pending(measure, name, path, batch) -> bool:
        return (measure, name, path, str(batch), scale.name, dev_name) not in done

    log(f"speed on {dev_name}: " + ", ".join(f"{n} {m.num_params():,} parameters" for n, m in zoo.items()))
    for name, model in zoo.items():
        model = model.to(dev).eval()
        params = model.num_params()
        if pending("length", name, "step", 1):
            log(f"  {name}: step loop, batch 1, {scale.max_length} tokens")
            times, sizes = step_loop_times(model, scale.max_length, dev)
            for L in checkpoints(scale.max_length):
                window = times[L // 2:L] if L > 1 else times[:1]
                emit(dict(measure="length", model=name, path="step", batch=1, params=params, length=L,
                          ms_per_token=round(1000 * sum(window) / len(window), 4), total_s=round(sum(times[:L]), 4),
                          state_mb=round(sizes.get(L, float("nan")), 4), note=f"mean over tokens {L // 2 + 1}..{L}"))
            last = times[scale.max_length // 2:]
            log(f"    {1000 * sum(last) / len(last):.2f} ms/token near {scale.max_length}, {sum(times):.1f}s in total")
        for L in scale.generate_lengths:
            if not pending("length", name, "generate", f"1@{L}"):
                continue
            ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
            generate(model, ids, max_new_tokens=min(8, L), temperature=0)  # warm-up
            s = _timed(lambda: generate(model, ids, max_new_tokens=L, temperature=0), dev)
            emit(dict(measure="length", model=name, path="generate", batch=f"1@{L}", params=params, length=L,
                      ms_per_token=round(1000 * s / L, 4), total_s=round(s, 4)))
            log(f"  {name}: generate {L} tokens in {s:.2f}s ({1000 * s / L:.2f} ms/token)")
        for B in scale.batch_sizes:
            if not pending("batch", name, "generate", B):
                continue
            ids = torch.randint(0, scale.vocab_size, (B, scale.prompt), device=dev,
                                generator=torch.Generator(device=dev).manual_seed(B))
            try:
                generate(model, ids, max_new_tokens=2, temperature=0)  # warm-up
                s = _timed(lambda: generate(model, ids, max_new_tokens=scale.new_tokens, temperature=0), dev)
            except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as e:
                if "out of memory" not in str(e).lower() and not isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)):
                    raise
                emit(dict(measure="batch", model=name, path="generate", batch=B, params=params, note="out of memory"))
                log(f"  {name}: batch {B} ran out of memory; larger batches skipped")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                break
            emit(dict(measure="batch", model=name, path="generate", batch=B, params=params,
                      length=scale.prompt + scale.new_tokens, total_s=round(s, 4),
                      tokens_per_s=round(B * scale.new_tokens / s, 2), ms_per_token=round(1000 * s / scale.new_tokens, 4),
                      note=f"prompt {scale.prompt}, {scale.new_tokens} new tokens"))
            log(f"  {name}: batch {B}: {B * scale.new_tokens / s:,.0f} tokens/s")
        model.cpu()
    write_speed_report(out_dir, log=log)
    return rows


def write_speed_report(out_dir: Union[str, Path], log: Callable[[str], None] = print) -> Optional[str]:
    """``speed.md`` and ``speed.png`` from ``out_dir/speed.csv`` (one section per device and scale)."""
    out_dir = Path(out_dir)
    rows = read_results(out_dir / "speed.csv")
    if not rows:
        log(f"no results in {out_dir / 'speed.csv'}")
        return None
    parts = ["# Inference speed (untrained models, greedy decoding)\n"]
    groups = sorted({(r["device"], r["scale"]) for r in rows})
    for dev, sc in groups:
        g = [r for r in rows if r["device"] == dev and r["scale"] == sc]
        models = list(dict.fromkeys(r["model"] for r in g))
        params = {r["model"]: int(r["params"]) for r in g}
        parts.append(f"## {dev}, scale {sc}\n\nParameters: " + ", ".join(f"{m} {params[m]:,}" for m in models) + "\n")
        step = [r for r in g if r["measure"] == "length" and r["path"] == "step"]
        lengths = sorted({int(r["length"]) for r in step})
        if step:
            cell = {(r["model"], int(r["length"])): r for r in step}
            parts.append("Batch 1, step loop: ms per token (mean over the second half of each length) / total seconds "
                         "/ state MB\n\n" + markdown(
                             ["model", *[str(L) for L in lengths]],
                             [[m, *[(f"{float(cell[(m, L)]['ms_per_token']):.2f} / {float(cell[(m, L)]['total_s']):.1f}s"
                                     f" / {float(cell[(m, L)]['state_mb']):.2f}" if (m, L) in cell else "") for L in lengths]]
                              for m in models]) + "\n")
        gen = [r for r in g if r["measure"] == "length" and r["path"] == "generate"]
        if gen:
            gl = sorted({int(r["length"]) for r in gen})
            cell = {(r["model"], int(r["length"])): r for r in gen}
            stepcell = {(r["model"], int(r["length"])): r for r in step}
            parts.append("Batch 1, `openxlstm.generate`: total seconds (step loop's total at the same length)\n\n"
                         + markdown(["model", *[str(L) for L in gl]],
                                    [[m, *[(f"{float(cell[(m, L)]['total_s']):.2f}s" +
                                            (f" ({float(stepcell[(m, L)]['total_s']):.2f}s)" if (m, L) in stepcell else "")
                                            if (m, L) in cell else "") for L in gl]] for m in models]) + "\n")
        bat = [r for r in g if r["measure"] == "batch"]
        if bat:
            bs = sorted({int(r["batch"]) for r in bat})
            cell = {(r["model"], int(r["batch"])): r for r in bat}
            note = next((r["note"] for r in bat if r["tokens_per_s"]), "")
            parts.append(f"Throughput, `openxlstm.generate` ({note}): tokens/s by batch size\n\n" + markdown(
                ["model", *[str(b) for b in bs]],
                [[m, *[(("OOM" if not cell[(m, b)]["tokens_per_s"] else f"{float(cell[(m, b)]['tokens_per_s']):,.0f}")
                        if (m, b) in cell else "") for b in bs]] for m in models]) + "\n")
    text = "\n".join(parts)
    (out_dir / "speed.md").write_text(text)
    speed_plot(rows, out_dir / "speed.png")
    log(text)
    log(f"wrote {out_dir / 'speed.md'} and {out_dir / 'speed.png'}")
    return text


def speed_plot(rows: list[dict], path: Union[str, Path]) -> None:
    """Three panels: ms per token and total time against the generated length (batch 1, step loop; total
    time through generate as markers), tokens/s against batch size."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    groups = sorted({(r["device"], r["scale"]) for r in rows})
    for dev, sc in groups:
        g = [r for r in rows if r["device"] == dev and r["scale"] == sc]
        tag = "" if len(groups) == 1 else f" ({sc}, {dev[:20]})"
        for m in dict.fromkeys(r["model"] for r in g):
            step = sorted((int(r["length"]), float(r["ms_per_token"]), float(r["total_s"])) for r in g
                          if r["model"] == m and r["measure"] == "length" and r["path"] == "step")
            if step:
                line, = axes[0].plot([s[0] for s in step], [s[1] for s in step], marker="o", label=m + tag)
                axes[1].plot([s[0] for s in step], [s[2] for s in step], marker="o", color=line.get_color(), label=m + tag)
                gen = sorted((int(r["length"]), float(r["total_s"])) for r in g
                             if r["model"] == m and r["measure"] == "length" and r["path"] == "generate")
                if gen:
                    axes[1].plot([x for x, _ in gen], [y for _, y in gen], "x", color=line.get_color(), markersize=9)
            bat = sorted((int(r["batch"]), float(r["tokens_per_s"])) for r in g
                         if r["model"] == m and r["measure"] == "batch" and r["tokens_per_s"])
            if bat:
                axes[2].plot([b for b, _ in bat], [t for _, t in bat], marker="o", label=m + tag)
    for ax, (xl, yl) in zip(axes, [("generated tokens (batch 1)", "ms per token"),
                                   ("generated tokens (batch 1)", "total seconds (x: generate)"),
                                   ("batch size", "tokens / s")]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("generation speed: " + "; ".join(d for d, _ in groups), fontsize=9)
    fig.subplots_adjust(wspace=0.35)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


__all__ = ["SCALES", "SpeedScale", "MODELS", "speed_models", "run_speed", "write_speed_report", "step_loop_times",
           "device_name", "checkpoints"]
