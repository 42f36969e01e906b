"""Tokenizers: bytes (the default: 256 byte ids and an end-of-document id, 256) or a Hugging Face
``tokenizers`` tokenizer (a local tokenizer.json, or a byte-level BPE trained on the corpus, whose
end-of-document token is "<|endoftext|>"). All share ``encode``/``encode_batch``/``decode``/``vocab_size``/
``eod_id`` (None: no end-of-document token) and a ``spec()`` saved with checkpoints.

Old runs keep their vocabulary: a checkpoint's byte spec without "eod" (written before the token existed)
loads as the 256-id byte tokenizer, and a BPE file without an end-of-document token has ``eod_id`` None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ..errors import UserError


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, and 256 for the end of a document (``eod=False``: the 256-id
    vocabulary of runs made before it existed). Decoding drops the end-of-document id and replaces invalid
    UTF-8 sequences."""

    bytes_per_token = 1.0
    EOD = 256

    def __init__(self, eod: bool = True):
        self.eod_id = self.EOD if eod else None
        self.vocab_size = 257 if eod else 256

    def encode(self, text: str) -> np.ndarray:
        """str -> (N,) uint16 token ids."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"type": "byte", "eod": self.eod_id is not None}

    def save(self, directory: Path) -> None:
        """Bytes need no file."""


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError("this needs the 'tokenizers' package: pip install 'openxlstm[train]' (or pip install tokenizers)") from None
    return tokenizers


EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")  # looked up in this order


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` (from a tokenizer.json). ``eod_id``: the id of its first special
    token among ``EOD_TOKENS``, None without one; that text inside a document stays text (not the special id)."""

    FILE = "tokenizer.json"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        self.eod_id = next((tokenizer.token_to_id(t) for t in EOD_TOKENS if t in special), None)
        if self.eod_id is not None and hasattr(tokenizer, "encode_special_tokens"):
            tokenizer.encode_special_tokens = True  # "<|endoftext|>" typed in a document is not a boundary

    @classmethod
    def from_file(cls, path) -> "HFTokenizer":
        tokenizers = _require_tokenizers()
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as e:  # the Rust library raises plain Exceptions for bad files
            raise UserError(f"cannot read tokenizer {str(path)!r}: {e}") from None

    def encode(self, text: str) -> np.ndarray:
        return self._ids([self._run(self.tokenizer.encode, text)])[0]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return self._ids(self._run(self.tokenizer.encode_batch, texts))

    def _ids(self, encodings) -> list[np.ndarray]:
        dtype = np.uint16 if self.vocab_size <= 65535 else np.uint32
        return [np.asarray(e.ids, dtype=dtype) for e in encodings]

    @staticmethod
    def _run(encode, texts):
        try:
            return encode(texts)
        except Exception as e:  # the Rust library raises plain Exceptions, e.g. a WordLevel without unk_token
            if type(e) is not Exception:  # a TypeError or the like is a bug, not the user's tokenizer
                raise
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]  # the first line; an empty message too
            raise UserError(f"the tokenizer cannot encode this text ({why}); a word-level "
                            f"tokenizer needs an unknown token (unk_token) for words outside its vocabulary") from None

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids if int(i) != self.eod_id], skip_special_tokens=False)

    def spec(self) -> dict:
        return {"type": "hf", "file": self.FILE}

    def save(self, directory: Path) -> None:
        self.tokenizer.save(str(Path(directory) / self.FILE))


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE (GPT-2 style) trained on ``texts``, with one special token, "<|endoftext|>" (the end of
    a document), counted in ``vocab_size``."""
    tokenizers = _require_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise UserError(f"a BPE vocabulary needs more than the 256 byte symbols and the end-of-document token, "
                        f"got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[EOD_TOKENS[0]], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok)


def load_tokenizer(spec: dict, directory: Optional[Path] = None):
    """The tokenizer described by ``spec`` (from a checkpoint's config.json); HF files live in ``directory``.
    A byte spec without "eod" (older runs) is the 256-id byte tokenizer."""
    if spec is None:
        return ByteTokenizer(eod=False)
    if spec.get("type") == "byte":
        return ByteTokenizer(eod=bool(spec.get("eod", False)))
    if spec.get("type") == "hf":
        path = Path(directory) / spec.get("file", HFTokenizer.FILE)
        if not path.is_file():
            raise UserError(f"the checkpoint's tokenizer file {str(path)!r} is missing")
        return HFTokenizer.from_file(path)
    return None  # pre-tokenized data without a tokenizer: ids only


__all__ = ["ByteTokenizer", "HFTokenizer", "train_bpe", "load_tokenizer", "EOD_TOKENS"]
