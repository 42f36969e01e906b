"""Load training data as two flat token arrays (train, validation) plus the tokenizer that made them.

Sources: the embedded default corpus (``data=None``), a text file or folder, or a pre-tokenized token file
(``.npy``, or raw ``.bin`` of uint16 ids as nanoGPT writes them), which is memory-mapped, not read.
Tokenizers: "byte" (default for text), a path to a tokenizer.json, or "bpe:N" (train a byte-level BPE of
vocabulary N on the training split).

Packed documents (``pack_documents``; default: on for corpora made of documents, i.e. the default corpus and
folders, when the tokenizer has an end-of-document token): each document is tokenized on its own and followed
by the end-of-document id, and the arrays come with the document starts (``train_starts``, ``val_starts``)
from which batches get their ``cu_seqlens`` and boundary labels (``packing.py``). Off, documents are joined
by a blank line into one stream, as before the token existed. A token file is packed on request, its
documents ending at the tokenizer's end-of-document id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError
from .corpus import default_corpus, read_corpus, split_document_lists, split_documents
from .packing import PackedTokens, eod_starts, pack_documents, split_packed
from .tokenizer import ByteTokenizer, HFTokenizer, train_bpe

TOKEN_FILE_SUFFIXES = (".bin", ".npy")


@dataclass
class TokenData:
    """train, val: (N,) integer token arrays (maybe memory-mapped). ``bytes_per_token`` converts a loss per
    token into bits per byte (None for token files without a tokenizer). train_starts, val_starts: (D,)
    int64 document starts of packed data, None when documents are not packed."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: object
    vocab_size: int
    bytes_per_token: Optional[float]
    description: str
    train_starts: Optional[np.ndarray] = None
    val_starts: Optional[np.ndarray] = None


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
              bin_dtype: str = "uint16", pack_documents: Optional[bool] = None) -> TokenData:
    """Tokenize (or map) the data and split off ``val_fraction`` for validation; ``pack_documents`` None
    packs corpora made of documents (see the module docstring)."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"the validation fraction must be in (0, 1), got {val_fraction}")
    if data is not None and Path(data).suffix in TOKEN_FILE_SUFFIXES:
        return _load_token_file(data, tokenizer, val_fraction, bin_dtype, bool(pack_documents))

    docs = default_corpus() if data is None else read_corpus(data)
    made_of_documents = data is None or Path(data).is_dir()
    name = "the default corpus (pydoc topics + stdlib sources)" if data is None else str(data)
    train_text, val_text = split_documents(docs, val_fraction)
    tok = make_tokenizer(tokenizer, train_text)
    eod = getattr(tok, "eod_id", None)
    if pack_documents and eod is None:
        raise UserError("--pack-documents needs a tokenizer with an end-of-document token (the byte tokenizer, "
                        "a BPE trained here, or a tokenizer.json with <|endoftext|> or </s>)")
    if not (made_of_documents if pack_documents is None else pack_documents) or eod is None:
        train, val = tok.encode(train_text), tok.encode(val_text)
        train_starts = val_starts = None
    else:
        dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
        lists = split_document_lists(docs, val_fraction)
        if lists is not None:
            (train, train_starts), (val, val_starts) = (
                pack_documents_of(part, tok, eod, dtype) for part in lists)
            val_text = "".join(d.text for d in lists[1])
        else:  # too few documents to hold some out: the packed stream's tail is the validation split
            packed = PackedTokens(*pack_documents_of(docs, tok, eod, dtype))
            (train, train_starts), (val, val_starts) = split_packed(packed, int(len(packed.tokens) * (1.0 - val_fraction)))
            val_text = tok.decode(val)
    if len(val) == 0 or len(train) == 0:
        raise UserError(f"the data is too small to hold out a validation split ({len(train) + len(val)} tokens)")
    packed_note = f", {len(train_starts) + len(val_starts)} packed documents" if train_starts is not None else ""
    desc = f"{name}: {len(docs)} documents, {len(train):,} train / {len(val):,} val tokens{packed_note}"
    return TokenData(train, val, tok, tok.vocab_size, len(val_text.encode("utf-8")) / len(val), desc,
                     train_starts, val_starts)


def pack_documents_of(docs, tok, eod: int, dtype) -> PackedTokens:
    """The documents tokenized one by one (in batches) and packed, each followed by ``eod``."""
    return pack_documents(tok.encode_batch([d.text for d in docs]), eod, dtype)


def _load_token_file(data: str, tokenizer, val_fraction: float, bin_dtype: str, pack: bool) -> TokenData:
    tokens = load_token_file(Path(data), bin_dtype)
    if len(tokens) < 4:
        raise UserError(f"token file {data!r} is empty or too small ({len(tokens)} tokens)")
    tok = None if tokenizer is None else make_tokenizer(tokenizer, None)
    max_id = int(tokens.max())
    vocab = tok.vocab_size if tok is not None else max_id + 1
    if max_id >= vocab:
        raise UserError(f"token file {data!r} holds id {max_id}, outside the tokenizer's vocabulary of {vocab}")
    cut = int(len(tokens) * (1.0 - val_fraction))
    desc = f"{data} ({len(tokens):,} tokens)"
    if not pack:
        return TokenData(tokens[:cut], tokens[cut:], tok, vocab, None, desc)
    eod = getattr(tok, "eod_id", None)
    if eod is None:
        raise UserError("--pack-documents on a token file needs --tokenizer with an end-of-document token, whose "
                        "id ends each document in the file")
    (train, train_starts), (val, val_starts) = split_packed(PackedTokens(tokens, eod_starts(tokens, eod)), cut)
    return TokenData(train, val, tok, vocab, None, f"{desc}, {len(train_starts) + len(val_starts)} packed documents",
                     train_starts, val_starts)


__all__ = ["TokenData", "load_data", "load_token_file", "make_tokenizer", "pack_documents_of", "TOKEN_FILE_SUFFIXES"]
