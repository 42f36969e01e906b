"""Run directories: one run at a time in each, and nothing a user made before lost.

    RUN/.lock   held (``flock``) by the process that trains in RUN, for as long as it runs; the file names
                that process. The lock of a process that died is not held (the system releases it), so the
                next run takes it over: a crash never blocks a directory.

A fresh run needs a new or empty directory. A directory that holds a run is continued with ``--resume`` or
replaced with ``--overwrite``, which deletes that run's own files only (checkpoints, metrics, plot, summary)
and leaves anything else in the directory alone. Resuming from a checkpoint older than the run's latest
would replace the later checkpoints: that too needs ``--overwrite``. Leftovers of a crashed save are
removed once the lock is held.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..io.files import write_error, write_text_atomic
from ..io.run import LATEST, clean_leftovers, read_meta

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, runs are not locked
    fcntl = None

LOCK = ".lock"
# what a run writes into its directory (besides ckpt-NNNNNN and hidden temporaries)
RUN_FILES = {LATEST, "metrics.csv", "summary.json", "loss.png", "tokenizer.json", "tensorboard"}
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")


def is_run_file(name: str) -> bool:
    """True for the names a run writes into its directory."""
    return name in RUN_FILES or name.startswith(("ckpt-", ".ckpt-")) or (name.startswith(".") and ".tmp-" in name)


class RunLock:
    """The lock of one run directory (see the module docstring); ``acquire`` raises a UserError naming the
    process that holds it."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK
        self.fd: Optional[int] = None

    def holder(self) -> str:
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        return text or "another process"

    def acquire(self) -> "RunLock":
        if fcntl is None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise UserError(f"run directory {str(self.path.parent)!r} is in use by {self.holder()}: wait "
                                    f"for that run to end, or train into another --out") from None
                try:  # the file may have been removed by its previous holder between open and flock: retry
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError as e:
            raise write_error(e, f"the run directory {str(self.path.parent)!r}") or e
        self.fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and let go of the lock (the file goes first, so that a run waiting for it
        takes a fresh file)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None


def _checkpoint_steps(run_dir: Path) -> dict[int, Path]:
    steps = {}
    for p in run_dir.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir():
            steps[int(m.group(1))] = p
    return steps


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def _check_contents(out: Path, resume: Optional[Path], overwrite: bool) -> None:
    """Refuse to write over a previous run (or over files that are not a run's) without ``overwrite``."""
    if resume is not None and resume.parent.resolve() == out.resolve():
        step = read_meta(resume).get("step", 0)
        later = {s: p for s, p in _checkpoint_steps(out).items() if s > step}
        if later:
            names = ", ".join(p.name for _, p in sorted(later.items()))
            if not overwrite:
                raise UserError(f"resuming from {resume.name} would replace the later checkpoints of "
                                f"{str(out)!r} ({names}); add --overwrite to replace them, or resume into "
                                f"another --out")
            write_text_atomic(out / LATEST, resume.name + "\n")  # never a moment without a whole checkpoint
            for p in later.values():
                shutil.rmtree(p)
        return
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if not entries:
        return
    ours = [e for e in entries if is_run_file(e)]
    if not overwrite:
        if ours:
            raise UserError(f"--out {str(out)!r} already holds a run ({', '.join(ours[:4])}"
                            f"{', ...' if len(ours) > 4 else ''}): continue it with --resume, replace it with "
                            f"--overwrite, or choose another --out")
        raise UserError(f"--out {str(out)!r} is not empty ({', '.join(entries[:4])}"
                        f"{', ...' if len(entries) > 4 else ''}): a run needs a new or empty directory")
    for name in ours:
        _remove(out / name)


def prepare_run_dir(out, resume: Optional[Path] = None, overwrite: bool = False) -> RunLock:
    """Lock run directory ``out`` and check that this run may write there (see the module docstring): a fresh
    run (``resume`` None) or one resumed from another directory needs it new or empty, or ``overwrite``.
    Returns the held lock (release it when the run ends)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; name a directory for the run")
    lock = RunLock(out).acquire()
    try:
        _check_contents(out, resume, overwrite)
        clean_leftovers(out)
    except OSError as e:
        lock.release()
        raise write_error(e, f"into the run directory {str(out)!r}") or e
    except BaseException:
        lock.release()
        raise
    return lock


__all__ = ["RunLock", "prepare_run_dir", "is_run_file", "LOCK", "RUN_FILES"]
