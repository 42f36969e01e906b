"""Packed training data: the end-of-document token of the tokenizers, documents packed with their starts,
batches with cu_seqlens and boundary labels, padding, the engine's micro-batches, and runs saved before the
end-of-document token existed (they load and resume with their 256-id vocabulary and unpacked data)."""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import rel_err
from helpers import TINY
from openxlstm import xLSTMConfig, xLSTMLM
from openxlstm.data import (BatchSampler, ByteTokenizer, load_data, load_tokenizer, pack_documents, packed_labels,
                            pad_pack, train_bpe, window_batch)
from openxlstm.errors import UserError
from openxlstm.models import build_model
from openxlstm.train import CosineSchedule, Engine, EngineConfig, TrainConfig, train
from openxlstm.train import load_model as model_from_checkpoint
from openxlstm.io.run import read_meta, resolve_checkpoint


def test_tokenizers_end_of_document():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eod_id, tok.spec()) == (257, 256, {"type": "byte", "eod": True})
    assert tok.decode([104, 105, 256, 33]) == "hi!"
    old = load_tokenizer({"type": "byte"})  # a checkpoint written before the token existed
    assert (old.vocab_size, old.eod_id) == (256, None)
    assert load_tokenizer(tok.spec()).vocab_size == 257
    bpe = train_bpe(["the quick brown fox jumps over the lazy dog " * 20, "def f(x): return x " * 20], 300)
    assert bpe.eod_id is not None and bpe.eod_id < bpe.vocab_size
    assert bpe.eod_id not in bpe.encode("a document that mentions <|endoftext|> as text").tolist()
    assert bpe.decode(bpe.encode("the fox").tolist() + [bpe.eod_id]) == "the fox"


def test_window_batch_boundaries_and_labels():
    docs = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 30)]  # lengths 5, 3, 10, each + EOD (99)
    packed = pack_documents(docs, 99)
    assert packed.doc_starts.tolist() == [0, 6, 10]
    assert packed.tokens[5] == 99 and packed.tokens[9] == 99
    x, y, cu = window_batch(packed.tokens, [2, 7], 6, packed.doc_starts)
    assert x[0].tolist() == [3, 4, 5, 99, 10, 11] and x[1].tolist() == [11, 12, 99, 20, 21, 22]
    assert y[0].tolist() == [4, 5, 99, -100, 11, 12]  # the EOD is predicted; what follows it is not
    assert y[1].tolist() == [12, 99, -100, 21, 22, 23]
    assert cu.tolist() == [0, 4, 6, 9, 12]  # row starts, document starts inside rows, B*S
    plain = window_batch(packed.tokens, [2, 7], 6)
    assert torch.equal(plain[0], x) and len(plain) == 2
    sampler = BatchSampler(len(packed.tokens), 6, 4, seed=0)
    assert torch.equal(sampler.batch(packed.tokens, 3, packed.doc_starts)[0], sampler.batch(packed.tokens, 3)[0])


def test_packed_labels_and_padding_leave_real_tokens_alone():
    """pad_pack rows give each sequence the logits it has alone; padding and the last token of each sequence
    are not scored; packed_labels builds the same labels on the device."""
    torch.manual_seed(0)
    model = xLSTMLM(xLSTMConfig(vocab_size=37, embedding_dim=32, num_blocks=2, slstm_at=[1], mlstm_num_heads=2,
                                slstm_num_heads=2)).double()
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13], [14, 15]]
    ids, labels, cu = pad_pack(seqs, 8, pad_id=0)
    assert ids.shape == (2, 8) and cu.tolist() == [0, 3, 8, 9, 13, 15, 16]  # the last slot: padding
    assert labels.tolist() == [[2, 3, -100, 5, 6, 7, 8, -100], [-100, 11, 12, 13, -100, 15, -100, -100]]
    logits = model(ids, cu_seqlens=cu)
    flat = logits.reshape(-1, 37)
    for seq, start in zip(seqs, [0, 3, 8, 9, 13]):
        alone = model(torch.tensor([seq]))[0]
        assert (flat[start:start + len(seq)] - alone).abs().max() <= 1e-12
    real = labels != -100
    assert torch.equal(packed_labels(ids, cu)[real], labels[real])
    with pytest.raises(ValueError, match="every sequence needs 1 to seq_len"):
        pad_pack([[1] * 9], 8, 0)


def test_load_data_packs_documents(corpus, tmp_path):
    data = load_data(str(corpus))
    eod = data.tokenizer.eod_id
    assert data.vocab_size == 257 and data.train_starts is not None and "packed" in data.description
    for tokens, starts in ((data.train, data.train_starts), (data.val, data.val_starts)):
        assert starts[0] == 0 and all(tokens[s - 1] == eod for s in starts[1:]) and tokens[-1] == eod
    assert load_data(str(corpus), pack_documents=False).train_starts is None
    one = tmp_path / "one.txt"
    one.write_text("a single long text file " * 200)
    assert load_data(str(one)).train_starts is None  # one file is not a corpus of documents
    cut = load_data(str(one), pack_documents=True)
    assert cut.val_starts.tolist() == [0] and cut.train_starts.tolist() == [0]
    ids = np.concatenate([np.arange(5), [256], np.arange(7), [256]]).astype(np.uint16)
    np.save(tmp_path / "ids.npy", ids)
    tokens = load_data(str(tmp_path / "ids.npy"), "byte", val_fraction=0.3, pack_documents=True)
    assert tokens.train_starts.tolist() == [0, 6] and tokens.val_starts.tolist() == [0]
    with pytest.raises(UserError, match="needs --tokenizer with an end-of-document token"):
        load_data(str(tmp_path / "ids.npy"), pack_documents=True)


def test_engine_splits_cu_seqlens_over_micro_batches():
    """One step on a packed batch of 4 rows: the same loss and weights with 2 micro-batches as with one."""
    results = []
    for accum in (1, 2):
        torch.manual_seed(0)
        model = build_model("xlstm", dict(TINY["xlstm"], vocab_size=37))
        engine = Engine(model, CosineSchedule(1e-3, 1e-4, 1, 10), EngineConfig(grad_accum=accum, device="cpu"))
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 37, (4, 12), generator=g)
        cu = torch.tensor([0, 5, 12, 24, 30, 36, 40, 48], dtype=torch.int32)
        loss = engine.train_step(ids, packed_labels(ids, cu), cu)
        results.append((loss, [p.detach().clone() for p in model.parameters()]))
    assert abs(results[0][0] - results[1][0]) <= 1e-6  # the micro-batches' losses need their own cu_seqlens
    assert all(rel_err(a, b) < 1e-4 for a, b in zip(results[0][1], results[1][1]))


def test_runs_from_before_the_end_of_document_token(corpus, tmp_path):
    """A checkpoint whose tokenizer spec has no "eod" and whose training config has no pack_documents loads
    with 256 ids and resumes on unpacked data, as it was trained."""
    run = tmp_path / "old"
    model_cfg = dict(TINY["xlstm"], vocab_size=256)
    cfg = TrainConfig(arch="xlstm", model=model_cfg, data=str(corpus), out=str(run), max_steps=3, batch_size=4,
                      seq_len=16, eval_every=3, eval_tokens=256, warmup=1, samples=0, progress=False)
    torch.manual_seed(0)
    engine = Engine(build_model("xlstm", model_cfg), cfg.schedule(), cfg.engine_config())
    engine.step = 1
    old_train = {k: v for k, v in asdict(cfg).items() if k != "pack_documents"}
    ckpt = engine.save(run, ByteTokenizer(eod=False), old_train)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["tokenizer"] = {"type": "byte"}
    (ckpt / "config.json").write_text(json.dumps(meta))
    model, tok, _ = model_from_checkpoint(str(run))
    assert model.config.vocab_size == 256 and tok.vocab_size == 256
    logs = []
    result = train(cfg, resume=str(run), log=logs.append)
    assert result["steps"] == 3 and not any("packed" in line for line in logs)
    assert read_meta(resolve_checkpoint(run))["tokenizer"] == {"type": "byte", "eod": False}


def test_evaluate_contexts_on_packed_tokens_equals_documents_alone():
    """openxlstm eval on packed tokens: a window holding two documents scores each as if alone (fresh state at
    the second, no target across the boundary), as packed training does."""
    from openxlstm.evaluate import evaluate_contexts

    torch.manual_seed(0)
    model = xLSTMLM(xLSTMConfig(vocab_size=40, embedding_dim=16, num_blocks=2, slstm_at=[1], mlstm_num_heads=2,
                                slstm_num_heads=2)).eval()
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 40, 10), rng.integers(0, 40, 13)
    packed = evaluate_contexts(model, np.concatenate([a, b]), [22], doc_starts=np.array([0, 10]))[0]
    alone = [evaluate_contexts(model, doc, [len(doc) - 1])[0] for doc in (a, b)]
    assert packed["tokens"] == sum(r["tokens"] for r in alone) == 9 + 12
    expected = sum(r["loss"] * r["tokens"] for r in alone) / packed["tokens"]
    assert abs(packed["loss"] - expected) <= 1e-5 * expected
    leaky = evaluate_contexts(model, np.concatenate([a, b]), [22])[0]  # without the starts: across the boundary
    assert leaky["tokens"] == 22 and abs(leaky["loss"] - expected) > 1e-3
