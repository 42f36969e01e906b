"""Load training data as two flat token arrays (train, validation) plus the tokenizer that made them.

Sources: the embedded default corpus (``data=None``), a text file or folder, or a pre-tokenized token file
(``.npy``, or raw ``.bin`` of uint16 ids as nanoGPT writes them), which is memory-mapped, not read.
Tokenizers: "byte" (default for text), a path to a tokenizer.json, or "bpe:N" (train a byte-level BPE of
vocabulary N on the training split).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError
from .corpus import default_corpus, read_corpus, split_documents
from .tokenizer import ByteTokenizer, HFTokenizer, train_bpe

TOKEN_FILE_SUFFIXES = (".bin", ".npy")


@dataclass
class TokenData:
    """train, val: (N,) integer token arrays (maybe memory-mapped). ``bytes_per_token`` converts a loss per
    token into bits per byte (None for token files without a tokenizer)."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: object
    vocab_size: int
    bytes_per_token: Optional[float]
    description: str


def make_tokenizer(spec: Optional[str], train_text: Optional[str]):
    """The tokenizer for a --tokenizer value: None/"byte", "bpe:N" (trained on train_text), or a file path.
    A tokenizer object (anything with ``encode``) is returned as it is."""
    if spec is not None and not isinstance(spec, str):
        return spec
    if spec in (None, "byte"):
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        try:
            vocab = int(spec[4:])
        except ValueError:
            raise UserError(f"--tokenizer {spec!r}: expected bpe:VOCAB_SIZE, e.g. bpe:4096") from None
        if train_text is None:
            raise UserError("a BPE tokenizer can only be trained on text data, not on a token file")
        return train_bpe([train_text[i:i + 1_000_000] for i in range(0, len(train_text), 1_000_000)], vocab)
    if not Path(spec).is_file():
        raise UserError(f"--tokenizer {spec!r}: expected 'byte', 'bpe:N' or the path of a tokenizer.json")
    return HFTokenizer.from_file(spec)


def load_token_file(path: Path, bin_dtype: str = "uint16") -> np.ndarray:
    """A memory-mapped (N,) token array from a .npy or a raw .bin file."""
    try:
        if path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r")
        else:
            arr = np.memmap(path, dtype=np.dtype(bin_dtype), mode="r")
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read token file {str(path)!r}: {e}") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"token file {str(path)!r} must hold a 1-D integer array, got {arr.dtype} {arr.shape}")
    return arr


def load_data(data: Optional[str] = None, tokenizer: Optional[str] = None, val_fraction: float = 0.05,
              bin_dtype: str = "uint16") -> TokenData:
    """Tokenize (or map) the data and split off ``val_fraction`` for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"the validation fraction must be in (0, 1), got {val_fraction}")
    if data is not None and Path(data).suffix in TOKEN_FILE_SUFFIXES:
        tokens = load_token_file(Path(data), bin_dtype)
        if len(tokens) < 4:
            raise UserError(f"token file {data!r} is empty or too small ({len(tokens)} tokens)")
        tok = None if tokenizer is None else make_tokenizer(tokenizer, None)
        max_id = int(tokens.max())
        vocab = tok.vocab_size if tok is not None else max_id + 1
        if max_id >= vocab:
            raise UserError(f"token file {data!r} holds id {max_id}, outside the tokenizer's vocabulary of {vocab}")
        cut = int(len(tokens) * (1.0 - val_fraction))
        return TokenData(tokens[:cut], tokens[cut:], tok, vocab, None, f"{data} ({len(tokens):,} tokens)")

    docs = default_corpus() if data is None else read_corpus(data)
    train_text, val_text = split_documents(docs, val_fraction)
    tok = make_tokenizer(tokenizer, train_text)
    train, val = tok.encode(train_text), tok.encode(val_text)
    if len(val) == 0 or len(train) == 0:
        raise UserError(f"the data is too small to hold out a validation split ({len(train) + len(val)} tokens)")
    name = "the default corpus (pydoc topics + stdlib sources)" if data is None else str(data)
    desc = f"{name}: {len(docs)} documents, {len(train):,} train / {len(val):,} val tokens"
    return TokenData(train, val, tok, tok.vocab_size, len(val_text.encode("utf-8")) / len(val), desc)


__all__ = ["TokenData", "load_data", "load_token_file", "make_tokenizer", "TOKEN_FILE_SUFFIXES"]
