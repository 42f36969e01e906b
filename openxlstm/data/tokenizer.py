"""Tokenizers: bytes (the default, vocabulary 256) or a Hugging Face ``tokenizers`` tokenizer (a local
tokenizer.json, or a byte-level BPE trained on the corpus). All share ``encode``/``decode``/``vocab_size``
and a ``spec()`` saved with checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ..errors import UserError


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255; decoding replaces invalid UTF-8 sequences."""

    vocab_size = 256
    bytes_per_token = 1.0

    def encode(self, text: str) -> np.ndarray:
        """str -> (N,) uint16 token ids."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"type": "byte"}

    def save(self, directory: Path) -> None:
        """Bytes need no file."""


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError("this needs the 'tokenizers' package: pip install 'openxlstm[train]' (or pip install tokenizers)") from None
    return tokenizers


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` (from a tokenizer.json)."""

    FILE = "tokenizer.json"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_file(cls, path) -> "HFTokenizer":
        tokenizers = _require_tokenizers()
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as e:  # the Rust library raises plain Exceptions for bad files
            raise UserError(f"cannot read tokenizer {str(path)!r}: {e}") from None

    def encode(self, text: str) -> np.ndarray:
        dtype = np.uint16 if self.vocab_size <= 65535 else np.uint32
        try:
            return np.asarray(self.tokenizer.encode(text).ids, dtype=dtype)
        except Exception as e:  # the Rust library raises plain Exceptions, e.g. a WordLevel without unk_token
            raise UserError(f"the tokenizer cannot encode this text ({str(e).strip().splitlines()[0]}); a word-level "
                            f"tokenizer needs an unknown token (unk_token) for words outside its vocabulary") from None

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def spec(self) -> dict:
        return {"type": "hf", "file": self.FILE}

    def save(self, directory: Path) -> None:
        self.tokenizer.save(str(Path(directory) / self.FILE))


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE (GPT-2 style, no special tokens) trained on ``texts``."""
    tokenizers = _require_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise UserError(f"a BPE vocabulary needs more than the 256 byte symbols, got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok)


def load_tokenizer(spec: dict, directory: Optional[Path] = None):
    """The tokenizer described by ``spec`` (from a checkpoint's config.json); HF files live in ``directory``."""
    if spec is None or spec.get("type") == "byte":
        return ByteTokenizer()
    if spec.get("type") == "hf":
        path = Path(directory) / spec.get("file", HFTokenizer.FILE)
        if not path.is_file():
            raise UserError(f"the checkpoint's tokenizer file {str(path)!r} is missing")
        return HFTokenizer.from_file(path)
    return None  # pre-tokenized data without a tokenizer: ids only


__all__ = ["ByteTokenizer", "HFTokenizer", "train_bpe", "load_tokenizer"]
