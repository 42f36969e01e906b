"""Whole-model training throughput and peak memory on one GPU, with the baselines side by side, and decoding speed.

Training rows (batch x 2048 tokens, bf16 autocast, AdamW (fused on CUDA), loss from ``model(ids, labels=labels).loss``;
random token ids; warm-up steps excluded; tokens/s over the timed steps with ``torch.cuda.synchronize``; peak =
``torch.cuda.max_memory_allocated`` over the timed steps, after a reset):

* ours: ``openxlstm.preset(size, "1:0" | "7:1")`` eager, compiled, and each with activation checkpointing
  (``model.set_activation_checkpointing(True)``); default backends (Triton on CUDA). "compile" is
  ``block.compile()`` for every block by default (regional compilation: the blocks of one kind share one
  graph, so it compiles in a fraction of the time; embedding, head and loss stay eager), or
  ``torch.compile(model)`` with --compile-scope model (what ``openxlstm train --compile`` does; the whole
  125m model took 5x longer to compile than one block of each kind on CPU);
* our Transformer baseline (``openxlstm.baselines.TransformerLM``) of the same size, eager and compiled:
  125m E768 12 layers 12 heads (162M parameters), 350m E1024 24 layers 16 heads (407M), 1.3b E2048 24 layers
  16 heads (1.42B); the xLSTM presets have 164M, 409M and 1.42B;
* the authors' ``xlstm`` package (``xLSTMLMModel``, the same config via ``openxlstm.interop.config_to_official``:
  mLSTM in its parallel form, sLSTM on its vanilla backend), eager (full runs only).

Decoding rows (125m, float32 weights under bf16 autocast, greedy): ``openxlstm.generate(model, ids,
max_new_tokens=N, temperature=0)`` at batch 1 and 64 (a 16-token prompt; its prefill is inside the time), and
the model step alone in a loop (``model(tok, state, return_state=True)`` plus an argmax).

Each configuration runs in its own subprocess with a timeout: an out-of-memory error, a compile failure, a
crash or a hang becomes a row saying so, and the run goes on. Rows are appended to <out>/train.csv as they
are measured; <out>/train.md (rewritten after every job) has the table with the ratio of each row to the
same-size Transformer, eager and compiled, measured in the same run. --budget-s bounds the whole run.

Usage (GPU):
    python benchmarks/train_throughput.py --quick --out runs/train      # 125m only, under 4 minutes
    python benchmarks/train_throughput.py --out runs/train              # 125m, 350m, 1.3b (1.3b at batch 8 and 4)
    python benchmarks/train_throughput.py --presets 350m --batch 4 --seq 2048 --list
CPU dry run of every code path but the CUDA timing (tiny models, seconds per row):
    python benchmarks/train_throughput.py --device cpu --tiny --out /tmp/train-smoke
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from _jobs import ROOT, environment, failure_reason, header, read_rows, run_worker, short_error, worker_env
from _jobs import append_row as _append_row

FIELDS = ["job", "kind", "model", "size", "params_m", "batch", "seq", "mode", "tokens_per_s", "ms_per_step",
          "peak_gb", "first_step_s", "loss", "note", "status"]
TRANSFORMER_SHAPES = {"125m": (768, 12, 12), "350m": (1024, 24, 16), "760m": (1536, 24, 16), "1.3b": (2048, 24, 16)}
TINY = dict(embedding_dim=64, num_blocks=4, vocab_size=256)  # --tiny: every preset becomes this small model
TINY_TRANSFORMER = (64, 2, 2)
PROMPT_LEN = 16


# ---------------------------------------------------------------------------------------------------------
# The plan: one job per configuration, in priority order
# ---------------------------------------------------------------------------------------------------------
def model_label(family: str, size: str, ratio: str = "", tiny: bool = False) -> str:
    size = f"{size} (tiny)" if tiny else size
    if family == "xlstm":
        return f"xLSTM[{ratio}] {size} ours"
    if family == "xlstm-pkg":
        return f"xLSTM[{ratio}] {size} xlstm package"
    E, L, H = TINY_TRANSFORMER if tiny else TRANSFORMER_SHAPES[size]
    return f"Transformer {size} ours E{E} L{L}"


def plan(args) -> list[dict]:
    """Jobs: dict(name, kind "train" | "decode", family, size, ratio, batch, seq, compile, ckpt, cap_s, rows)."""
    seq = args.seq
    jobs = []

    def train(family, size, ratio, batch, compile_, ckpt, cap):
        mode = ("compile" if compile_ else "eager") + ("+ckpt" if ckpt else "")
        jobs.append(dict(name=f"{family} {size} {ratio} B{batch} {mode}".replace("  ", " "), kind="train", family=family,
                         size=size, ratio=ratio, batch=batch, seq=seq, compile=compile_, ckpt=ckpt, cap_s=cap,
                         rows=[(model_label(family, size, ratio, args.tiny), batch, mode)]))

    def decode(size, ratio, cap):
        methods = [(m, b) for m in ("generate", "step loop") for b in (1, 64)]
        jobs.append(dict(name=f"decode {size} {ratio}", kind="decode", family="xlstm", size=size, ratio=ratio, batch=0,
                         seq=0, compile=False, ckpt=False, cap_s=cap,
                         rows=[(model_label("xlstm", size, ratio, args.tiny), b, m) for m, b in methods]))

    sizes = ["125m"] if args.quick else [s.strip() for s in args.presets.split(",") if s.strip()]
    for size in sizes:
        if size not in TRANSFORMER_SHAPES:
            raise SystemExit(f"unknown preset {size!r}; choose from {list(TRANSFORMER_SHAPES)}")
        batches = [args.batch] if args.batch else ([8, 4] if size == "1.3b" else [8])
        for batch in batches:
            eager_cap, compile_cap = (60, 120) if args.quick else (90, 180)
            for ratio in ("1:0", "7:1"):
                train("xlstm", size, ratio, batch, False, False, eager_cap)
            train("transformer", size, "", batch, False, False, eager_cap)
            for ratio in ("1:0", "7:1"):
                train("xlstm", size, ratio, batch, False, True, eager_cap)
            if size == "125m" and batch == batches[0]:
                decode(size, "1:0", 60)
            train("transformer", size, "", batch, True, False, compile_cap)
            for ratio in ("1:0", "7:1"):
                train("xlstm", size, ratio, batch, True, False, compile_cap)
            if not args.quick:
                for ratio in ("1:0", "7:1"):
                    train("xlstm", size, ratio, batch, True, True, compile_cap)
                for ratio in ("1:0", "7:1"):
                    train("xlstm-pkg", size, ratio, batch, False, False, 120)
            if size == "125m" and batch == batches[0]:
                decode(size, "7:1", 60)
    return jobs


# ---------------------------------------------------------------------------------------------------------
# Worker side: build a model, train or decode, write the rows (imports torch here only)
# ---------------------------------------------------------------------------------------------------------
def build_model(job: dict, tiny: bool, seq: int):
    """(model, vocab size) for a job; float32 parameters (on the default device)."""
    import openxlstm
    from openxlstm.baselines import TransformerConfig, TransformerLM

    overrides = dict(TINY) if tiny else {}
    if job["family"] == "transformer":
        E, L, H = TINY_TRANSFORMER if tiny else TRANSFORMER_SHAPES[job["size"]]
        V = TINY["vocab_size"] if tiny else 50304
        return TransformerLM(TransformerConfig(vocab_size=V, embedding_dim=E, num_layers=L, num_heads=H,
                                               context_length=max(seq, 1))), V
    cfg = openxlstm.preset(job["size"], job["ratio"], **overrides)
    if job["family"] == "xlstm":
        return openxlstm.xLSTMLM(cfg), cfg.vocab_size
    # the authors' package, the same shape: its config built from ours
    import dacite
    from xlstm import xLSTMLMModel, xLSTMLMModelConfig

    from openxlstm.interop import config_to_official

    d = config_to_official(cfg)
    d["context_length"] = max(seq, PROMPT_LEN)
    for block in ("mlstm_block", "slstm_block"):
        for layer in ("mlstm", "slstm"):
            if d.get(block) and layer in d[block] and "context_length" in d[block][layer]:
                d[block][layer]["context_length"] = d["context_length"]
    model = xLSTMLMModel(dacite.from_dict(xLSTMLMModelConfig, d, config=dacite.Config(strict=True)))
    model.reset_parameters()
    return model, cfg.vocab_size


def train_row(job: dict, args, torch) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with device:  # parameters made and initialized on the device (the 1.3b model is 5.7 GB in float32)
        model, V = build_model(job, args.tiny, job["seq"])
    model = model.to(device).train()
    params_m = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) / 1e6
    if job["ckpt"]:
        model.set_activation_checkpointing(True)
    fwd = model
    if job["compile"] and args.compile_scope == "model":
        fwd = torch.compile(model)
    elif job["compile"]:  # regional compilation: each block in place (blocks of one kind share one graph)
        if job["family"] == "xlstm-pkg":
            raise RuntimeError("compile: the xlstm package model is run eager only")
        for block in model.blocks:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=cuda)
    B, S = job["batch"], job["seq"]
    g = torch.Generator(device=device).manual_seed(1)
    data = [torch.randint(0, V, (B, S + 1), generator=g, device=device) for _ in range(2)]
    F = torch.nn.functional

    def step(j: int):
        x = data[j % len(data)]
        ids, labels = x[:, :-1], x[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if job["family"] == "xlstm-pkg":  # the package returns logits only
                logits = fwd(ids)
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            else:
                loss = fwd(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step(0)
    sync()
    first = time.perf_counter() - t0
    for j in range(1, args.warmup):
        step(j)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for j in range(args.steps):
        loss = step(j)
    sync()
    dt = time.perf_counter() - t0
    loss = float(loss)
    row = {"params_m": f"{params_m:.1f}", "tokens_per_s": f"{B * S * args.steps / dt:.0f}",
           "ms_per_step": f"{1e3 * dt / args.steps:.1f}", "first_step_s": f"{first:.1f}", "loss": f"{loss:.3f}",
           "peak_gb": f"{torch.cuda.max_memory_allocated() / 1e9:.2f}" if cuda else "",
           "note": f"{args.warmup} warm-up + {args.steps} timed steps"}
    if not math.isfinite(loss):
        row["status"] = f"failed: loss {loss}"
    return row


def decode_rows(job: dict, args, torch, emit) -> None:
    """generate and the bare step loop at batch 1 and 64; one row each, emitted as measured."""
    import openxlstm

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with device:
        model, V = build_model(job, args.tiny, 0)
    model = model.to(device).eval()
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    N = args.decode_tokens

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for model_name, B, method in job["rows"]:
        row = {"model": model_name, "batch": B, "mode": method, "params_m": f"{params_m:.1f}", "seq": f"{PROMPT_LEN}+{N}"}
        try:
            prompt = torch.randint(0, V, (B, PROMPT_LEN), device=device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                if method == "generate":
                    openxlstm.generate(model, prompt, max_new_tokens=4, temperature=0)  # warm-up (kernels compile)
                    sync()
                    t0 = time.perf_counter()
                    out = openxlstm.generate(model, prompt, max_new_tokens=N, temperature=0)
                    sync()
                    dt = time.perf_counter() - t0
                    assert len(out) == B and all(len(r) == N for r in out), "generate returned the wrong number of tokens"
                    note = "prompt prefill included"
                else:
                    logits, state = model(prompt, return_state=True)
                    tok = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
                    for _ in range(3):  # warm-up
                        logits, state = model(tok, state, return_state=True)
                        tok = logits[:, -1].argmax(-1, keepdim=True)
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(N):
                        logits, state = model(tok, state, return_state=True)
                        tok = logits[:, -1].argmax(-1, keepdim=True)
                    sync()
                    dt = time.perf_counter() - t0
                    note = "model step + argmax, no sampling code"
            row.update({"tokens_per_s": f"{B * N / dt:.0f}", "ms_per_step": f"{1e3 * dt / N:.2f}",
                        "note": note + "; float32 weights, bf16 autocast", "status": "ok"})
        except Exception as e:
            row["status"] = "failed: " + short_error(e)
            if cuda:
                torch.cuda.empty_cache()
        emit(row)


def worker_main(args) -> None:
    import torch

    jobs = {j["name"]: j for j in plan(args)}
    job = jobs[args.worker]
    csv_path = Path(args.csv)

    def emit(row):
        base = {"job": job["name"], "kind": job["kind"], "size": job["size"]}
        if job["kind"] == "train":
            model, batch, mode = job["rows"][0]
            base.update(model=model, batch=batch, seq=job["seq"], mode=mode)
        _append_row(csv_path, FIELDS, {**base, **row})
        print(f"[{job['name']}] {row.get('mode', '')} B{row.get('batch', '')}: {row.get('status')} "
              f"{row.get('tokens_per_s', '')} tok/s, peak {row.get('peak_gb', '')} GB", flush=True)

    if args.device == "cuda" and not torch.cuda.is_available():
        for model, batch, mode in job["rows"]:
            emit({"model": model, "batch": batch, "mode": mode, "status": "skipped: no CUDA"})
        return
    if job["kind"] == "decode":
        decode_rows(job, args, torch, emit)
        return
    try:
        row = train_row(job, args, torch)
        row.setdefault("status", "ok")
    except Exception as e:  # out of memory, compile errors: a row that says so
        row = {"status": "failed: " + short_error(e)}
    emit(row)


# ---------------------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------------------
def run_job(job: dict, args, csv_path: Path, log_path: Path, t_end: float) -> str:
    left = t_end - time.time()
    cap = min(job["cap_s"], left)

    def fill(status):
        done = {(r["model"], r["batch"], r["mode"]) for r in read_rows(csv_path) if r["job"] == job["name"]}
        missing = [r for r in job["rows"] if (r[0], str(r[1]), r[2]) not in done]
        for model, batch, mode in missing:
            _append_row(csv_path, FIELDS, {"job": job["name"], "kind": job["kind"], "model": model, "size": job["size"],
                                           "batch": batch, "seq": job["seq"] or "", "mode": mode, "status": status})
        return missing

    if cap < min(15, job["cap_s"]):
        fill(f"skipped: budget ({max(left, 0):.0f} s left)")
        return "skipped (budget)"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", job["name"], "--csv", str(csv_path)]
    cmd += [a for a in args.passthrough]
    rc, err, timed_out, seconds = run_worker(cmd, cap, log_path, worker_env(False), f"job {job['name']}")
    reason = failure_reason(rc, err, timed_out, cap)
    missing = fill(reason)
    if missing or rc != 0:
        return f"{reason} ({len(missing)} of {len(job['rows'])} rows not measured)"
    return f"ok in {seconds:.0f} s"


def fnum(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def markdown(rows: list[dict], env: dict, command: list[str], outcomes, elapsed: float, budget: float, args) -> str:
    lines = header("Training throughput", env, command, elapsed, budget)
    lines += [f"- {'tiny models (--tiny: CPU dry run, numbers meaningless); ' if args.tiny else ''}"
              f"bf16 autocast, AdamW{' (fused)' if args.device == 'cuda' else ''}, random tokens; "
              f"tokens/s over {args.steps} timed steps after {args.warmup} warm-up steps (the first compiles);",
              f"  compile = {'torch.compile(model)' if args.compile_scope == 'model' else 'block.compile() for every block (head and loss eager)'};",
              "  peak GB = torch.cuda.max_memory_allocated over the timed steps; ratios against the Transformer of the",
              "  same size, batch and length in this run (eager and compiled).", ""]
    train = [r for r in rows if r["kind"] == "train"]
    tf = {(r["size"], r["batch"], r["seq"], r["mode"]): fnum(r["tokens_per_s"]) for r in train if r["model"].startswith("Transformer")}
    lines += ["| model | params M | batch x seq | mode | tokens/s | peak GB | / Transformer eager | / Transformer compiled "
              "| first step s | loss | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in train:
        tps = fnum(r["tokens_per_s"])
        ratios = []
        for mode in ("eager", "compile"):
            ref = tf.get((r["size"], r["batch"], r["seq"], mode), float("nan"))
            ratios.append(f"{tps / ref:.2f}" if math.isfinite(tps) and math.isfinite(ref) and ref > 0 else "-")
        note = "; ".join(x for x in (r.get("note", ""), "" if r["status"] == "ok" else r["status"]) if x)
        lines.append(f"| {r['model']} | {r['params_m'] or '-'} | {r['batch']} x {r['seq']} | {r['mode']} | "
                     f"{r['tokens_per_s'] or '-'} | {r['peak_gb'] or '-'} | {ratios[0]} | {ratios[1]} | "
                     f"{r['first_step_s'] or '-'} | {r['loss'] or '-'} | {note.replace('|', '/')} |")
    dec = [r for r in rows if r["kind"] == "decode"]
    if dec:
        lines += ["", f"Greedy decoding ({args.decode_tokens} new tokens after a {PROMPT_LEN}-token prompt):", "",
                  "| model | batch | method | tokens/s | ms per token step | note |", "|---|---|---|---|---|---|"]
        for r in dec:
            note = "; ".join(x for x in (r.get("note", ""), "" if r["status"] == "ok" else r["status"]) if x)
            lines.append(f"| {r['model']} | {r['batch']} | {r['mode']} | {r['tokens_per_s'] or '-'} | "
                         f"{r['ms_per_step'] or '-'} | {note.replace('|', '/')} |")
    lines += ["", "Jobs (each in its own process, in this order):", ""] + [f"- {n}: {o}" for n, o in outcomes]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="125m only: [1:0], [7:1] eager/compile/checkpointing, "
                    "Transformer eager/compiled, decoding (under 4 minutes on an H100)")
    ap.add_argument("--presets", default="125m,350m,1.3b", help="comma-separated sizes (default 125m,350m,1.3b)")
    ap.add_argument("--batch", type=int, default=0, help="batch size (default 8; 1.3b at 8 and 4)")
    ap.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per row (default 3 with --quick, else 5)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps per row, the first compiles (default 2)")
    ap.add_argument("--decode-tokens", type=int, default=64, help="new tokens per decoding row (default 64)")
    ap.add_argument("--compile-scope", default="blocks", choices=("blocks", "model"),
                    help="compile each block (default; fast to compile) or torch.compile(model)")
    ap.add_argument("--budget-s", type=float, default=0, help="wall-clock budget (default 240 with --quick, else 480)")
    ap.add_argument("--out", default=None, help="output folder for train.csv, train.md, train.log (default runs/train-<time>)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run (with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny models, batch 2 x 32, 1 warm-up + 2 timed steps (CPU dry run)")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--csv", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    raw = list(argv if argv is not None else sys.argv[1:])
    if args.tiny:
        args.batch = args.batch or 2
        args.seq = 32 if args.seq == 2048 else args.seq
        args.warmup = 1 if args.warmup == 2 else args.warmup
        args.decode_tokens = 8 if args.decode_tokens == 64 else args.decode_tokens
        args.steps = args.steps or 2
    args.steps = args.steps or (3 if args.quick else 5)
    args.budget_s = args.budget_s or (240.0 if args.quick else 480.0)
    if args.worker:
        return worker_main(args)

    jobs = plan(args)
    if args.list:
        for j in jobs:
            print(f"{j['name']} (cap {j['cap_s']} s): " + "; ".join(f"{m} B{b} {mode}" for m, b, mode in j["rows"]))
        return 0
    # the workers get the same options (so that they build the same plan), never --out / --list / --budget-s
    skip_next, args.passthrough = False, []
    for a in raw:
        if skip_next:
            skip_next = False
            continue
        if a in ("--out", "--budget-s"):
            skip_next = True
            continue
        if a.startswith(("--out=", "--budget-s=")):
            continue
        args.passthrough.append(a)
    t_start = time.time()
    t_end = t_start + args.budget_s - 5
    out = Path(args.out or ROOT / "runs" / time.strftime("train-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, log_path = out / "train.csv", out / "train.md", out / "train.log"
    for p in (csv_path, log_path):
        p.unlink(missing_ok=True)
    env = environment()
    command = ["python", "benchmarks/train_throughput.py"] + raw
    print(f"{env.get('device')}; torch {env.get('torch')}; {len(jobs)} jobs; budget {args.budget_s:.0f} s; out {out}", flush=True)
    outcomes = []
    for job in jobs:
        outcome = run_job(job, args, csv_path, log_path, t_end)
        outcomes.append((job["name"], outcome))
        print(f"job {job['name']}: {outcome} [{time.time() - t_start:.0f} s]", flush=True)
        md_path.write_text(markdown(read_rows(csv_path), env, command, outcomes, time.time() - t_start, args.budget_s, args))
    text = markdown(read_rows(csv_path), env, command, outcomes, time.time() - t_start, args.budget_s, args)
    md_path.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
