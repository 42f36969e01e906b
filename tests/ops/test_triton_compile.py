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

pytestmark = pytest.mark.slow  # a compiler subprocess: tens of seconds

SCRIPT = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from openxlstm.ops.mlstm import triton as mt, triton_step as ms
from openxlstm.ops.slstm import triton as st

INTS = {"S", "DQK", "DV", "NC", "BH", "B", "D", "E", "NH"}
FLOATS = {"scale", "eps"}


def build(fn, consts, half, num_warps, num_stages=3, halves=None):
    halves = halves if halves is not None else ({"Q", "K", "V", "I", "Fg", "DH", "X", "Y", "DY"} if half else set())
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in INTS or name.startswith("s") and len(name) == 3:
            sig[name] = "i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name in ("SEG", "RST"):  # segment numbers (mLSTM), document starts (sLSTM)
            sig[name] = "*i32" if name == "SEG" else "*i8"
        else:
            sig[name] = "*bf16" if name in halves else "*fp32"
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=opts)
    print("compiled", fn.__name__, "half" if half else "fp32", f"warps={num_warps} stages={num_stages}",
          ptxas_report(k.asm["ptx"]), {c: v for c, v in consts.items() if c in ("L", "LB", "BK", "BV")}, flush=True)


def ptxas_report(ptx):
    """'regs=N spill=S' from Triton's own ptxas (-v) for sm_90a: register use and spill bytes per thread."""
    import re, subprocess, tempfile
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(90).path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
        fh.write(ptx)
    out = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", fh.name, "-o", "/dev/null"],
                         capture_output=True, text=True).stderr
    regs = re.findall(r"Used (\d+) registers", out)
    spill = re.findall(r"(\d+) bytes spill stores", out)
    return f"regs={regs[-1] if regs else '?'} spill={spill[-1] if spill else '?'}"


for half in (True, False):
    cfg = {"PREC": "tf32" if half else "ieee"}
    for fn, consts, halves, nw, ns in mt.compile_specs(half, every_config=os.environ.get("EVERY_CONFIG") == "1"):
        build(fn, consts, half, nw, ns, halves)
    if half:
        build(ms._mlstm_step_kernel, dict(HAS_STATE=True, M_FLOOR=-10.0, BK=32, BV=32), half, 4)
        for d in (64, 256):
            for bwd, fn in ((False, st._slstm_fwd), (True, st._slstm_bwd)):
                c = st._config(d, backward=bwd)
                nw, ns = c.pop("num_warps"), c.pop("num_stages")
                flags = dict(HAS_RST=True, HAS_DM=True) if bwd else dict(HAS_RST=True)
                build(fn, dict(EXP_FORGET=bwd, PREC=cfg["PREC"], **flags, **c), half, nw, ns)
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
    from openxlstm.ops.mlstm import triton as mt

    expected = len(mt.compile_specs(True)) + len(mt.compile_specs(False)) + 5
    assert proc.stdout.count("compiled") == expected, proc.stdout
