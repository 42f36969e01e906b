"""What the GPU benchmarks share: one subprocess per job under a timeout, rows appended to a CSV as measured.

A job's worker writes its own rows (``append_row``) the moment each is measured; when the worker crashes,
hangs past its timeout or exits early, the parent writes a row for each planned row that is missing, with
the reason (``failure_reason``). Nothing here imports torch: the parent process never touches the GPU.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def append_row(path: Path, fields: list[str], row: dict) -> None:
    """Append one row (header first if the file is new or empty), flushed to disk at once."""
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in fields})
        fh.flush()
        os.fsync(fh.fileno())


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def short_error(e: BaseException) -> str:
    """One line for a table: 'out of memory', or the exception type and the first line of its message."""
    text = str(e).strip().splitlines()
    msg = f"{type(e).__name__}: {text[0] if text else ''}"
    if "out of memory" in msg.lower():
        return "out of memory"
    return msg[:160]


def failure_reason(rc: int, stderr: str, timed_out: bool, cap: float) -> str:
    """'failed: ...' for a worker that did not write all its rows: the timeout, the signal or exit code, and
    the most telling line of its stderr (the last that mentions an error, an abort or an assertion)."""
    if timed_out:
        return f"failed: timeout after {cap:.0f} s"
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    keep = [ln for ln in lines if any(w in ln.lower() for w in ("error", "abort", "assert", "killed"))]
    last = (keep or lines or [""])[-1][:160]
    if rc < 0:
        try:
            how = f"signal {signal.Signals(-rc).name}"
        except ValueError:
            how = f"signal {-rc}"
    else:
        how = f"exit code {rc}"
    return f"failed: {how}" + (f": {last}" if last else "")


def worker_env(interpret: bool) -> dict:
    """The environment of a worker: the repository on PYTHONPATH, unbuffered output, the Triton interpreter on
    or off, autotuning results cached on disk (later processes reuse them instead of tuning again)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def run_worker(cmd: list[str], cap: float, log_path: Path, env: dict, title: str) -> tuple[int, str, bool, float]:
    """Run ``cmd`` (its own process group) for at most ``cap`` seconds, stdout to the log; returns
    (exit code, stderr, timed out, seconds). On timeout the whole group is killed."""
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n===== {title} (cap {cap:.0f} s): {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        timed_out = False
        try:
            _, err = proc.communicate(timeout=cap)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        seconds = time.time() - t0
        log.write(err or "")
        log.write(f"===== {title}: exit {proc.returncode} after {seconds:.1f} s\n")
    return proc.returncode, err or "", timed_out, seconds


def environment() -> dict:
    """Device and versions, read in a subprocess (so that the parent never initialises CUDA)."""
    code = ("import json, platform, torch\n"
            "try:\n    import triton; tv = triton.__version__\nexcept Exception:\n    tv = 'not importable'\n"
            "c = torch.cuda.is_available()\n"
            "print(json.dumps({'device': torch.cuda.get_device_name() if c else 'CPU (no CUDA)', 'torch': torch.__version__,"
            " 'cuda': torch.version.cuda, 'triton': tv, 'python': platform.python_version(),"
            " 'mem_gb': round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1) if c else None}))\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as e:
        return {"device": f"unknown ({type(e).__name__})", "torch": "?", "cuda": None, "triton": "?",
                "python": platform.python_version(), "mem_gb": None}


def header(title: str, env: dict, command: list[str], elapsed: float, budget: float) -> list[str]:
    """The first lines of a results page: device, versions, command, date, time used."""
    return [
        f"# {title}",
        "",
        f"- device: {env.get('device')}" + (f" ({env['mem_gb']} GB)" if env.get("mem_gb") else ""),
        f"- torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, Python {env.get('python')}",
        f"- command: `{shlex.join(command)}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; wall time {elapsed:.0f} s of a {budget:.0f} s budget",
    ]
