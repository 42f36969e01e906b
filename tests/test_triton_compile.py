"""Every Triton kernel compiles for an H100 (sm_90) with the launch configurations the wrappers use.

The interpreter (used by the other kernel tests on CPU machines) does not compile anything, so code that
only the compiler rejects (loop-carried type changes, unsupported dot shapes, ...) would pass there.
This test compiles each kernel to a cubin through Triton's CUDA backend, which needs no GPU, in a
subprocess without TRITON_INTERPRET. Skipped where a GPU is present (the other tests compile for real)
or where the backend's ptxas is missing.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from openxlstm.ops.mlstm import triton as mt, triton_step as ms
from openxlstm.ops.slstm import triton as st

INTS = {"S", "DQK", "DV", "NC", "BH", "B", "D", "E"}
FLOATS = {"scale", "eps"}


def build(fn, consts, half, num_warps, num_stages=3):
    inp = "*bf16" if half else "*fp32"
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in INTS:
            sig[name] = "i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name in ("Q", "K", "V", "I", "Fg", "DH", "X", "Y", "DY"):
            sig[name] = inp
        else:
            sig[name] = "*fp32"
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=opts)
    print("compiled", fn.__name__, "half" if half else "fp32", flush=True)


for half in (True, False):
    cfg = {"HALF_DOT": half, "DOT_DT": tl.bfloat16 if half else tl.float32, "PREC": "tf32" if half else "ieee"}
    L, BK, BV, w = 64, 64, 64, mt._warps(64)
    build(mt._fwd_states, dict(HAS_STATE=True, L=L, BK=BK, BV=BV, **cfg), half, w)
    build(mt._fwd_out, dict(M_FLOOR=-10.0, L=L, BK=mt._loop_tile(BK, L), BV=BV, **cfg), half, w)
    build(mt._bwd_states, dict(HAS_DFINAL=True, L=L, BK=BK, BV=BV, PREC=cfg["PREC"]), half, w)
    build(mt._bwd_dqdk, dict(L=L, BK=BK, BV=mt._loop_tile(BV, L), **cfg), half, w)
    build(mt._bwd_dv, dict(L=L, BK=BK, BV=BV, **cfg), half, w)
    if half:
        build(ms._mlstm_step_kernel, dict(HAS_STATE=True, M_FLOOR=-10.0, BK=32, BV=32), half, 4)
        for d in (64, 256):
            for bwd, fn in ((False, st._slstm_fwd), (True, st._slstm_bwd)):
                c = st._config(d, backward=bwd)
                nw, ns = c.pop("num_warps"), c.pop("num_stages")
                build(fn, dict(EXP_FORGET=bwd, PREC=cfg["PREC"], **c), half, nw, ns)
'''


def _ptxas_present() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="real GPU: the kernel tests compile the kernels")
@pytest.mark.skipif(not _ptxas_present(), reason="Triton's CUDA backend (ptxas) is not installed")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == 15, proc.stdout
