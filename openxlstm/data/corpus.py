"""Text corpora: the embedded default corpus (ships with CPython) and user text files or folders.

The default corpus is the Python documentation's topic pages (``pydoc_data.topics``) plus the top-level
standard-library ``.py`` sources of the running interpreter: a few MB of English and Python, on every
machine, with no network.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path
from typing import NamedTuple

from ..errors import UserError


class Document(NamedTuple):
    name: str
    text: str


def default_corpus(max_bytes: int = 8_000_000) -> list[Document]:
    """The pydoc topic pages, then the top-level stdlib modules in name order, up to ``max_bytes`` of text."""
    import pydoc_data.topics

    docs = [Document(f"pydoc:{k}", v) for k, v in sorted(pydoc_data.topics.topics.items())]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            docs.append(Document(f"stdlib:{path.name}", path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    kept, total = [], 0
    for doc in docs:
        size = len(doc.text.encode("utf-8"))
        if total + size > max_bytes:
            break
        kept.append(doc)
        total += size
    return kept


def read_corpus(path) -> list[Document]:
    """A text file, or every UTF-8 file under a folder (recursively, hidden entries skipped, name order)."""
    root = Path(path)
    if not root.exists():
        raise UserError(f"data path {str(root)!r} does not exist")
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            if root.is_file():
                raise UserError(f"data file {str(f)!r} is not UTF-8 text (pre-tokenized data must end in .bin or .npy)") from None
            continue
        if text:
            docs.append(Document(str(f.relative_to(root)) if f != root else f.name, text))
    if not docs:
        raise UserError(f"no text found in {str(root)!r} (empty file or no UTF-8 files)")
    return docs


def split_document_lists(docs: list[Document], val_fraction: float):
    """(train documents, val documents) when there are >= 10 documents: each goes to validation when a hash of
    its name says so (a stable, spread-out choice); None with fewer, or if that leaves a side empty."""
    if len(docs) >= 10:
        val = [d for d in docs if zlib.crc32(d.name.encode()) % 1000 < val_fraction * 1000]
        train = [d for d in docs if zlib.crc32(d.name.encode()) % 1000 >= val_fraction * 1000]
        if val and train:
            return train, val
    return None


def split_documents(docs: list[Document], val_fraction: float) -> tuple[str, str]:
    """(train text, val text). The documents of ``split_document_lists`` joined by a blank line; without such
    a split, the joined text's tail is the validation split."""
    lists = split_document_lists(docs, val_fraction)
    if lists is not None:
        return "\n\n".join(d.text for d in lists[0]), "\n\n".join(d.text for d in lists[1])
    text = "\n\n".join(d.text for d in docs)
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


__all__ = ["Document", "default_corpus", "read_corpus", "split_documents", "split_document_lists"]
