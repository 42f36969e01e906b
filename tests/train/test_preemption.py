"""Jobs on shared machines: SIGTERM and SIGUSR1 checkpoint at the next step boundary (one process and under
torchrun), the run resumes bit-exactly; files get the permissions of the user's umask; output into a pipe
that its reader closes early ends quietly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_args
from safetensors.torch import load_file

STEPS = 100


def launch(args, nproc=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    head = ([sys.executable, "-m", "openxlstm"] if nproc is None else
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "openxlstm"])
    return subprocess.Popen(head + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def rows(out: Path) -> int:
    try:
        return len((out / "metrics.csv").read_text().splitlines()) - 1
    except OSError:
        return 0


def interrupt_after(proc, out: Path, signum, min_rows=3, timeout=120):
    """Send ``signum`` once the run has logged ``min_rows`` steps; returns (exit status, stdout, stderr)."""
    deadline = time.time() + timeout
    while rows(out) < min_rows:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run did not start"
        time.sleep(0.05)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def step_of(out: Path) -> int:
    return int((out / "latest").read_text().strip().split("-")[1])


def weights(out: Path) -> dict:
    return load_file(str(out / (out / "latest").read_text().strip() / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = launch(tiny_args("xlstm", corpus, out, steps=STEPS, extra=["--log-every", "1", "--eval-every", "1000"]))
    assert proc.wait(timeout=300) == 0, proc.communicate()
    return out


@pytest.mark.parametrize("signame,status", [("SIGTERM", 143), ("SIGUSR1", 0)])
def test_signal_checkpoints_and_resume_is_exact(signame, status, corpus, tmp_path, reference):
    out = tmp_path / "run"
    args = tiny_args("xlstm", corpus, out, steps=STEPS, extra=["--log-every", "1", "--eval-every", "1000"])
    code, stdout, stderr = interrupt_after(launch(args), out, getattr(signal, signame))
    assert code == status, stderr[-2000:]
    stopped = step_of(out)
    assert 0 < stopped < STEPS and f"{signame} at step {stopped}: checkpoint saved" in stdout + stderr
    assert "Traceback" not in stderr
    resumed = launch(["train", "--resume", "--out", str(out)])
    assert resumed.wait(timeout=300) == 0, resumed.communicate()
    got, want = weights(out), weights(reference)
    assert step_of(out) == STEPS and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_torchrun_processes_stop_at_the_same_step(corpus, tmp_path):
    """torchrun forwards SIGTERM to every process; they agree on the step and write one whole checkpoint, from
    which a run resumes (exactness is the one-process test's: two processes round differently)."""
    out = tmp_path / "run"
    args = tiny_args("xlstm", corpus, out, steps=STEPS, extra=["--log-every", "1", "--eval-every", "1000"])
    code, stdout, stderr = interrupt_after(launch(args, nproc=2), out, signal.SIGTERM)
    assert code != 0 and 0 < step_of(out) < STEPS, stderr[-2000:]
    ckpt = out / (out / "latest").read_text().strip()
    assert (ckpt / "config.json").is_file() and (ckpt / "trainer.pt").is_file()
    assert f"SIGTERM at step {step_of(out)}: checkpoint saved" in stdout  # the main process says where it stopped
    resumed = launch(["train", "--resume", "--out", str(out)])
    assert resumed.wait(timeout=300) == 0, resumed.communicate()
    assert step_of(out) == STEPS


def test_files_get_the_umask_permissions(corpus, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(["sh", "-c", 'umask 027 && exec "$0" -m openxlstm "$@"', sys.executable,
                           *tiny_args("xlstm", corpus, out, steps=2)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    assert modes and all(mode == (0o750 if (out / name).is_dir() else 0o640) for name, mode in modes.items()), modes


def test_output_into_a_closed_pipe_ends_quietly(corpus, tmp_path):
    out = tmp_path / "run"
    assert subprocess.run([sys.executable, "-m", "openxlstm", *tiny_args("xlstm", corpus, out, steps=2)],
                          capture_output=True).returncode == 0
    cmd = (f'"{sys.executable}" -m openxlstm generate --checkpoint "{out}" --prompt "The " --max-new-tokens 3000 '
           f'--seed 0 | head -c 20; echo " status=${{PIPESTATUS[0]}}" >&2')
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, timeout=300)
    err = proc.stderr.decode(errors="replace")
    assert len(proc.stdout) == 20 and "Traceback" not in err and "BrokenPipe" not in err
    assert err.strip().endswith("status=0"), err
