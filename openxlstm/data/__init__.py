"""Data: corpora (incl. the embedded default), tokenizers, token files, train/val split, batch sampling."""

from .corpus import Document, default_corpus, read_corpus, split_documents
from .dataset import TokenData, load_data, load_token_file, make_tokenizer
from .sampler import BatchSampler, eval_windows
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe

__all__ = ["Document", "default_corpus", "read_corpus", "split_documents", "TokenData", "load_data",
           "load_token_file", "make_tokenizer", "BatchSampler", "eval_windows", "ByteTokenizer", "HFTokenizer",
           "load_tokenizer", "train_bpe"]
