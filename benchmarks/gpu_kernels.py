"""Our Triton kernels against the alternatives, in one run on one GPU (median ms, peak memory, bandwidth).

What it times (bfloat16 inputs, random values, triton.testing.do_bench median after a warm-up call):

* mLSTM chunkwise, forward and forward+backward, with the peak memory of forward+backward:
  B8 NH16 S8192 d_qk128 d_v256 (65,536 tokens): ours (`openxlstm.ops.mlstm.mlstm`, backend "triton",
  its default chunk, 128 and 64), mlstm-kernels `limit_chunk` and `triton_xl_chunk` (TFLA), PyTorch SDPA causal attention
  (cuDNN and flash backends, q/k head dim 128, v 256 where the backend takes it), flash-linear-attention
  `chunk_simple_gla` (no normalizer: a speed reference only); flatness in S at 65,536 tokens
  (S2048/B32, S16384/B4); the 125m model's head shape B8 NH4 S2048 384x384.
* mLSTM decode step (`mlstm_decode`, backend "triton") at B=1, 16, 256 with NH8 256x512: ms, the state
  traffic in GB/s and its share of a device-to-device copy measured in the same run; mlstm-kernels' step.
* sLSTM, forward and forward+backward at B16 S1024 E1024 NH4: ours (`openxlstm.ops.slstm.slstm`, "triton"),
  FlashRNN's Triton backend, the xlstm package's sLSTM cell (vanilla backend). FlashRNN's CUDA backends and
  the xlstm CUDA kernel compile with nvcc on first use: only with --flashrnn-cuda / --xlstm-cuda.

Every implementation runs in its own subprocess (a job) with a timeout, so a crash, a compiler abort or a
hang becomes a row "failed: <reason>" and the run goes on. Each row is appended to <out>/kernels.csv the
moment it is measured; <out>/kernels.md (device, versions, command in its header) is rewritten after every
job, and copied to docs/benchmarks.md with --write-docs. --budget-s bounds the whole run: a job gets at
most the time left, and jobs that no longer fit are recorded as "skipped: budget".

Usage (GPU, about 3 minutes):
    python benchmarks/gpu_kernels.py --out runs/kernels [--write-docs] [--budget-s 180]
    python benchmarks/gpu_kernels.py --list                      # the plan: jobs, caps and rows
    python benchmarks/gpu_kernels.py --only ours-mlstm,sdpa       # a subset of the jobs
Usage (CPU dry run of every code path but the CUDA timing: tiny shapes, Triton interpreter, CPU stand-ins
for the alternatives, plus two probe jobs that crash and hang on purpose):
    python benchmarks/gpu_kernels.py --interpret-smoke --out /tmp/kernels-smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from _jobs import ROOT, environment, failure_reason, header, read_rows, run_worker, short_error, worker_env
from _jobs import append_row as _append_row

FIELDS = ["job", "group", "shape", "impl", "fwd_ms", "fwdbwd_ms", "peak_gb", "extra_gb", "note", "status"]
GB = 1e9


# ---------------------------------------------------------------------------------------------------------
# The plan: jobs (one subprocess each, in priority order) and the rows each job measures
# ---------------------------------------------------------------------------------------------------------
def mlstm_shape(B, NH, S, dqk, dv):
    return {"B": B, "NH": NH, "S": S, "dqk": dqk, "dv": dv}


def shape_label(s) -> str:
    if isinstance(s, str):
        return s
    if "E" in s:
        return f"B{s['B']} S{s['S']} E{s['E']} NH{s['NH']}"
    if "S" in s:
        return f"B{s['B']} NH{s['NH']} S{s['S']} {s['dqk']}x{s['dv']}"
    return f"B{s['B']} NH{s['NH']} {s['dqk']}x{s['dv']}"


def plan(smoke: bool, flashrnn_cuda: bool = False, xlstm_cuda: bool = False) -> list[dict]:
    """Jobs in the order they run. Each: name, cap_s (timeout), cuda (needs CUDA), kind, cases."""
    if smoke:  # tiny shapes that the Triton interpreter runs in seconds
        main, flat, head = mlstm_shape(1, 2, 64, 16, 32), [mlstm_shape(2, 2, 32, 16, 32)], mlstm_shape(1, 2, 48, 24, 24)
        dec = dict(NH=2, dqk=16, dv=32, batches=(1, 3))
        sl = dict(B=2, S=8, E=32, NH=2)
    else:
        main = mlstm_shape(8, 16, 8192, 128, 256)
        flat = [mlstm_shape(32, 16, 2048, 128, 256), mlstm_shape(4, 16, 16384, 128, 256)]
        head = mlstm_shape(8, 4, 2048, 384, 384)
        dec = dict(NH=8, dqk=256, dv=512, batches=(1, 16, 256))
        sl = dict(B=16, S=1024, E=1024, NH=4)

    def cases(impls, shapes, group):
        return [{"group": group, "shape": s, "impl": i} for s in shapes for i in impls]

    ours = ["openxlstm triton (default chunk)", "openxlstm triton L128", "openxlstm triton L64"]
    mk = "mlstm-kernels limit_chunk L64"
    G1, GF, GH = "mLSTM chunkwise", "mLSTM chunkwise (flatness in S)", "mLSTM chunkwise (125m head shape)"
    decode_shape = lambda b: {"B": b, "NH": dec["NH"], "dqk": dec["dqk"], "dv": dec["dv"]}  # noqa: E731
    jobs = [
        dict(name="ours-mlstm", cap_s=100, kind="mlstm",
             cases=cases(ours[:1], [main], G1)
             + [{"group": "check", "shape": main, "impl": "openxlstm triton (default chunk) vs chunkwise float32"}]
             + cases(ours[:1], flat, GF) + cases(ours[1:], [main], G1)),
        dict(name="sdpa", cap_s=30, kind="mlstm", cuda=True,
             cases=cases(["SDPA cuDNN", "SDPA flash"], [main], G1) + cases(["SDPA cuDNN"], [head], GH)),
        dict(name="mlstm-kernels", cap_s=60, kind="mlstm", cuda=True,
             cases=cases([mk], [main], G1) + cases([mk], flat, GF) + cases([mk], [head], GH)),
        dict(name="ours-decode", cap_s=40, kind="decode",
             cases=[{"group": "mLSTM decode step", "shape": "2 GiB float32" if not smoke else "16 MiB float32",
                     "impl": "device copy (reference)"}]
             # the CUDA-graph captures last: a capture that fails can spoil the rows after it
             + [{"group": "mLSTM decode step", "shape": decode_shape(b), "impl": i}
                for i in ("openxlstm triton", "openxlstm triton, CUDA graph") for b in dec["batches"]]),
        dict(name="ours-slstm", cap_s=40, kind="slstm", cases=cases(["openxlstm triton"], [sl], "sLSTM")),
        dict(name="flashrnn-triton", cap_s=45, kind="slstm", cuda=True, cases=cases(["FlashRNN triton_fused"], [sl], "sLSTM")),
        dict(name="tfla", cap_s=45, kind="mlstm", cuda=True, cases=cases(["mlstm-kernels triton_xl_chunk L128"], [main], G1)),
        dict(name="ours-mlstm-head", cap_s=60, kind="mlstm", cases=cases([ours[0], ours[2]], [head], GH)),
        dict(name="fla", cap_s=60, kind="mlstm", cuda=True, cases=cases(["fla chunk_simple_gla (no normalizer)"], [main], G1)),
        dict(name="xlstm-vanilla", cap_s=40, kind="slstm", cases=cases(["xlstm sLSTM vanilla"], [sl], "sLSTM")),
        dict(name="mlstm-kernels-decode", cap_s=30, kind="decode", cuda=True,
             cases=[{"group": "mLSTM decode step", "shape": decode_shape(b), "impl": "mlstm-kernels triton step"}
                    for b in dec["batches"]]),
    ]
    if flashrnn_cuda:
        jobs.append(dict(name="flashrnn-cuda", cap_s=240, kind="slstm", cuda=True,
                         cases=cases(["FlashRNN cuda_fused", "FlashRNN cuda"], [sl], "sLSTM")))
    if xlstm_cuda:
        jobs.append(dict(name="xlstm-cuda", cap_s=240, kind="slstm", cuda=True, cases=cases(["xlstm sLSTM cuda"], [sl], "sLSTM")))
    if smoke:  # the failure paths: a job that aborts the interpreter and one that outlives its timeout
        jobs.append(dict(name="probe-crash", cap_s=60, kind="probe", cases=cases(["abort()"], [main], "probe")))
        jobs.append(dict(name="probe-timeout", cap_s=8, kind="probe", cases=cases(["sleep"], [main], "probe")))
    for j in jobs:
        j.setdefault("cuda", False)
    return jobs


# ---------------------------------------------------------------------------------------------------------
# Rows: appended to the CSV as they are measured (by the workers and by the parent)
# ---------------------------------------------------------------------------------------------------------
def append_row(path: Path, row: dict) -> None:
    _append_row(path, FIELDS, row)


def row_key(group, shape, impl) -> tuple:
    return (group, shape if isinstance(shape, str) else shape_label(shape), impl)


# ---------------------------------------------------------------------------------------------------------
# Worker side: measurements (runs in the subprocess; imports torch here only)
# ---------------------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, csv_path: Path, job: dict, deadline: float, smoke: bool):
        import torch

        self.torch = torch
        self.csv, self.job, self.deadline, self.smoke = csv_path, job, deadline, smoke
        self.cuda = torch.cuda.is_available()
        self.dev = "cuda" if self.cuda else "cpu"
        self.dtype = torch.bfloat16

    # timing ------------------------------------------------------------------------------------------
    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def bench(self, fn, grads=None) -> float:
        """Median ms of fn(): one warm-up call first; do_bench (median) on CUDA, or 3 event-timed calls
        when one call takes over 200 ms (a Python-loop reference); wall clock on CPU (smoke: meaningless)."""
        torch = self.torch

        def clear():
            for t in grads or ():
                t.grad = None

        clear()
        fn()
        self.sync()
        if not self.cuda:
            times = []
            for _ in range(3):
                clear()
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return sorted(times)[1]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        clear()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        once = start.elapsed_time(end)
        if once > 200:
            times = []
            for _ in range(3):
                clear()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return sorted(times)[1]
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median"))

    def peak(self, fn, grads) -> tuple[float, float]:
        """(peak GB allocated during one call of fn, the part above what was allocated before it)."""
        torch = self.torch
        if not self.cuda:
            return float("nan"), float("nan")
        for t in grads:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        top = torch.cuda.max_memory_allocated()
        for t in grads:
            t.grad = None
        return top / GB, (top - base) / GB

    # driver ------------------------------------------------------------------------------------------
    def run(self):
        for case in self.job["cases"]:
            row = {"job": self.job["name"], "group": case["group"], "shape": shape_label(case["shape"]), "impl": case["impl"]}
            if time.time() > self.deadline - 3:
                row["status"] = "skipped: budget"
            elif self.job["cuda"] and not self.cuda and not self.smoke:
                row["status"] = "skipped: no CUDA"
            else:
                try:
                    row.update(getattr(self, "case_" + self.job["kind"])(case))
                    row.setdefault("status", "ok")
                except Exception as e:  # one failing case must not take the other cases down
                    row["status"] = "failed: " + short_error(e)
                    if self.cuda:
                        self.torch.cuda.empty_cache()
            append_row(self.csv, row)
            print(f"[{self.job['name']}] {row['impl']} {row['shape']}: {row.get('status')} "
                  f"{row.get('fwd_ms', '')} {row.get('fwdbwd_ms', '')} {row.get('note', '')}", flush=True)

    # mLSTM chunkwise and its alternatives ------------------------------------------------------------
    def mlstm_fn(self, impl: str, s: dict):
        """(fn(q, k, v, i, f) -> output tensor, layout "bhsd" or "bshd", note) for one implementation."""
        torch = self.torch
        F = torch.nn.functional
        if impl.startswith("openxlstm triton"):
            from openxlstm.ops.mlstm import mlstm

            L = None if impl.endswith("(default chunk)") else int(impl.rsplit("L", 1)[1])
            return (lambda q, k, v, i, f: mlstm(q, k, v, i, f, backend="triton", chunk_size=L)), "bhsd", ""
        if impl.startswith("mlstm-kernels limit_chunk"):
            if not self.cuda:  # smoke: the package's PyTorch chunkwise form, same call convention
                from mlstm_kernels.torch.chunkwise import mlstm_chunkwise__native_autograd as fn

                return (lambda q, k, v, i, f: fn(q, k, v, i, f, chunk_size=16)), "bhsd", "CPU stand-in: native_autograd"
            from mlstm_kernels.torch.chunkwise import mlstm_chunkwise__limit_chunk as fn

            return (lambda q, k, v, i, f: fn(q, k, v, i, f, chunk_size=64)), "bhsd", ""
        if impl.startswith("mlstm-kernels triton_xl_chunk"):
            if not self.cuda:
                from mlstm_kernels.torch.chunkwise import mlstm_chunkwise__native_autograd as fn

                return (lambda q, k, v, i, f: fn(q, k, v, i, f, chunk_size=16)), "bhsd", "CPU stand-in: native_autograd"
            from mlstm_kernels.torch.chunkwise import mlstm_chunkwise__xl_chunk as fn

            return (lambda q, k, v, i, f: fn(q, k, v, i, f, chunk_size=128)), "bhsd", ""
        if impl.startswith("fla chunk_simple_gla"):
            if not self.cuda:
                from fla.ops.simple_gla.naive import naive_chunk_simple_gla as naive

                return (lambda q, k, v, i, f: naive(q, k, v, F.logsigmoid(f.float()), chunk_size=16)[0]), "bshd", \
                    "CPU stand-in: naive_chunk_simple_gla"
            from fla.ops.simple_gla import chunk_simple_gla

            return (lambda q, k, v, i, f: chunk_simple_gla(q, k, v, g=F.logsigmoid(f.float()))[0]), "bshd", \
                "g = logsigmoid(f); no input gate, no normalizer"
        if impl.startswith("SDPA"):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = {"SDPA cuDNN": getattr(SDPBackend, "CUDNN_ATTENTION", None), "SDPA flash": SDPBackend.FLASH_ATTENTION}[impl]
            if backend is None:
                raise RuntimeError("this torch has no cuDNN attention backend")
            if not self.cuda:
                backend = SDPBackend.MATH

            def fn(q, k, v, i, f):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            return fn, "bhsd", "" if self.cuda else "CPU stand-in: math backend"
        raise ValueError(f"unknown implementation {impl!r}")

    def mlstm_inputs(self, s: dict, layout: str, dv: int, grad: bool):
        torch = self.torch
        B, NH, S, dqk = s["B"], s["NH"], s["S"], s["dqk"]
        g = torch.Generator(device=self.dev).manual_seed(0)

        def r(*shape, scale=1.0, shift=0.0):
            return (torch.randn(*shape, generator=g, device=self.dev) * scale + shift).to(self.dtype)

        if layout == "bhsd":
            xs = [r(B, NH, S, dqk), r(B, NH, S, dqk), r(B, NH, S, dv), r(B, NH, S, scale=2.0), r(B, NH, S, scale=1.5, shift=3.0)]
            dh = r(B, NH, S, dv)
        else:  # (B, S, NH, d): flash-linear-attention's layout
            xs = [r(B, S, NH, dqk), r(B, S, NH, dqk), r(B, S, NH, dv), r(B, S, NH, scale=2.0), r(B, S, NH, scale=1.5, shift=3.0)]
            dh = r(B, S, NH, dv)
        return [t.requires_grad_(grad) for t in xs], dh

    def case_mlstm(self, case: dict) -> dict:
        torch = self.torch
        s, impl = case["shape"], case["impl"]
        if case["group"] == "check":
            return self.check_mlstm(s)
        fn, layout, note = self.mlstm_fn(impl, s)
        dv = s["dv"]
        if impl.startswith("SDPA"):  # q, k, v of one head dim for backends that need it
            dv = self.sdpa_dv(fn, s, layout)
            if dv != s["dv"]:
                note = f"v head dim {dv}: the backend does not take d_v {s['dv']} != d_qk {s['dqk']}"
        xs, _ = self.mlstm_inputs(s, layout, dv, grad=False)
        with torch.no_grad():
            fwd = self.bench(lambda: fn(*xs))
        del xs
        xs, dh = self.mlstm_inputs(s, layout, dv, grad=True)
        used = xs[:3] if impl.startswith("SDPA") else xs

        def fwd_bwd():
            fn(*xs).backward(dh)

        fb = self.bench(fwd_bwd, grads=used)
        pk, extra = self.peak(fwd_bwd, used)
        return {"fwd_ms": f"{fwd:.3f}", "fwdbwd_ms": f"{fb:.3f}", "peak_gb": f"{pk:.2f}", "extra_gb": f"{extra:.2f}", "note": note}

    def sdpa_dv(self, fn, s, layout) -> int:
        """d_v if the backend runs q/k with d_qk and v with d_v, else d_qk (tried on a short sequence)."""
        torch = self.torch
        small = dict(s, B=1, S=min(s["S"], 256))
        xs, _ = self.mlstm_inputs(small, layout, s["dv"], grad=False)
        try:
            with torch.no_grad():
                fn(*xs)
            return s["dv"]
        except Exception:
            return s["dqk"]

    def check_mlstm(self, s: dict) -> dict:
        """Relative error of our h (bf16 inputs) against the float32 PyTorch chunkwise form on the same values."""
        torch = self.torch
        from openxlstm.ops.mlstm import mlstm

        if self.cuda:
            s = dict(s, B=1)  # one sequence of the full length keeps the float32 reference cheap
        xs, _ = self.mlstm_inputs(s, "bhsd", s["dv"], grad=False)
        with torch.no_grad():
            h = mlstm(*xs, backend="triton").float()
            ref = mlstm(*(t.float() for t in xs), backend="chunkwise", chunk_size=64)
        err = float((h - ref).norm() / ref.norm())
        return {"note": f"h rel err {err:.2e} (B{s['B']}; bf16 output rounding is about 2e-3)",
                "status": "ok" if err < 1e-2 else f"failed: h rel err {err:.2e} > 1e-2"}

    # mLSTM decode step -------------------------------------------------------------------------------
    def case_decode(self, case: dict) -> dict:
        torch = self.torch
        s, impl = case["shape"], case["impl"]
        if impl.startswith("device copy"):
            n = (1 << 29) if self.cuda else (1 << 22)  # 2 GiB of float32 on the GPU
            src = torch.randn(n, device=self.dev)
            dst = torch.empty_like(src)
            ms = self.bench(lambda: dst.copy_(src))
            bw = 2 * 4 * n / (ms * 1e6)
            self.copy_gbs = bw
            return {"fwd_ms": f"{ms:.3f}", "note": f"{bw:.0f} GB/s (read + write of {4 * n / GB:.3g} GB)"}
        B, NH, dqk, dv = s["B"], s["NH"], s["dqk"], s["dv"]
        g = torch.Generator(device=self.dev).manual_seed(B)
        r = lambda *sh, scale=1.0, shift=0.0: torch.randn(*sh, generator=g, device=self.dev) * scale + shift  # noqa: E731
        q, k, v = r(B, NH, dqk).to(self.dtype), r(B, NH, dqk).to(self.dtype), r(B, NH, dv).to(self.dtype)
        i, f = r(B, NH, scale=2.0).to(self.dtype), r(B, NH, scale=1.5, shift=3.0).to(self.dtype)
        C, n, m = r(B, NH, dqk, dv), r(B, NH, dqk).abs(), r(B, NH)
        note = ""
        if impl.startswith("openxlstm triton"):
            from openxlstm.ops.mlstm import mlstm_decode

            def fn():
                return mlstm_decode(q, k, v, i, f, (C, n, m), backend="triton")
        elif impl.startswith("mlstm-kernels"):
            if self.cuda:
                from mlstm_kernels.torch.recurrent import mlstm_recurrent_step__triton as step
            else:
                from mlstm_kernels.torch.recurrent import mlstm_recurrent_step__native as step

                note = "CPU stand-in: native step; "
            m1, i1, f1 = m[..., None], i[..., None], f[..., None]

            def fn():
                return step(q, k, v, i1, f1, C, n, m1, eps=1e-6, dtype_state=torch.float32)
        else:
            raise ValueError(impl)
        with torch.no_grad():
            if impl.endswith("CUDA graph"):
                if not self.cuda:
                    return {"status": "skipped: no CUDA"}
                import triton.testing

                fn()
                torch.cuda.synchronize()
                ms = float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
            else:
                ms = self.bench(fn)
        state_bytes = 2 * 4 * B * NH * (dqk * dv + dqk + 1)  # float32 state read and written
        io_bytes = 2 * B * NH * (2 * dqk + 2 * dv + 2)  # bf16 q, k, v, i, f read and h written
        gbs = (state_bytes + io_bytes) / (ms * 1e6)
        copy = getattr(self, "copy_gbs", None)
        note += f"{gbs:.4g} GB/s" + (f" = {100 * gbs / copy:.0f}% of the copy" if copy else "")
        return {"fwd_ms": f"{ms:.4f}", "note": note}

    # sLSTM ---------------------------------------------------------------------------------------------
    def case_slstm(self, case: dict) -> dict:
        torch = self.torch
        s, impl = case["shape"], case["impl"]
        B, S, E, NH = s["B"], s["S"], s["E"], s["NH"]
        d = E // NH
        g = torch.Generator(device=self.dev).manual_seed(0)
        r = lambda *sh, scale=1.0: torch.randn(*sh, generator=g, device=self.dev) * scale  # noqa: E731
        note = ""
        if impl == "openxlstm triton":
            from openxlstm.ops.slstm import slstm

            x = r(B, S, 4 * E).to(self.dtype)
            params = [r(NH, d, 4, d, scale=d**-0.5), r(4 * E)]  # float32, as the model keeps them
            fn = lambda x, R, b: slstm(x, R, b, backend="triton")  # noqa: E731
            dy = r(B, S, E).to(self.dtype)
            note = "x bf16, R and b float32"
        elif impl.startswith("FlashRNN"):
            from flashrnn import flashrnn

            backend = impl.split()[1] if self.cuda else "vanilla"
            note = "" if self.cuda else "CPU stand-in: vanilla backend; "
            dt = self.dtype if self.cuda else torch.float32
            x = r(B, S, 4, NH, d).to(dt)  # their layout BTGHD
            params = [r(4, NH, d, d, scale=d**-0.5).to(dt), r(4, NH, d).to(dt)]  # GHDP, GHD
            dname = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dt]

            def fn(x, R, b):
                h = flashrnn(x, R, b, function="slstm", backend=backend, dtype=dname)[0][0]  # h of (states, B, T, NH, d)
                return h[:, -S:]  # without the initial state where a backend returns it

            dy = r(B, S, NH, d).to(dt)
            note += f"x, R, b {dname}"
        elif impl.startswith("xlstm sLSTM"):
            from xlstm.blocks.slstm.cell import sLSTMCell, sLSTMCellConfig

            backend = impl.split()[-1]
            dname = "bfloat16" if backend == "cuda" else "float32"  # vanilla computes in its weights' float32
            cell = sLSTMCell(sLSTMCellConfig(hidden_size=E, num_heads=NH, backend=backend, batch_size=B, dtype=dname)).to(self.dev)
            x = r(B, S, 4 * E).to(torch.bfloat16 if backend == "cuda" else torch.float32)
            params = []
            fn = lambda x: cell(x)[0]  # noqa: E731  (B, NH, S, d)
            dy = r(B, NH, S, d).to(x.dtype)
            note = f"x {str(x.dtype).replace('torch.', '')}, cell {dname}"
        else:
            raise ValueError(impl)
        with torch.no_grad():
            fwd = self.bench(lambda: fn(x, *params))
        leaves = [x.requires_grad_(True)] + [p.requires_grad_(True) for p in params]

        def fwd_bwd():
            fn(x, *params).backward(dy)

        fb = self.bench(fwd_bwd, grads=leaves)
        pk, extra = self.peak(fwd_bwd, leaves)
        return {"fwd_ms": f"{fwd:.3f}", "fwdbwd_ms": f"{fb:.3f}", "peak_gb": f"{pk:.2f}", "extra_gb": f"{extra:.2f}", "note": note}

    # probes (smoke only) -------------------------------------------------------------------------------
    def case_probe(self, case: dict) -> dict:
        if case["impl"] == "abort()":
            sys.stderr.write("probe: aborting on purpose\n")
            sys.stderr.flush()
            os.abort()
        time.sleep(3600)
        return {}


def worker_main(args) -> None:
    jobs = {j["name"]: j for j in plan(args.interpret_smoke, args.flashrnn_cuda, args.xlstm_cuda)}
    Worker(Path(args.csv), jobs[args.worker], args.deadline, args.interpret_smoke).run()


# ---------------------------------------------------------------------------------------------------------
# Parent side: run the jobs under the budget, then write the table
# ---------------------------------------------------------------------------------------------------------
def run_job(job: dict, args, csv_path: Path, log_path: Path, t_end: float) -> str:
    """Run one job in a subprocess; returns a one-line outcome. Rows it did not write become failed rows."""
    left = t_end - time.time()
    cap = min(job["cap_s"], left)
    planned = [row_key(c["group"], c["shape"], c["impl"]) for c in job["cases"]]
    if cap < min(10, job["cap_s"]):
        for g, s, i in planned:
            append_row(csv_path, {"job": job["name"], "group": g, "shape": s, "impl": i, "status": f"skipped: budget ({left:.0f} s left)"})
        return "skipped (budget)"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", job["name"], "--csv", str(csv_path),
           "--deadline", str(time.time() + cap)]
    cmd += ["--interpret-smoke"] if args.interpret_smoke else []
    cmd += ["--flashrnn-cuda"] if args.flashrnn_cuda else []
    cmd += ["--xlstm-cuda"] if args.xlstm_cuda else []
    rc, err, timed_out, seconds = run_worker(cmd, cap, log_path, worker_env(args.interpret_smoke), f"job {job['name']}")
    done = {row_key(r["group"], r["shape"], r["impl"]) for r in read_rows(csv_path) if r["job"] == job["name"]}
    missing = [k for k in planned if k not in done]
    if missing or rc != 0:
        reason = failure_reason(rc, err, timed_out, cap)
        for g, s, i in missing:
            append_row(csv_path, {"job": job["name"], "group": g, "shape": s, "impl": i, "status": reason})
        return f"{reason} ({len(missing)} of {len(planned)} rows not measured)"
    return f"ok in {seconds:.0f} s"


def markdown(rows: list[dict], env: dict, argv: list[str], outcomes: list[tuple[str, str]], elapsed: float, budget: float) -> str:
    smoke = "--interpret-smoke" in argv
    lines = header("GPU kernel benchmarks", env, ["python", "benchmarks/gpu_kernels.py"] + argv[1:], elapsed, budget) + [
        "- bfloat16 inputs (random), median milliseconds by `triton.testing.do_bench` after a warm-up call (calls over",
        "  200 ms: median of 3); peak GB = `torch.cuda.max_memory_allocated` during one forward+backward, inputs and",
        "  gradients included (extra = above what was allocated before the call).",
    ]
    if smoke:
        lines += ["- **CPU dry run** (`--interpret-smoke`): tiny shapes, Triton interpreter, CPU stand-ins for the",
                  "  alternatives; the times mean nothing, the rows show that every code path runs."]
    lines += ["", "| group | shape | implementation | fwd ms | fwd+bwd ms | peak GB (extra) | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        pk = f"{r['peak_gb']} ({r['extra_gb']})" if r.get("peak_gb") and r["peak_gb"] != "nan" else ""
        note = "; ".join(x for x in (r.get("note", ""), "" if r.get("status") == "ok" else r.get("status", "")) if x)
        lines.append(f"| {r['group']} | {r['shape']} | {r['impl']} | {r.get('fwd_ms') or '-'} | {r.get('fwdbwd_ms') or '-'} | {pk or '-'} | {note.replace('|', '/')} |")
    lines += ["", "Jobs (each in its own process, in this order):", ""]
    lines += [f"- {name}: {outcome}" for name, outcome in outcomes]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default=None, help="output folder for kernels.csv, kernels.md, kernels.log (default runs/kernels-<time>)")
    ap.add_argument("--write-docs", action="store_true", help="also write the table to docs/benchmarks.md")
    ap.add_argument("--budget-s", type=float, default=180.0, help="wall-clock budget of the whole run (default 180)")
    ap.add_argument("--only", default="", help="comma-separated job names (see --list)")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    ap.add_argument("--interpret-smoke", action="store_true", help="CPU dry run: tiny shapes under TRITON_INTERPRET=1")
    ap.add_argument("--flashrnn-cuda", action="store_true", help="also FlashRNN's CUDA backends (nvcc compile at first use)")
    ap.add_argument("--xlstm-cuda", action="store_true", help="also the xlstm package's CUDA sLSTM kernel (nvcc compile)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--csv", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)

    t_start = time.time()
    t_end = t_start + args.budget_s - 5  # 5 s kept for the table
    jobs = plan(args.interpret_smoke, args.flashrnn_cuda, args.xlstm_cuda)
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {j["name"] for j in jobs}
        if unknown:
            ap.error(f"unknown job(s) {sorted(unknown)}; see --list")
        jobs = [j for j in jobs if j["name"] in names]
    if args.list:
        for j in jobs:
            print(f"{j['name']} (cap {j['cap_s']} s{', CUDA' if j['cuda'] else ''}):")
            for c in j["cases"]:
                print(f"    {c['group']} | {shape_label(c['shape'])} | {c['impl']}")
        return 0
    out = Path(args.out or ROOT / "runs" / time.strftime("kernels-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, log_path = out / "kernels.csv", out / "kernels.md", out / "kernels.log"
    for p in (csv_path, log_path):
        p.unlink(missing_ok=True)
    argv_shown = [sys.argv[0]] + (argv if argv is not None else sys.argv[1:])
    env = environment()
    print(f"{env.get('device')}; torch {env.get('torch')}, triton {env.get('triton')}; budget {args.budget_s:.0f} s; out {out}", flush=True)

    outcomes = []
    for job in jobs:
        outcome = run_job(job, args, csv_path, log_path, t_end)
        outcomes.append((job["name"], outcome))
        print(f"job {job['name']}: {outcome} [{time.time() - t_start:.0f} s]", flush=True)
        md_path.write_text(markdown(read_rows(csv_path), env, argv_shown, outcomes, time.time() - t_start, args.budget_s))
    text = markdown(read_rows(csv_path), env, argv_shown, outcomes, time.time() - t_start, args.budget_s)
    md_path.write_text(text)
    if args.write_docs:
        (ROOT / "docs" / "benchmarks.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
