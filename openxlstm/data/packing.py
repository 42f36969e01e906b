"""Documents packed into rows: token streams with their document boundaries, batches with ``cu_seqlens``
and labels that never cross a boundary.

A packed stream is the documents laid end to end, each followed by the tokenizer's end-of-document id, with
``doc_starts`` the offset of every document's first token. A training or evaluation row is any window of
the stream; inside it every document boundary becomes a ``cu_seqlens`` entry (the model resets its state
there, see ``openxlstm.ops.varlen``) and the label of the last token of each document (its end-of-document
token, whose next token opens another document) is -100: the model learns to predict the end of a document
but never the first token of the next one from the previous one's context.

A batch of B rows of S tokens has ``cu_seqlens`` over its B*S tokens read row by row, with every row start
among the boundaries, which is what every model's ``forward(..., cu_seqlens=...)`` takes for B > 1.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from ..ops.cross_entropy import IGNORE_INDEX


class PackedTokens(NamedTuple):
    """tokens (N,) integer array; doc_starts (D,) int64 offsets of the documents' first tokens (ascending)."""

    tokens: np.ndarray
    doc_starts: np.ndarray


def pack_documents(docs: Sequence[np.ndarray], eod_id: Optional[int], dtype=np.uint16) -> PackedTokens:
    """The documents' token arrays laid end to end, each followed by ``eod_id`` (None: nothing appended);
    empty documents are left out."""
    docs = [np.asarray(d) for d in docs if len(d) > 0]
    tail = [] if eod_id is None else [eod_id]
    lengths = np.array([len(d) + len(tail) for d in docs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if docs else np.zeros(0, np.int64)
    if not docs:
        return PackedTokens(np.zeros(0, dtype=dtype), starts)
    parts = [np.concatenate([d.astype(dtype), np.asarray(tail, dtype=dtype)]) for d in docs]
    return PackedTokens(np.concatenate(parts), starts)


def split_packed(packed: PackedTokens, cut: int) -> tuple[PackedTokens, PackedTokens]:
    """The stream cut at token ``cut``: (head, tail), the tail's first token a document start."""
    starts = packed.doc_starts
    head = PackedTokens(packed.tokens[:cut], starts[starts < cut])
    tail_starts = np.concatenate([[0], starts[starts > cut] - cut]).astype(np.int64)
    return head, PackedTokens(packed.tokens[cut:], tail_starts)


def eod_starts(tokens: np.ndarray, eod_id: int) -> np.ndarray:
    """Document starts of a token stream whose documents end with ``eod_id``: 0 and every position after an
    end-of-document token (one pass over the array)."""
    after = np.flatnonzero(np.asarray(tokens) == eod_id) + 1
    return np.concatenate([[0], after[after < len(tokens)]]).astype(np.int64)


def window_batch(tokens: np.ndarray, starts: Sequence[int], seq_len: int,
                 doc_starts: Optional[np.ndarray] = None):
    """Rows of ``seq_len`` tokens from the windows ``tokens[s:s + seq_len + 1]`` of each ``s`` in ``starts``.

    Returns (input_ids, labels), each (B, S) int64 with labels the next tokens, or with ``doc_starts``
    (input_ids, labels, cu_seqlens): labels -100 where the next token opens another document, cu_seqlens
    (D+1,) int32 over the B*S tokens with every row start and every document start inside a row.
    """
    w = torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts]))
    x, y = w[:, :-1], w[:, 1:].clone()  # (B, S) each
    if doc_starts is None:
        return x, y
    bounds = []
    for r, s in enumerate(starts):
        lo, hi = np.searchsorted(doc_starts, [s + 1, s + seq_len + 1])
        inner = doc_starts[lo:hi] - s  # in [1, S]: the document starts at these positions of the window
        y[r, torch.from_numpy(inner - 1)] = IGNORE_INDEX  # their previous token predicts across a boundary
        bounds.append(r * seq_len)
        bounds.extend((r * seq_len + inner[inner < seq_len]).tolist())
    bounds.append(len(starts) * seq_len)
    return x, y, torch.tensor(bounds, dtype=torch.int32)


def packed_labels(input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Next-token labels (B, S) for packed rows whose tokens are all there is: labels[t] = input_ids[t + 1]
    within a document, -100 at each document's last token. On the device."""
    B, S = input_ids.shape
    flat = input_ids.reshape(-1)
    labels = torch.full_like(flat, IGNORE_INDEX)
    labels[:-1] = flat[1:]
    ends = torch.zeros(B * S + 1, dtype=torch.bool, device=flat.device)
    ends[cu_seqlens.long()] = True  # position p starts a document: p - 1 ends one
    labels[ends[1:]] = IGNORE_INDEX  # with the row starts (boundaries) and B*S: every row's last token too
    return labels.view(B, S)


def pad_pack(sequences: Sequence[Sequence[int]], seq_len: int, pad_id: int):
    """Whole sequences (documents, examples) packed in order into rows of ``seq_len``, a new row whenever the
    next one does not fit, each row's remainder padding: (input_ids (B, S) int64, labels (B, S) with -100 on
    padding and at each sequence's last token, cu_seqlens (D+1,) int32 with the padding a document of its own,
    so it never touches a real token). A sequence longer than ``seq_len`` is an error."""
    rows, row, used = [], [], 0
    for seq in sequences:
        seq = list(seq)
        if not 0 < len(seq) <= seq_len:
            raise ValueError(f"pad_pack: every sequence needs 1 to seq_len = {seq_len} tokens, got {len(seq)}")
        if used + len(seq) > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(seq)
        used += len(seq)
    if row:
        rows.append(row)
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.int64)
    bounds = []
    for r, docs in enumerate(rows):
        pos = 0
        for seq in docs:
            bounds.append(r * seq_len + pos)
            ids[r, pos:pos + len(seq)] = torch.tensor(seq)
            labels[r, pos:pos + len(seq) - 1] = torch.tensor(seq[1:])
            pos += len(seq)
        if pos < seq_len:
            bounds.append(r * seq_len + pos)  # the padding
    bounds.append(len(rows) * seq_len)
    return ids, labels, torch.tensor(bounds, dtype=torch.int32)


def split_micro_batches(cu_seqlens: torch.Tensor, rows: int, seq_len: int, parts: int) -> list[torch.Tensor]:
    """The ``cu_seqlens`` of each of ``parts`` equal groups of rows of a packed batch (host tensors)."""
    per = rows // parts
    out = []
    for a in range(parts):
        lo, hi = a * per * seq_len, (a + 1) * per * seq_len
        out.append(cu_seqlens[(cu_seqlens >= lo) & (cu_seqlens <= hi)] - lo)
    return out


__all__ = ["PackedTokens", "pack_documents", "split_packed", "eod_starts", "window_batch", "packed_labels",
           "pad_pack", "split_micro_batches", "IGNORE_INDEX"]
