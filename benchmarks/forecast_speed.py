"""Forecasts per second: our TiRex against tirex-ts with the same weights, in one run.

A TiRex of the published size (35M parameters, random weights: nothing is downloaded) is built with
tirex-ts's own classes, saved as a Lightning checkpoint and loaded with ``openxlstm.forecasting``; both
then forecast the same random-walk contexts. Rows, timed in turns (one call of each per round, the median
over rounds; the first round warms up and compiles):

    tirex-ts torch        its default CPU path (the sLSTM recurrence cast to bfloat16)
    tirex-ts torch+compile  the same with ``compile=True`` (torch.compile of its sLSTM loop)
    tirex-ts cuda         its CUDA kernel (xlstm package), on a GPU only
    ours fused / triton   float32, TiRex's sliding-window rollout (the fused backend on CPU, Triton on GPU)
    ours state            float32, the stateful rollout (differs from the others only beyond one patch)
    ours bf16 matmuls     ``set_backends(matmul="bfloat16")``: projections, FFNs, embedding and head under
                          bfloat16 autocast; the recurrence, norms and residual stream in float32

Before timing, the forecasts are compared (relative error in norm over the batch): ours against tirex-ts
with its bfloat16 cast turned off (float32 on both sides), its default against float32, our bf16 row
against float32, and the stateful against the sliding-window rollout where the window slides. Usage (the docs' table: ``OMP_NUM_THREADS=1``, one core for every row):

    OMP_NUM_THREADS=1 python benchmarks/forecast_speed.py --batches 1,256 --context 2048 --horizon 32
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from openxlstm.forecasting import load_tirex_checkpoint

QUANTILES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


class _Float32Torch(types.ModuleType):
    """``torch`` with ``bfloat16`` standing for float32: put in place of tirex-ts's cell module's ``torch``, it
    turns the cast of its recurrence off without touching its code."""

    def __getattr__(self, name):
        return torch.float32 if name == "bfloat16" else getattr(torch, name)


def tirex_float32(enabled: bool) -> None:
    import tirex.models.slstm.cell as cell

    cell.torch = _Float32Torch("torch") if enabled else torch


def build_tirex(args, backend: str):
    """A tirex-ts TiRexZero of the requested size with seeded random weights, and its hyper_parameters."""
    from tirex.models.tirex import TiRexZero

    config = dict(input_patch_size=args.patch, output_patch_size=args.patch, quantiles=QUANTILES,
                  block_kwargs=dict(embedding_dim=args.embedding_dim, num_heads=args.heads, num_blocks=args.blocks,
                                    ffn_proj_factor=2.6667), input_ff_dim=args.ff_dim)
    model = TiRexZero(backend=backend, model_config=config, train_ctx_len=args.train_ctx)
    g = torch.Generator().manual_seed(0)
    d = args.embedding_dim // args.heads
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_slstm.weight") or name.endswith("norm_ffn.weight") or name == "out_norm.weight":
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "group_norm" in name or p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "_recurrent_kernel_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(d))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model, {"model_config": config, "train_ctx_len": args.train_ctx}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,256", help="comma-separated batch sizes (default: %(default)s)")
    ap.add_argument("--context", type=int, default=2048, help="context length of every series")
    ap.add_argument("--horizon", type=int, default=32, help="values forecast per series (32: one patch)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--embedding-dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--ff-dim", type=int, default=2048)
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--train-ctx", type=int, default=2048)
    ap.add_argument("--skip", default="", help="comma-separated rows to leave out, e.g. 'tirex-ts torch'")
    ap.add_argument("--out", default=None, help="also write the Markdown table to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    from tirex.models.slstm.cell import sLSTMCellTorch

    theirs, hparams = build_tirex(args, "torch")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.ckpt"
        torch.save({"hyper_parameters": hparams, "state_dict": theirs.state_dict()}, ckpt)
        ours = load_tirex_checkpoint(ckpt, device=device)
    theirs = theirs.to(device).eval()
    compiled, _ = build_tirex(args, "torch")
    compiled.load_state_dict(theirs.state_dict())
    compiled = compiled.to(device).eval()
    fn = torch.compile(sLSTMCellTorch.slstm_forward)
    for block in compiled.blocks:
        block.slstm_layer.slstm_cell._impl_forward_torch = fn
    ours_bf16 = type(ours)(ours.config).to(device)
    ours_bf16.load_state_dict(ours.state_dict())
    ours_bf16.eval().set_backends(slstm="auto", matmul="bfloat16")
    ours.set_backends(slstm="auto")
    cuda_theirs = None
    if device.type == "cuda":
        try:
            cuda_theirs, _ = build_tirex(args, "cuda")
            cuda_theirs.load_state_dict(theirs.state_dict())
            cuda_theirs = cuda_theirs.to(device).eval()
        except Exception as e:  # noqa: BLE001 - the xlstm package or its compiler may be missing
            print(f"tirex-ts cuda backend unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    ours_name = "ours triton" if device.type == "cuda" else "ours fused"

    H = args.horizon
    rows = {
        "tirex-ts torch": lambda c: theirs._forecast_quantiles(c, H)[0],
        "tirex-ts torch+compile": lambda c: compiled._forecast_quantiles(c, H)[0],
        ours_name: lambda c: ours.forecast(c, H)[0],
        "ours state": lambda c: ours.forecast(c, H, rollout="state")[0],
        "ours bf16 matmuls": lambda c: ours_bf16.forecast(c, H)[0],
    }
    if cuda_theirs is not None:
        rows["tirex-ts cuda"] = lambda c: cuda_theirs._forecast_quantiles(c, H)[0]
    rows = {k: v for k, v in rows.items() if k not in skip}

    g = torch.Generator().manual_seed(1)
    check = (torch.randn(4, args.context, generator=g).cumsum(-1) + 10).to(device)
    tirex_float32(True)
    q32 = theirs._forecast_quantiles(check, H)[0]
    tirex_float32(False)
    qbf = theirs._forecast_quantiles(check, H)[0]
    q_ours = ours.forecast(check, H)[0]
    print(f"accuracy (relative error in norm, batch 4, context {args.context}, horizon {H}):")
    print(f"  ours float32 vs tirex-ts with the bf16 cast off: {rel(q_ours, q32):.2e}")
    print(f"  tirex-ts default (bf16 recurrence) vs its float32: {rel(qbf, q32):.2e}")
    print(f"  ours bf16 matmuls vs tirex-ts float32: {rel(ours_bf16.forecast(check, H)[0], q32):.2e}")
    H2 = max(H, 2 * args.patch)  # where the window slides (context + horizon > the training context)
    print(f"  ours state rollout vs window rollout, horizon {H2}: "
          f"{rel(ours.forecast(check, H2, rollout='state')[0], ours.forecast(check, H2)[0]):.2e}")

    lines = [f"| batch | {' | '.join(rows)} |", "|---|" + "---|" * len(rows)]
    print(f"\nthreads {torch.get_num_threads()}, device {device}, context {args.context}, horizon {H}; "
          f"median seconds per call (forecasts/s)", flush=True)
    for B in [int(b) for b in args.batches.split(",")]:
        ctx = (torch.randn(B, args.context, generator=g).cumsum(-1) + 10).to(device)
        times = {k: [] for k in rows}
        failed = {}
        for r in range(args.repeats + 1):
            for name, f in rows.items():
                if name in failed:
                    continue
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                try:
                    f(ctx)
                except Exception as e:  # noqa: BLE001 - a row that cannot run (compiler, memory) is reported
                    failed[name] = f"failed: {type(e).__name__}"
                    print(f"  batch {B} {name}: {failed[name]}: {e}", file=sys.stderr, flush=True)
                    continue
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if r:
                    times[name].append(time.perf_counter() - t0)
                print(f"  batch {B} round {r} {name}: {time.perf_counter() - t0:.3f} s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items() if k not in failed}
        base = med.get("tirex-ts torch+compile")
        cells = []
        for k in rows:
            if k in failed:
                cells.append(failed[k])
                continue
            ratio = f", {base / med[k]:.2f}x compiled" if base else ""
            cells.append(f"{med[k]:.3f} s ({B / med[k]:.1f}/s{ratio})")
        lines.append(f"| {B} | {' | '.join(cells)} |")
        print(lines[0], lines[1], lines[-1], sep="\n", flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
