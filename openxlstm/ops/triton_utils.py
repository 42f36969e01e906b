"""Small helpers shared by the Triton kernels of openxlstm (mLSTM chunkwise, mLSTM step, sLSTM).

* ``INTERPRET``: True when the kernels run under the Triton CPU interpreter (``TRITON_INTERPRET=1``).
  The interpreter multiplies bfloat16 matrices as raw uint16 words (wrong results), so under it bfloat16
  dots run on float32 operands; float16 inputs keep their half dots there (which tests that code path);
  on a GPU half-precision inputs use tensor-core half dots.
* ``dot_config(dtype)``: the compile-time switches every kernel takes: ``HALF_DOT`` (multiply
  input-dtype operands in their own half dtype), ``WIDE_HALF`` (products with float32 intermediates, which
  can exceed float16's range, may use bfloat16: only for bfloat16 inputs) and ``PREC`` (the precision of
  float32 dots: exact "ieee" for float32 inputs, so float32 results match a float32 reference; "tf32" for
  half inputs).
* ``mm``: a ``tl.dot`` of input-dtype tiles honouring those switches; ``mm_wide`` for a float32
  intermediate (scores, scaled gradients) times an input tile; ``mm32`` for float32 states. The accumulator
  is always float32.
* ``autotune(kernel, configs, key, prune, fixed)``: ``triton.autotune`` on a GPU (OPENXLSTM_AUTOTUNE=0: the
  first configuration); under the interpreter the kernel with the one ``fixed`` configuration.
* ``logsigmoid``, ``sigmoid``, ``tanh``: overflow-free float32 activations.
* ``empty``: ``torch.empty`` for kernel outputs; the tests set ``FILL_NAN = True`` so that every element a
  kernel forgets to write shows up as NaN.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# OPENXLSTM_GPU_CONFIGS=1: under the interpreter too, launch with the first GPU configuration (the GPU's
# tile sizes, sub-blocks and chunk floor), so that CI runs what a GPU without autotuning would run.
GPU_CONFIGS = os.environ.get("OPENXLSTM_GPU_CONFIGS", "0") == "1"

FILL_NAN = False

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_config(dtype: torch.dtype) -> dict:
    """Compile-time dot switches for inputs of ``dtype``: HALF_DOT, DOT_DT (tl dtype), PREC."""
    half = dtype in (torch.bfloat16, torch.float16)
    return {
        "HALF_DOT": dtype == torch.float16 or (dtype == torch.bfloat16 and not INTERPRET),
        "WIDE_HALF": dtype == torch.bfloat16 and not INTERPRET,
        "DOT_DT": _TL_DTYPES.get(dtype, tl.float32),
        "PREC": "tf32" if half else "ieee",
    }


class Tuned:
    """A kernel with its launch configurations: ``kernel[grid](*args, **kwargs)`` autotunes over ``configs``
    on a GPU (keyed on ``key``, pruned per call by ``prune``); with OPENXLSTM_AUTOTUNE=0 it launches the first
    configuration, and under the interpreter the ``fixed`` one (autotuning there would only multiply the
    run time), or the first with OPENXLSTM_GPU_CONFIGS=1. ``fn`` is the plain kernel, ``configs`` the list (for compiling ahead of time)."""

    def __init__(self, kernel, configs, key, prune, fixed: dict):
        self.fn, self.configs = kernel, configs
        if INTERPRET and not GPU_CONFIGS:
            self.fixed = dict(fixed)
        elif INTERPRET or os.environ.get("OPENXLSTM_AUTOTUNE", "1") == "0":
            c = configs[0]
            self.fixed = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        else:
            self.fixed = None
            key = [name for name in key if name in kernel.arg_names]
            self.tuner = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)

    def __getitem__(self, grid):
        if self.fixed is None:
            return self.tuner[grid]

        def launch(*args, **kwargs):
            meta = {**kwargs, **self.fixed}
            return self.fn[grid(meta) if callable(grid) else grid](*args, **meta)

        return launch


autotune = Tuned


def empty(*shape, device, dtype) -> torch.Tensor:
    """An uninitialised buffer for a kernel to fill (NaN-filled when FILL_NAN is set, for tests)."""
    if FILL_NAN:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(*shape, device=device, dtype=dtype)


def pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    """The next power of two >= n, clamped to [lo, hi]."""
    p = max(lo, triton.next_power_of_2(max(1, n)))
    return min(p, hi) if hi is not None else p


@triton.jit
def mm(a, b, HALF_DOT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """a @ b with a float32 result: half operands (tensor cores) when HALF_DOT, else float32 at PREC."""
    if HALF_DOT:
        return tl.dot(a.to(DOT_DT), b.to(DOT_DT))
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def mm_wide(a, b, WIDE_HALF: tl.constexpr, PREC: tl.constexpr):
    """a @ b where a is a float32 intermediate that may exceed float16's range: bfloat16 operands when
    WIDE_HALF (bfloat16 inputs), else float32 at PREC (tf32 for float16 inputs)."""
    if WIDE_HALF:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def mm32(a, b, PREC: tl.constexpr):
    """a @ b on float32 operands at precision PREC (for products with float32 states)."""
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def logsigmoid(x):
    """log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)), finite for every finite x; log1p(e) by its series
    e - e^2/2 + e^3/3 where e < 1e-3 (log(1 + e) would lose e's digits: log f of open gates matters)."""
    e = tl.exp(-tl.abs(x))
    l1p = tl.where(e < 1e-3, e * (1.0 - e * (0.5 - e * (1.0 / 3.0))), tl.log(1.0 + e))
    return tl.minimum(x, 0.0) - l1p


@triton.jit
def tanh(x):
    """tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) <= 1: no overflow for any x."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def sigmoid(x):
    """1 / (1 + exp(-x)) evaluated with e = exp(-|x|) <= 1: no overflow for any x."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
