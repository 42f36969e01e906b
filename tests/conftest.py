"""Test set-up: Triton kernels run under the interpreter on machines without a CUDA GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection start. With a
CUDA GPU the kernel tests compile and run the kernels for real (same assertions, a few larger shapes), each
kernel in its default launch configuration (OPENXLSTM_AUTOTUNE=0 unless set).

The accuracy rule of the kernel tests (tests/test_triton_*.py), which the README states:
* float32: every output, final state and gradient is at most ``FP32_FACTOR`` times as far from the float64
  reference as the float32 PyTorch form (chunkwise mLSTM, fused sLSTM) on the same inputs, plus ``FP32_FLOOR``;
* bfloat16 and float16: every output and gradient is finite and within ``HALF_TOL`` of the float64 reference,
  for gate pre-activations in [-40, 40].
Errors are relative in norm, ||a - b|| / ||b||: each gradient is judged against its own scale, not element by
element (where forget gates are almost closed, single entries of df are tiny and their relative error means
nothing).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # The kernels' first (default) launch configuration at every tested shape, not an autotuning run per shape:
    # tuning compiles and times every candidate for every new shape and dtype, minutes for this suite. The
    # tuned configurations are compiled by test_triton_compile.py and timed (output checked) by the benchmark.
    os.environ.setdefault("OPENXLSTM_AUTOTUNE", "0")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FP32_FACTOR = 2.0
FP32_FLOOR = 32 * torch.finfo(torch.float32).eps  # 3.8e-6: rounding noise of tiny problems
HALF_TOL = 1e-2
GATE_RANGE = 40.0


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 on the CPU (0 when both are zero); a and b may live on different devices."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denom = b.norm()
    return float((a - b).norm() / denom) if denom > 0 else float((a - b).norm())


def check_fp32(out: dict, base: dict, ref: dict) -> None:
    """The float32 rule: for every key, err(out) <= FP32_FACTOR * err(base) + FP32_FLOOR (errors against ref)."""
    bad = []
    for key in ref:
        err, allowed = rel_err(out[key], ref[key]), FP32_FACTOR * rel_err(base[key], ref[key]) + FP32_FLOOR
        if not err <= allowed:
            bad.append(f"{key}: {err:.2e} > {allowed:.2e}")
    assert not bad, "float32 kernel less accurate than twice the PyTorch float32 form: " + ", ".join(bad)


def check_half(out: dict, ref: dict, tol: float = HALF_TOL) -> None:
    """The half-precision rule: every tensor finite and within ``tol`` of the float64 reference."""
    bad = []
    for key in ref:
        if not torch.isfinite(out[key]).all():
            bad.append(f"{key}: not finite")
            continue
        err = rel_err(out[key], ref[key])
        if not err <= tol:
            bad.append(f"{key}: {err:.2e} > {tol:.0e}")
    assert not bad, ", ".join(bad)


def pytest_runtest_logreport(report):
    """With OPENXLSTM_TEST_PROGRESS=1, print each failure's assertion lines the moment it is reported, so that
    a run cut short by a time limit (benchmarks/gpu_session.sh) still shows why its tests failed."""
    if report.failed and os.environ.get("OPENXLSTM_TEST_PROGRESS") == "1":
        lines = [ln.strip() for ln in report.longreprtext.splitlines() if ln.startswith("E ")]
        print(f"\nFAILED {report.nodeid} ({report.when}): " + " | ".join(lines)[:1500], flush=True)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small folder of text documents (helpers.write_corpus), shared read-only by the tests."""
    from helpers import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus"))
