"""xLSTM-7B-style models (openxlstm.large) against transformers' xLSTMForCausalLM and the authors' xlstm_large.

Every reference model is built here, tiny and with random weights (gate biases spread so that the
stabilizer crosses the M_FLOOR), saved with its own ``save_pretrained`` and loaded with ours: nothing is
downloaded. The last tests are one per problem of transformers' implementation that we do not have.
"""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import rel_err
from helpers import one_line_error
from safetensors.torch import save_file

import openxlstm
from openxlstm import from_pretrained, generate, xLSTMLargeConfig, xLSTMLargeLM
from openxlstm.cli import main
from openxlstm.errors import UserError
from openxlstm.models.xlstm_large import soft_capped_cross_entropy
from openxlstm.io import load_pretrained
from openxlstm.io.run import save_checkpoint

try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights

V = 97

# (name, transformers xLSTMConfig fields, sequence length, max_shard_size for save_pretrained or None)
CONFIGS = [
    ("single", dict(hidden_size=64, num_heads=4), 150, None),
    ("fused-bias-odd", dict(hidden_size=48, num_heads=2, use_bias=True, weight_mode="fused"), 37, "20KB"),
    ("caps-tied", dict(hidden_size=40, num_heads=2, use_bias=True, qk_dim_factor=0.25, gate_soft_cap=4.0,
                       output_logit_soft_cap=5.0, tie_word_embeddings=True), 21, None),
    ("fused-3-heads", dict(hidden_size=72, num_heads=3, weight_mode="fused", ffn_proj_factor=1.3,
                           ffn_round_up_to_multiple_of=16, v_dim_factor=0.5), 70, "30KB"),
]


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere: input-gate biases in [-12, 2] (stabilizer below and above -10), forget-gate
    biases in [-2, 6], matrices N(0, 0.6^2 / fan_in), norm weights around 1, other vectors small."""
    g = torch.Generator().manual_seed(seed)

    def uniform(n, low, high):
        return low + (high - low) * torch.rand(n, generator=g)

    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("ifgate_preact.bias"):  # fused: [input; forget]
                p.copy_(torch.cat([uniform(p.shape[0] // 2, -12.0, 2.0), uniform(p.shape[0] // 2, -2.0, 6.0)]))
            elif name.endswith("igate_preact.bias"):
                p.copy_(uniform(p.shape[0], -12.0, 2.0))
            elif name.endswith("fgate_preact.bias"):
                p.copy_(uniform(p.shape[0], -2.0, 6.0))
            elif p.dim() == 2 and "embeddings" not in name:
                p.copy_(0.6 * r / p.shape[1] ** 0.5)
            elif p.dim() == 2:
                p.copy_(r)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.1 * r)
    return model.eval()


def hf_model(seed: int = 0, **fields) -> transformers.xLSTMForCausalLM:
    """A random transformers xLSTM (its own initialization is skipped: it fails for weight_mode "fused")."""
    config = transformers.xLSTMConfig(vocab_size=V, num_hidden_layers=2, **fields)
    with no_init_weights():
        model = transformers.xLSTMForCausalLM(config)
    return randomize_(model, seed)


def hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def ids_of(B: int, S: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def greedy_by_recomputing(logits_of, ids: torch.Tensor, n: int) -> list[list[int]]:
    """n greedy tokens per row, each from a full pass over the sequence so far (no cache at all)."""
    seq = ids
    for _ in range(n):
        seq = torch.cat([seq, logits_of(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("name,fields,S,shard", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_logits_equal_transformers(tmp_path, name, fields, S, shard):
    theirs = hf_model(**fields)
    theirs.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ours = from_pretrained(tmp_path)
    assert isinstance(ours, xLSTMLargeLM) and not ours.training
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters())
    ids = ids_of(2, S)
    with torch.no_grad():
        logits = ours(ids)
    assert logits.dtype == torch.float32
    assert rel_err(logits, hf_logits(theirs, ids)) <= 1e-5


def read_back_by_transformers(directory) -> transformers.xLSTMForCausalLM:
    """transformers' model from a saved directory. Its from_pretrained fails on every weight_mode "fused"
    checkpoint (its own too: the initialization it runs first breaks), so those are read as it would
    read them, without that step: its config class on config.json, the shards into its state dict (strict)."""
    config = transformers.xLSTMConfig.from_pretrained(directory)
    if config.weight_mode == "single":
        return transformers.xLSTMForCausalLM.from_pretrained(directory).eval()
    from safetensors.torch import load_file

    with no_init_weights():
        model = transformers.xLSTMForCausalLM(config)
    state = {k: v for f in sorted(directory.glob("model*.safetensors")) for k, v in load_file(f).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("name,fields,S,shard", CONFIGS[:2], ids=[c[0] for c in CONFIGS[:2]])
def test_save_pretrained_is_read_back_by_transformers(tmp_path, name, fields, S, shard):
    theirs = hf_model(**fields)
    theirs.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    out = ours.save_pretrained(tmp_path / "ours", max_shard_size="25KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    back = read_back_by_transformers(out)
    ids = ids_of(2, S)
    with torch.no_grad():
        assert rel_err(ours(ids), hf_logits(back, ids)) <= 1e-5
    assert all(torch.equal(p, theirs.state_dict()[k]) for k, p in back.state_dict().items())
    single = ours.save_pretrained(tmp_path / "single")  # unsharded below the default 5GB
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()
    again = from_pretrained(single)
    assert all(torch.equal(p, ours.state_dict()[k]) for k, p in again.state_dict().items())


def test_save_pretrained_keeps_a_non_empty_directory_unless_overwrite(tmp_path):
    model = xLSTMLargeLM(xLSTMLargeConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_heads=2))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        model.save_pretrained(tmp_path / "d")
    assert (tmp_path / "d" / "keep.txt").is_file()
    model.save_pretrained(tmp_path / "d", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_greedy_generation_equals_transformers(tmp_path):
    theirs = hf_model(hidden_size=128, num_heads=4, eos_token_id=None)  # qk_dim 64: transformers' cache works
    theirs.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    ids = ids_of(2, 11)
    with torch.no_grad():
        want = theirs.generate(ids, max_new_tokens=8, do_sample=False)[:, ids.shape[1]:].tolist()
    assert generate(ours, ids.tolist(), max_new_tokens=8, temperature=0) == want


def test_prefill_in_pieces_equals_one_pass(tmp_path):
    hf_model(**CONFIGS[0][1]).save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    ids = ids_of(2, 40)
    with torch.enable_grad():  # gradients on: one piece
        whole, state = ours(ids, return_state=True)
    ours.config.max_inference_chunksize = 16  # without gradients: pieces of 16, 16 and 8 tokens
    with torch.no_grad():
        pieces, state_p = ours(ids, return_state=True)
        last, state_l = ours(ids, return_state=True, logits_to_keep=1)
        last = last[:, -1]
    assert rel_err(pieces, whole) <= 1e-5 and rel_err(last, whole[:, -1]) <= 1e-5
    for a, b, c in zip(state, state_p, state_l):
        assert all(rel_err(x, y) <= 1e-5 and torch.equal(y, z) for x, y, z in zip(a, b, c))


def test_xlstm_large_layout(tmp_path):
    from xlstm.xlstm_large.model import xLSTMLarge
    from xlstm.xlstm_large.model import xLSTMLargeConfig as TheirConfig

    fields = dict(embedding_dim=64, num_heads=4, num_blocks=2, vocab_size=V, gate_soft_cap=10.0)
    theirs = randomize_(xLSTMLarge(TheirConfig(**fields, chunkwise_kernel="chunkwise--native_autograd",
                                               sequence_kernel="native_sequence__native", step_kernel="native",
                                               mode="inference", return_last_states=False)))
    (tmp_path / "config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
    weights = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    names = sorted(weights)
    save_file({k: weights[k] for k in names[:10]}, str(tmp_path / "model_0.safetensors"))
    save_file({k: weights[k] for k in names[10:]}, str(tmp_path / "model_1.safetensors"))
    model, tokenizer, info = load_pretrained(tmp_path)
    assert info["source"] == "xlstm_large" and tokenizer is None
    ids = ids_of(2, 33)
    with torch.no_grad():
        assert rel_err(model(ids), theirs(ids)) <= 1e-5


def test_run_directory_and_tokenizer(tmp_path):
    import tokenizers

    model = xLSTMLargeLM(xLSTMLargeConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_heads=2))
    randomize_(model)
    save_checkpoint(tmp_path / "run", 3, model)
    loaded = from_pretrained(tmp_path / "run", dtype="bfloat16")
    assert isinstance(loaded, xLSTMLargeLM) and loaded.backbone.embeddings.weight.dtype == torch.bfloat16
    assert all(torch.equal(p, model.state_dict()[k].bfloat16()) for k, p in loaded.state_dict().items())
    # a tokenizer.json beside transformers' files is read, and written back by save_pretrained
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    model.save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    with_tok = from_pretrained(tmp_path / "hf")
    assert with_tok.tokenizer.encode("w5 w7").tolist() == [5, 7]
    text = with_tok.generate("w5 w7", max_new_tokens=3, temperature=0)
    assert isinstance(text, str) and len(text.split()) == 3
    assert (with_tok.save_pretrained(tmp_path / "again") / "tokenizer.json").is_file()


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="download") as e:
        from_pretrained("NX-AI/xLSTM-7b")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        from_pretrained(tmp_path / "nothing")
    with pytest.raises(UserError, match="no config.json"):
        from_pretrained(tmp_path)
    hf_model(**CONFIGS[1][1]).save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    with pytest.raises(UserError, match="dtype 'fp8'.*bfloat16"):
        from_pretrained(tmp_path / "hf", dtype="fp8")
    next((tmp_path / "hf").glob("model-00002-*")).unlink()
    with pytest.raises(UserError, match="shard 'model-00002-of-.*missing"):
        from_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="xLSTMLargeConfig: unknown field.*'hidden'.*known fields"):
        xLSTMLargeConfig.from_dict({"hidden": 8})
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="'bert'"):
        from_pretrained(tmp_path / "bert")
    hf_model(hidden_size=48, num_heads=2).save_pretrained(tmp_path / "wrong")
    cfg = json.loads((tmp_path / "wrong" / "config.json").read_text())
    (tmp_path / "wrong" / "config.json").write_text(json.dumps(dict(cfg, hidden_size=32, embedding_dim=32)))
    with pytest.raises(UserError, match="shape") as e:
        from_pretrained(tmp_path / "wrong")
    assert "\n" not in str(e.value)


def test_soft_capped_loss_and_gradients_equal_the_plain_form():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    w = (torch.randn(V, 16, generator=g) * 2).requires_grad_()
    labels = torch.randint(0, V, (3, 7), generator=g)
    labels[0, :3] = -100
    loss = soft_capped_cross_entropy(h, w, labels, cap=5.0, chunk_rows=4)  # 6 chunks, recomputed in backward
    ref = F.cross_entropy(5.0 * torch.tanh(F.linear(h, w).flatten(0, 1) / 5.0), labels.flatten(), ignore_index=-100)
    assert abs(loss.item() - ref.item()) <= 1e-6 * abs(ref.item())
    grads = torch.autograd.grad(loss, (h, w))
    for a, b in zip(grads, torch.autograd.grad(ref, (h, w))):
        assert rel_err(a, b) <= 1e-6


# transformers' problems that we do not have --------------------------------------------------------------

def test_prompts_of_different_lengths_in_one_batch(tmp_path):
    """transformers ignores attention_mask: a left-padded batch feeds the pads into the recurrent state.
    Ours takes rows of any lengths: each row generates what it generates alone, which is what transformers
    generates for it alone (test_greedy_generation_equals_transformers)."""
    hf_model(hidden_size=128, num_heads=4).save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    rows = [r[:n] for r, n in zip(ids_of(3, 17, seed=5).tolist(), (3, 17, 9))]
    batched = generate(ours, rows, max_new_tokens=6, temperature=0)
    assert batched == [generate(ours, [r], max_new_tokens=6, temperature=0)[0] for r in rows]


def test_generation_when_hidden_times_qk_factor_is_not_a_multiple_of_64(tmp_path):
    """transformers' cache rounds qk_dim up to a multiple of 64 and then fails on any model where
    hidden_size * qk_dim_factor is not one (here 48 * 0.5 = 24). Ours generates: the same tokens as greedy
    decoding that recomputes transformers' logits over the whole sequence at every step."""
    theirs = hf_model(hidden_size=48, num_heads=2, eos_token_id=None)
    theirs.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    ids = ids_of(2, 10)
    want = greedy_by_recomputing(lambda seq: hf_logits(theirs, seq), ids, 6)
    assert generate(ours, ids.tolist(), max_new_tokens=6, temperature=0) == want


def test_recurrent_state_is_float32_in_a_bfloat16_model(tmp_path):
    """transformers keeps the cache in the model's dtype (bfloat16 for xLSTM-7B) although
    inference_state_dtype says float32. Ours is float32 whatever the weights, and prefill-then-steps
    continues the one-pass logits."""
    hf_model(**CONFIGS[0][1]).save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    ids = ids_of(2, 24)
    with torch.no_grad():
        whole = ours(ids)
        logits, state = ours(ids[:, :16], return_state=True)
        assert all(t.dtype == torch.float32 for s in state for t in s)
        steps = [logits[:, -1]]
        for t in range(16, 24):
            logits, state = ours(ids[:, t:t + 1], state=state, return_state=True)
            steps.append(logits[:, -1])
        assert all(t.dtype == torch.float32 for s in state for t in s)
    assert rel_err(torch.stack(steps[:-1], 1), whole[:, 15:23]) <= 2e-2


def test_training_from_a_config_with_return_last_states_false(tmp_path):
    """transformers' xLSTM cannot train with mode="train" and return_last_states=False (its layer unpacks a
    state that is not returned). Ours ignores those kernel settings: the loss equals the cross-entropy of
    transformers' logits, gradients flow (the same with activation checkpointing), and a step lowers it."""
    theirs = hf_model(**CONFIGS[0][1])
    theirs.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, mode="train", return_last_states=False)))
    ours = from_pretrained(tmp_path).train()
    ids = ids_of(2, 33)
    x, y = ids[:, :-1], ids[:, 1:]
    ref = F.cross_entropy(hf_logits(theirs, x).flatten(0, 1), y.flatten())
    out = ours(x, labels=y)
    assert abs(out.loss.item() - ref.item()) <= 1e-5 * ref.item() and out.num_tokens.item() == y.numel()
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    ours.zero_grad()
    ours.set_activation_checkpointing(True)(x, labels=y).loss.backward()
    assert all(rel_err(p.grad, grads[n]) <= 1e-5 for n, p in ours.named_parameters())
    opt = torch.optim.AdamW(ours.optim_groups(0.1), lr=1e-3)
    opt.step()
    assert ours(x, labels=y).loss.item() < out.loss.item()


def test_weight_mode_fused_initializes():
    """transformers fails to build a new weight_mode="fused" model (its initialization writes the 2 x NH gate
    biases with NH-sized tensors). Ours initializes it like "single": input-gate bias -10, forget-gate bias
    linspace(3, 6) over heads, gate weights zero."""
    model = xLSTMLargeLM(xLSTMLargeConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_heads=4,
                                          weight_mode="fused"))
    gate = model.backbone.blocks[1].mlstm_layer.ifgate_preact
    assert torch.equal(gate.bias[:4], torch.full((4,), -10.0))
    assert torch.allclose(gate.bias[4:], torch.linspace(3.0, 6.0, 4)) and not gate.weight.any()
    assert torch.isfinite(model(ids_of(1, 5))).all()


def test_exports():
    assert openxlstm.from_pretrained is from_pretrained
    assert openxlstm.models.ARCHS["xlstm-large"] == (xLSTMLargeConfig, xLSTMLargeLM)


# the command line: generate / eval --model, train --init -------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random transformers xLSTMForCausalLM saved by its own save_pretrained (no tokenizer.json)."""
    path = tmp_path_factory.mktemp("hf") / "model"
    hf_model(hidden_size=64, num_heads=4, eos_token_id=None).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def id_file(tmp_path_factory):
    """A token file of ids below the model's vocabulary V."""
    path = tmp_path_factory.mktemp("ids") / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, V, size=3000).astype(np.uint16))
    return path


def test_cli_generate_model_equals_generate(hf_dir, capsys):
    """generate --model DIR (a model without tokenizer.json reads and prints ids) gives what openxlstm.generate
    gives on from_pretrained(DIR); --dtype bfloat16 loads in bfloat16."""
    prompt = [5, 17, 3, 60]
    want = generate(from_pretrained(hf_dir), [prompt], max_new_tokens=6, temperature=0)[0]
    assert main(["generate", "--model", str(hf_dir), "--prompt", " ".join(map(str, prompt)), "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == prompt + want
    assert main(["generate", "--model", str(hf_dir), "--prompt", "5 17", "--max-new-tokens", "2", "--dtype",
                 "bfloat16"]) == 0
    assert len(capsys.readouterr().out.split()) == 4
    assert main(["generate", "--model", str(hf_dir), "--prompt", "hello"]) == 2
    one_line_error(capsys, "has no tokenizer.json")


def test_cli_eval_model(hf_dir, id_file, capsys):
    assert main(["eval", "--model", str(hf_dir), "--data", str(id_file), "--context", "16", "--max-tokens", "256"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"xlstm-large checkpoint {hf_dir} (transformers format)")
    assert out[-2].split()[:2] == ["context", "tokens"] and out[-1].split()[0] == "16" and len(out) == 3
    assert main(["eval", "--model", str(hf_dir), "--context", "16"]) == 2  # default data: the built-in text corpus
    line = one_line_error(capsys, "has no tokenizer.json")
    assert "trained on a token file" not in line


def test_cli_model_or_checkpoint_exactly_one(hf_dir, capsys):
    assert main(["generate", "--model", str(hf_dir), "--checkpoint", str(hf_dir), "--prompt", "1"]) == 2
    one_line_error(capsys, "not allowed with argument")
    assert main(["eval", "--context", "16"]) == 2
    one_line_error(capsys, "one of the arguments --checkpoint --model is required")


def init_args(init, data, out, *extra):
    return ["train", "--init", str(init), "--data", str(data), "--out", str(out), "--max-steps", "2", "--seq-len", "8",
            "--batch-size", "2", "--eval-every", "100", "--eval-tokens", "64", "--log-every", "1", "--warmup", "1",
            "--samples", "0", "--no-progress", *extra]


def test_cli_train_init_starts_from_the_weights_and_resumes(hf_dir, id_file, tmp_path, capsys):
    """train --init DIR: the first logged loss is the loaded model's loss on step 0's batch (training starts
    from DIR's weights, not a fresh model); the run records arch, model and init, and --resume continues it."""
    from openxlstm.data import BatchSampler, load_data

    out = tmp_path / "run"
    assert main(init_args(hf_dir, id_file, out)) == 0
    with open(out / "metrics.csv") as f:
        first = float(next(csv.DictReader(f))["train_loss"])
    data = load_data(str(id_file), None, 0.05)
    x, y = BatchSampler(len(data.train), 8, 2, seed=0).batch(data.train, 0)[:2]
    with torch.no_grad():
        want = from_pretrained(hf_dir)(x, labels=y).loss.item()
    assert abs(first - want) <= 1e-5
    meta = json.loads((out / "ckpt-000002" / "config.json").read_text())
    assert meta["arch"] == "xlstm-large" and meta["train"]["init"] == str(hf_dir)
    assert meta["model"]["hidden_size"] == 64 and meta["train"]["arch"] == "xlstm-large"
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "3", "--no-progress"]) == 0
    assert (out / "latest").read_text().strip() == "ckpt-000003"
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "4", "--init", str(tmp_path)]) == 2
    one_line_error(capsys, "--init differs from the checkpoint's")


def test_cli_train_init_errors(hf_dir, id_file, tmp_path, capsys):
    cases = [
        (init_args(hf_dir, id_file, tmp_path / "a", "--arch", "xlstm"), "leave out --arch"),
        (init_args(hf_dir, id_file, tmp_path / "b", "--preset", "125m"), "leave out --preset"),
        (init_args(tmp_path / "missing", id_file, tmp_path / "c"), "does not exist"),
        (init_args(id_file, id_file, tmp_path / "d"), "is a file"),
        (init_args(tmp_path, id_file, tmp_path / "d2"), "--init: " + repr(str(tmp_path)) + " is not a checkpoint"),
        (init_args(hf_dir, id_file, tmp_path / "e", "--tokenizer", "byte"),  # 257 byte ids > V
         f"the data's vocabulary (257) is larger than the vocabulary of the --init model ({V})"),
    ]
    (tmp_path / "text.txt").write_text("some text " * 200)
    cases.append((init_args(hf_dir, tmp_path / "text.txt", tmp_path / "f"), "has no tokenizer.json"))
    for args, needle in cases:
        assert main(args) == 2, args
        one_line_error(capsys, needle)
    assert not (tmp_path / "d2").exists()  # a bad --init is refused before the run directory is made
    big = tmp_path / "big.npy"
    np.save(big, np.arange(200, dtype=np.uint16).repeat(10))
    assert main(init_args(hf_dir, big, tmp_path / "g")) == 2
    one_line_error(capsys, f"(200) is larger than the vocabulary of the --init model ({V})")


def test_cli_train_xlstm_large_from_scratch_then_init_from_the_run(tmp_path, capsys):
    """--arch xlstm-large trains from scratch like the other architectures (here on packed byte documents);
    --init of that run takes its architecture, model config, weights and byte tokenizer."""
    from helpers import write_corpus

    corpus = write_corpus(tmp_path / "corpus", n_docs=4)
    small = json.dumps({"hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2})
    assert main(["train", "--arch", "xlstm-large", "--config", small, "--data", str(corpus), "--out",
                 str(tmp_path / "a"), "--max-steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-every", "100", "--eval-tokens",
                 "64", "--samples", "0", "--no-progress"]) == 0
    assert main(init_args(tmp_path / "a", corpus, tmp_path / "b", "--samples", "1", "--sample-tokens", "4")) == 0
    a, b = (json.loads((tmp_path / r / "ckpt-000002" / "config.json").read_text()) for r in "ab")
    assert b["arch"] == a["arch"] == "xlstm-large" and b["model"] == a["model"]
    assert b["tokenizer"] == a["tokenizer"] and a["tokenizer"]["type"] == "byte"
    assert "--- sample" in capsys.readouterr().out
    # the run has a tokenizer: another --tokenizer would feed its embeddings foreign ids
    assert main(init_args(tmp_path / "a", corpus, tmp_path / "c", "--tokenizer", "bpe:300")) == 2
    one_line_error(capsys, "--tokenizer with --init")
    # --init inside --out: refused before --overwrite could delete the model it starts from
    before = sorted(p.name for p in (tmp_path / "a").iterdir())
    for init in (tmp_path / "a", tmp_path / "a" / "ckpt-000002"):
        assert main(init_args(init, corpus, tmp_path / "a", "--overwrite")) == 2
        one_line_error(capsys, "lies in --out")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before


def test_cli_model_with_tokenizer_json(hf_dir, tmp_path, capsys):
    """With a tokenizer.json in the directory: generate --model reads and writes text, and train --init uses
    that tokenizer when --tokenizer is not given (the run saves it; --resume reads the run's copy)."""
    import shutil

    import tokenizers

    shutil.copytree(hf_dir, tmp_path / "m")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(V - 7)}, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "m" / "tokenizer.json"))
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "w5 w7", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    want = from_pretrained(tmp_path / "m").generate("w5 w7", max_new_tokens=3, temperature=0)
    assert capsys.readouterr().out == "w5 w7" + want + "\n"
    (tmp_path / "words.txt").write_text(" ".join(f"w{i % 80}" for i in range(600)))
    assert main(init_args(tmp_path / "m", tmp_path / "words.txt", tmp_path / "run")) == 0
    meta = json.loads((tmp_path / "run" / "ckpt-000002" / "config.json").read_text())
    assert meta["tokenizer"]["type"] == "hf" and (tmp_path / "run" / "ckpt-000002" / "tokenizer.json").is_file()
    assert main(["train", "--resume", "--out", str(tmp_path / "run"), "--max-steps", "3", "--no-progress"]) == 0
