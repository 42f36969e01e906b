#!/usr/bin/env bash
# One GPU session, from the repository root: install the benchmark wheels, run the kernel tests on the GPU,
# time the kernels, time whole-model training and decoding. Under 9 minutes on one H100.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh        (OUT defaults to ./gpu-out)
#
# Needs the git-ignored .whl/ folder (carry it to the GPU machine): wheels for Python 3.12 of xlstm,
# mlstm-kernels, dacite, flashrnn, fla-core, ninja, PyYAML, pytest-xdist, execnet, pytest-timeout (see
# benchmarks/README.md). Writes exactly these files under $OUT:
#   session.log  everything printed here (versions, nvidia-smi, stage times, the final tables)
#   pytest.log   the GPU test run
#   kernels.csv kernels.md kernels.log   benchmarks/gpu_kernels.py (rows, table, worker logs)
#   train.csv   train.md   train.log     benchmarks/train_throughput.py --quick
# Time caps (seconds): tests 110, kernels 175, training 232, set-up about 15: 532 in all.
set -u
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/session.log") 2>&1
T0=$(date +%s)
stage() { echo; echo "===== $1 [$(( $(date +%s) - T0 )) s]"; }

stage "install wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
    ls -l .whl
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || echo "WARNING: wheel install failed"
else
    echo "WARNING: no .whl/ folder: xlstm, mlstm-kernels, flashrnn, fla rows will fail (carry .whl to this machine)"
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="/tmp/site/bin:$PATH"  # ninja, for the CUDA backends behind --flashrnn-cuda / --xlstm-cuda

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true
nvidia-smi | head -20 || true
python3 - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "CUDA", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
for name in ("triton", "xlstm", "mlstm_kernels", "flashrnn", "fla", "dacite", "transformers", "einops", "pytest", "pytest_timeout", "xdist"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '?')} from {m.__file__}")
    except Exception as e:
        print(f"  {name}: NOT importable ({type(e).__name__}: {str(e)[:120]})")
EOF

stage "kernel tests on the GPU (cap 110 s: no new tests after 75 s; failures printed as they happen)"
# 8 pytest workers (pytest-xdist, from .whl): the kernels compile for every tested shape, and compiling is CPU work
XDIST=""; python3 -c "import xdist" 2>/dev/null && XDIST="-n 8"
STOP=""; python3 -c "import pytest_timeout" 2>/dev/null && STOP="--timeout 60"
python3 -c "import pytest_timeout as p, inspect; assert 'session_timeout' in inspect.getsource(p)" 2>/dev/null && STOP="$STOP --session-timeout 75"
OPENXLSTM_TEST_PROGRESS=1 timeout -s INT -k 10 110 python3 -m pytest -v -p no:cacheprovider -o addopts="" -rfE --durations=15 $XDIST $STOP \
    tests/test_triton_slstm.py tests/test_triton_model.py tests/test_triton_mlstm.py tests/test_triton_compile.py \
    > "$OUT/pytest.log" 2>&1
echo "pytest exit code $? (workers: ${XDIST:-none}; timeouts: ${STOP:-none})"
grep -E "FAILED|ERROR|passed|failed|error" "$OUT/pytest.log" | tail -n 60

stage "benchmarks/gpu_kernels.py (cap 175 s, budget 168 s)"
timeout -k 5 175 python3 benchmarks/gpu_kernels.py --out "$OUT" --budget-s 168
echo "gpu_kernels.py exit code $?"

stage "benchmarks/train_throughput.py --quick (cap 232 s, budget 224 s)"
timeout -k 5 232 python3 benchmarks/train_throughput.py --quick --out "$OUT" --budget-s 224
echo "train_throughput.py exit code $?"

stage "summary"
for f in kernels.md train.md; do
    echo "----- $f"
    cat "$OUT/$f" 2>/dev/null || echo "(missing)"
done
ls -l "$OUT"
stage "done"
