"""Benchmark of the openxlstm Triton kernels against the alternatives, with a brief correctness check.

Times (median milliseconds) forward and forward+backward of:
  * mLSTM chunkwise: openxlstm (Triton), mlstm-kernels ``triton_limit_chunk`` and ``triton_xl_chunk``,
    PyTorch SDPA causal attention (flash and cuDNN backends) at the same tokens and heads
    (q, k, v with head dim d_qk: SDPA backends need one head dim for all three);
  * mLSTM decode step: openxlstm (Triton), mlstm-kernels ``triton`` step, our plain-PyTorch step;
  * sLSTM: openxlstm (Triton), our plain-PyTorch fused backward, the ``xlstm`` package cell (CUDA backend
    if it builds, else vanilla).
Failures of an alternative (unsupported shape, build error, out of memory) are caught and reported.

Usage (GPU):    python benchmarks/gpu_kernels.py [--out docs/benchmarks.md]
Usage (CPU):    python benchmarks/gpu_kernels.py --smoke      (tiny shapes under TRITON_INTERPRET; the
                table goes to stdout unless --out is given; the times mean nothing)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from openxlstm.ops.mlstm import mlstm_chunkwise, mlstm_step, mLSTMState  # noqa: E402
from openxlstm.ops.mlstm.triton import mlstm_triton  # noqa: E402
from openxlstm.ops.mlstm.triton_step import mlstm_step_triton  # noqa: E402
from openxlstm.ops.slstm import sLSTMState, slstm_fused  # noqa: E402
from openxlstm.ops.slstm.triton import slstm_triton  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def bench(fn, reps: int) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA, wall clock on CPU (smoke only)."""
    if CUDA:
        return float(triton.testing.do_bench(fn, warmup=25, rep=reps * 20, return_mode="median"))
    times = []
    fn()
    for _ in range(max(1, reps // 10)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fwd_bwd(fn, inputs):
    """A closure running fn(*inputs) and backward through the sum of its first output times a fixed weight."""

    def run():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    return run


def attempt(fn, reps):
    """bench(fn) or the reason it failed (short text)."""
    try:
        return bench(fn, reps), ""
    except Exception as e:  # report any failure of an alternative instead of stopping the run
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:90]
        if CUDA:
            torch.cuda.empty_cache()
        return None, msg


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def mlstm_inputs(B, NH, S, dqk, dv, dtype, grad):
    g = torch.Generator(device=DEV).manual_seed(0)
    r = lambda *s, scale=1.0, shift=0.0: (torch.randn(*s, generator=g, device=DEV) * scale + shift).to(dtype)  # noqa: E731
    xs = [r(B, NH, S, dqk), r(B, NH, S, dqk), r(B, NH, S, dv), r(B, NH, S, scale=3.0), r(B, NH, S, scale=3.0, shift=3.0)]
    return [t.requires_grad_(grad) for t in xs]


def check_mlstm(rows, dtype):
    """Our kernel vs the float64 chunkwise reference, and vs mlstm-kernels xl_chunk (outputs, gradients)."""
    B, NH, S, dqk, dv = (1, 2, 300, 64, 96) if CUDA else (1, 2, 40, 16, 32)
    xs = mlstm_inputs(B, NH, S, dqk, dv, dtype, True)
    h, _ = mlstm_triton(*xs, None, chunk_size=64)
    gs = torch.autograd.grad(h.float().sum(), xs)
    xr = [t.detach().double().requires_grad_(True) for t in xs]
    z = mLSTMState(torch.zeros(B, NH, dqk, dv, dtype=torch.float64, device=DEV),
                   torch.zeros(B, NH, dqk, dtype=torch.float64, device=DEV),
                   torch.zeros(B, NH, dtype=torch.float64, device=DEV))
    hr, _ = mlstm_chunkwise(*xr, z, chunk_size=64)
    gr = torch.autograd.grad(hr.sum(), xr)
    errs = [rel_err(h, hr)] + [rel_err(a, b) for a, b in zip(gs, gr)]
    rows.append(("check", f"openxlstm vs float64 reference ({dtype}, S={S}, {dqk}x{dv})",
                 "h, dq, dk, dv, di, df rel err: " + ", ".join(f"{e:.1e}" for e in errs)))
    if CUDA:
        try:
            from mlstm_kernels.torch.chunkwise import mlstm_chunkwise__xl_chunk

            Sx = 256
            ys = [t.detach()[:, :, :Sx].contiguous() for t in xs]
            hx = mlstm_chunkwise__xl_chunk(*ys, chunk_size=64)
            hy, _ = mlstm_triton(*ys, None)
            rows.append(("check", f"openxlstm vs mlstm-kernels xl_chunk ({dtype}, S={Sx})",
                         f"h rel err {rel_err(hy, hx):.1e} (conventions differ slightly: stabilizer floor, eps)"))
        except Exception as e:
            rows.append(("check", "mlstm-kernels xl_chunk", f"failed: {type(e).__name__}: {e}"[:120]))


def mlstm_rows(rows, B, NH, S, dqk, dv, dtype, reps, with_alternatives=True):
    shape = f"B={B} NH={NH} S={S} d_qk={dqk} d_v={dv}"
    impls = [("openxlstm triton", lambda q, k, v, i, f: mlstm_triton(q, k, v, i, f, None, chunk_size=64)[0])]
    if with_alternatives:
        try:
            from mlstm_kernels.torch.chunkwise import mlstm_chunkwise__limit_chunk, mlstm_chunkwise__xl_chunk

            impls.append(("mlstm-kernels triton_limit_chunk",
                          lambda q, k, v, i, f: mlstm_chunkwise__limit_chunk(q, k, v, i, f, chunk_size=64)))
            impls.append(("mlstm-kernels triton_xl_chunk",
                          lambda q, k, v, i, f: mlstm_chunkwise__xl_chunk(q, k, v, i, f, chunk_size=128)))
        except Exception as e:
            rows.append((shape, "mlstm-kernels", f"import failed: {type(e).__name__}"))
    for name, fn in impls:
        xs = mlstm_inputs(B, NH, S, dqk, dv, dtype, False)
        fwd, err = attempt(lambda: fn(*xs), reps)
        del xs
        xg = mlstm_inputs(B, NH, S, dqk, dv, dtype, True)
        fb, err2 = attempt(fwd_bwd(fn, xg), reps)
        del xg
        rows.append((shape, name, fmt(fwd), fmt(fb), err or err2))
    if with_alternatives:
        sdpa_rows(rows, B, NH, S, dqk, dtype, reps)


def sdpa_rows(rows, B, NH, S, d, dtype, reps):
    """Causal SDPA at the same tokens and heads, head dim d for q, k and v, flash and cuDNN backends."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = f"B={B} NH={NH} S={S} d={d} (attention)"
    for name, backend in (("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", getattr(SDPBackend, "CUDNN_ATTENTION", None))):
        if backend is None:
            rows.append((shape, name, "-", "-", "backend not in this torch"))
            continue

        def fn(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        xs = [t for t in mlstm_inputs(B, NH, S, d, d, dtype, False)[:3]]
        fwd, err = attempt(lambda: fn(*xs), reps)
        xg = [t.requires_grad_(True) for t in mlstm_inputs(B, NH, S, d, d, dtype, False)[:3]]
        fb, err2 = attempt(fwd_bwd(fn, xg), reps)
        rows.append((shape, name, fmt(fwd), fmt(fb), err or err2))


def decode_rows(rows, B, NH, dqk, dv, dtype, reps):
    shape = f"decode B={B} NH={NH} d_qk={dqk} d_v={dv}"
    g = torch.Generator(device=DEV).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=DEV)  # noqa: E731
    q, k, v = r(B, NH, dqk).to(dtype), r(B, NH, dqk).to(dtype), r(B, NH, dv).to(dtype)
    i, f = r(B, NH).to(dtype), (r(B, NH) + 3).to(dtype)
    st = mLSTMState(r(B, NH, dqk, dv), r(B, NH, dqk).abs(), r(B, NH))
    state_bytes = 2 * 4 * B * NH * (dqk * dv + dqk + 1)  # read + write, float32

    impls = [("openxlstm triton", lambda: mlstm_step_triton(q, k, v, i, f, st)),
             ("openxlstm torch step", lambda: mlstm_step(q.float(), k.float(), v.float(), i.float(), f.float(), st))]
    try:
        from mlstm_kernels.torch.recurrent import mlstm_recurrent_step__triton

        impls.append(("mlstm-kernels triton step",
                      lambda: mlstm_recurrent_step__triton(q, k, v, i[..., None], f[..., None], st.C, st.n, st.m[..., None])))
    except Exception as e:
        rows.append((shape, "mlstm-kernels triton step", "-", "-", f"import failed: {type(e).__name__}"))
    for name, fn in impls:
        ms, err = attempt(fn, reps)
        note = err or (f"{state_bytes / ms / 1e6:.0f} GB/s state traffic" if ms else "")
        rows.append((shape, name, fmt(ms), "-", note))


def slstm_rows(rows, B, S, E, NH, dtype, reps):
    shape = f"sLSTM B={B} S={S} E={E} NH={NH}"
    d = E // NH
    g = torch.Generator(device=DEV).manual_seed(0)

    def inputs(grad):
        x = (torch.randn(B, S, 4 * E, generator=g, device=DEV)).to(dtype).requires_grad_(grad)
        R = (torch.randn(NH, d, 4, d, generator=g, device=DEV) * d**-0.5).requires_grad_(grad)
        b = torch.randn(4 * E, generator=g, device=DEV).requires_grad_(grad)
        return [x, R, b]

    zero = lambda: sLSTMState(*(torch.zeros(B, E, device=DEV) for _ in range(4)))  # noqa: E731
    impls = [("openxlstm triton", lambda x, R, b: slstm_triton(x, R, b, zero(), "sigmoid")[0]),
             ("openxlstm torch fused", lambda x, R, b: slstm_fused(x.float(), R, b, zero(), "sigmoid")[0])]
    for name, fn in impls:
        xs = inputs(False)
        fwd, err = attempt(lambda: fn(*xs), reps)
        fb, err2 = attempt(fwd_bwd(fn, inputs(True)), reps)
        rows.append((shape, name, fmt(fwd), fmt(fb), err or err2))
    xlstm_slstm_rows(rows, shape, B, S, E, NH, dtype, reps)


def xlstm_slstm_rows(rows, shape, B, S, E, NH, dtype, reps):
    """The xlstm package sLSTM cell: CUDA backend when it builds, else vanilla."""
    try:
        from xlstm.blocks.slstm.cell import sLSTMCell, sLSTMCellConfig
    except Exception as e:
        rows.append((shape, "xlstm sLSTM", "-", "-", f"import failed: {type(e).__name__}"))
        return
    cell, why = None, ""
    for backend in (("cuda", "vanilla") if CUDA else ("vanilla",)):
        # the vanilla backend computes in float32 (its weights are not cast to bfloat16)
        xdt = dtype if backend == "cuda" else torch.float32
        try:
            cfg = sLSTMCellConfig(hidden_size=E, num_heads=NH, backend=backend, batch_size=B,
                                  dtype="bfloat16" if xdt == torch.bfloat16 else "float32")
            cell = sLSTMCell(cfg).to(DEV)
            break
        except Exception as e:
            why = f"{backend} failed: {type(e).__name__}: {e}"[:80]
    if cell is None:
        rows.append((shape, "xlstm sLSTM", "-", "-", why))
        return
    name = f"xlstm sLSTM ({backend}, {str(xdt).replace('torch.', '')})"
    x = torch.randn(B, S, 4 * E, device=DEV).to(xdt)
    fwd, err = attempt(lambda: cell(x), reps)
    xg = x.clone().requires_grad_(True)
    fb, err2 = attempt(fwd_bwd(lambda t: cell(t)[0], [xg]), reps)
    rows.append((shape, name, fmt(fwd), fmt(fb), err or err2 or why))


def fmt(ms):
    return "-" if ms is None else f"{ms:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET")
    ap.add_argument("--out", default=None, help="markdown output (default docs/benchmarks.md on GPU)")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    out = args.out or (None if args.smoke else "docs/benchmarks.md")
    dtype = torch.bfloat16
    rows, checks = [], []
    check_mlstm(checks, torch.float32)
    check_mlstm(checks, dtype)
    if args.smoke:
        mlstm_rows(rows, 1, 2, 64, 16, 32, dtype, args.reps, with_alternatives=CUDA)
        decode_rows(rows, 2, 2, 16, 32, dtype, args.reps)
        slstm_rows(rows, 2, 8, 32, 2, dtype, args.reps)
    else:
        tokens = 65536
        for S in (2048, 8192, 32768):
            mlstm_rows(rows, tokens // S, 8, S, 256, 512, dtype, args.reps)
        mlstm_rows(rows, tokens // 8192, 16, 8192, 128, 256, dtype, args.reps)
        for B in (1, 16, 256):
            decode_rows(rows, B, 8, 256, 512, dtype, args.reps)
        slstm_rows(rows, 16, 1024, 1024, 4, dtype, args.reps)

    dev_name = torch.cuda.get_device_name() if CUDA else "CPU (Triton interpreter; times meaningless)"
    lines = [
        "# GPU kernel benchmarks",
        "",
        f"- device: {dev_name}",
        f"- torch {torch.__version__}, triton {triton.__version__}, dtype {dtype}",
        f"- command: `python {' '.join(sys.argv)}`",
        "- median milliseconds (triton.testing.do_bench); mLSTM rows at 65,536 tokens per call;",
        "  SDPA rows use head dim d_qk for q, k and v (the fused attention backends need one head dim).",
        "",
        "## Correctness",
        "",
        "| check | result |",
        "|---|---|",
    ]
    lines += [f"| {c[1]} | {c[2]} |" for c in checks]
    lines += ["", "## Timings", "", "| shape | implementation | forward ms | fwd+bwd ms | note |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
