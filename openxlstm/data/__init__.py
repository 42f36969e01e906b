"""Data: corpora (incl. the embedded default), tokenizers, token files, train/val split, batch sampling,
documents packed into rows (``packing``)."""

from .corpus import Document, default_corpus, read_corpus, split_document_lists, split_documents
from .dataset import TokenData, load_data, load_token_file, make_tokenizer
from .packing import PackedTokens, pack_documents, packed_labels, pad_pack, window_batch
from .sampler import BatchSampler, eval_windows
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe

__all__ = ["Document", "default_corpus", "read_corpus", "split_documents", "split_document_lists", "TokenData",
           "load_data", "load_token_file", "make_tokenizer", "BatchSampler", "eval_windows", "ByteTokenizer",
           "HFTokenizer", "load_tokenizer", "train_bpe", "PackedTokens", "pack_documents", "packed_labels",
           "pad_pack", "window_batch"]
