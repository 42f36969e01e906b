"""File-system habits of every writer in ``openxlstm.io``: durable atomic writes that respect the umask,
directory swaps, one-line errors for a full disk or a forbidden path, and telling model directories apart.

A file is written under a temporary name in its directory, flushed, then renamed over its target, so a reader
sees the old file or the new one, never half of one; a directory is built as a temporary sibling and swapped
in. New files get the permissions the user's umask gives (as ``open()`` would), whatever the writing library
used for its temporary files.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from ..errors import UserError

# OSErrors caused by the machine, not by a bug: reported in one line
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG, errno.EIO}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_tree(root: Path) -> None:
    """Give every file under ``root`` mode 0666 & ~umask and every directory 0777 & ~umask, as ``open()`` and
    ``mkdir()`` would have: libraries that write through ``mkstemp`` leave files 0600."""
    mask = umask()
    root = Path(root)
    if root.is_file():
        os.chmod(root, 0o666 & ~mask)
        return
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in files:
            os.chmod(Path(dirpath) / name, 0o666 & ~mask)


def fsync(path: Path) -> None:
    """Flush a file or a directory (its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync(Path(dirpath) / name)
        fsync(Path(dirpath))


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (its directory must exist)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def replace_dir(new: Path, target: Path) -> None:
    """Move directory ``new`` to ``target``; an existing target (emptiness or overwrite already checked) is
    set aside first and deleted only once ``new`` is in place."""
    chmod_tree(new)
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_writable_dir(target: Path, overwrite: bool) -> None:
    """A model directory may be written at ``target``: absent, empty, or (with ``overwrite``) replaced."""
    if target.exists() and not target.is_dir():
        raise UserError(f"{str(target)!r} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UserError(f"{str(target)!r} is not empty: pass overwrite=True (--overwrite) to replace it")


def write_error(e: OSError, what: str) -> Optional[UserError]:
    """A one-line UserError for a full disk, a read-only or forbidden path (None for any other OSError)."""
    if e.errno not in USER_ERRNOS:
        return None
    where = f" ({e.filename})" if e.filename else ""
    return UserError(f"cannot write {what}: {e.strerror or e}{where}; nothing written before was changed: free disk "
                     f"space or fix the permissions, then run again (with --resume to continue a run)")


def read_json(path: Path) -> dict:
    """A JSON object from ``path`` (a one-line UserError when unreadable or not an object)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {str(path)!r}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{str(path)!r} must hold a JSON object")
    return data


def local_dir(path) -> Path:
    """``path`` as an existing local directory (one-line UserErrors for a file, a missing path, a Hub name)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise UserError(f"{str(path)!r} is a file: pass the checkpoint directory that holds config.json")
    if _HUB_NAME.match(str(path)):
        raise UserError(f"{str(path)!r} does not exist as a local directory, and openxlstm downloads nothing: if it "
                        f"names a Hugging Face model, fetch its files first (huggingface-cli download {path} "
                        f"--local-dir DIR) and pass DIR")
    raise UserError(f"checkpoint directory {str(path)!r} does not exist")


def detect_format(p: Path) -> str:
    """"openxlstm" (our runs, checkpoints and saved models), "transformers" or "xlstm_large" for a directory."""
    if (p / "latest").is_file():
        return "openxlstm"
    if (p / "config.json").is_file():
        try:
            cfg = read_json(p / "config.json")
        except UserError as e:
            raise UserError(f"checkpoint {str(p)!r} is corrupt: {e}") from None
        if cfg.get("format") == "openxlstm-checkpoint":
            return "openxlstm"
        if cfg.get("model_type") not in (None, "xlstm"):
            raise UserError(f"{str(p)!r} holds a transformers {cfg['model_type']!r} model; only xLSTM (model_type "
                            f"'xlstm') is supported")
        if cfg.get("model_type") == "xlstm" or "hidden_size" in cfg or "num_hidden_layers" in cfg:
            return "transformers"
        if "embedding_dim" in cfg and "num_blocks" in cfg:
            return "xlstm_large"
        raise UserError(f"{str(p)!r}: config.json is neither a transformers xLSTM config nor an openxlstm checkpoint")
    if (p / "config.yaml").is_file():
        return "xlstm_large"
    raise UserError(f"{str(p)!r} is not a checkpoint directory: no config.json (transformers, openxlstm) or "
                    f"config.yaml (xlstm_large) in it")


__all__ = ["USER_ERRNOS", "umask", "chmod_tree", "fsync", "fsync_tree", "write_text_atomic", "replace_dir",
           "check_writable_dir", "write_error", "read_json", "local_dir", "detect_format"]
