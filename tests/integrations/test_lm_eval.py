"""The lm-evaluation-harness model "openxlstm" (openxlstm.integrations.lm_eval) against plain forward passes.

Three tasks are defined here as YAML files with local JSON data (nothing is downloaded): multiple choice
(loglikelihood), perplexity (loglikelihood_rolling) and generation with two stop strings (generate_until).
Every log-likelihood lm-eval reports must equal the sum of log-probs of the same tokens from a forward pass
of that request alone, in float64; every generation must equal a greedy loop of full forward passes; and the
metrics (accuracy, bits per byte) must be those of the known answers under these scores. ``max_length=16``
makes long inputs run in pieces with the state carried (recurrent models) or windows (the Transformer).
"""

import argparse
import json
import math
import sys

import pytest
import torch

import openxlstm
from helpers import tiny_args
from openxlstm.cli import main
from openxlstm.data import ByteTokenizer, train_bpe
from openxlstm.errors import UserError
from openxlstm.models import build_model

MC = [
    {"question": "The quick brown fox", "choices": [" jumps", " sleeps", " runs far away"], "label": 0},
    {"question": "def function_1_2(x):\n   ", "choices": [" return x", " pass", " print(x)"], "label": 0},
    {"question": "Hello", "choices": [" world", " there"], "label": 1},
    {"question": "The lazy dog", "choices": [" 1", " 2", " 3", " 4"], "label": 3},
]
PPL = [{"text": "The quick brown fox jumps over the lazy dog 3 times.\n" * 2}, {"text": "x = 1"},
       {"text": "def function_4_5(x):\n    return x * 5 + 4  # the answer\n"}]
GEN = [{"prompt": "The quick brown", "answer": " fox"}, {"prompt": "def f(x):\n    return", "answer": " x"},
       {"prompt": "a", "answer": "b"}]
GEN_UNTIL = ["\n", " t"]

TASKS = {
    "tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                "doc_to_target": "label", "metric_list": [{"metric": "acc"}]},
    "tiny_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                 "metric_list": [{"metric": "bits_per_byte"}]},
    "tiny_gen": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
                 "target_delimiter": "", "metric_list": [{"metric": "exact_match"}],
                 "generation_kwargs": {"until": GEN_UNTIL, "max_gen_toks": 6, "do_sample": False}},
}
DATA = {"tiny_mc": MC, "tiny_ppl": PPL, "tiny_gen": GEN}


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No network: datasets and the Hub read only local files while these tests run."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def harness(offline):
    import lm_eval
    import openxlstm.integrations.lm_eval as integration

    return lm_eval, integration


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder of task YAML files whose datasets are JSON files beside them (datasets' cache in it too)."""
    root = tmp_path_factory.mktemp("tasks")
    for name, spec in TASKS.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in DATA[name]))
        cfg = {"task": name, "dataset_path": "json", "test_split": "test",
               "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(root / "cache")}, **spec}
        (root / f"{name}.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    return root


def evaluate(harness, tasks, model_args, names=tuple(TASKS)):
    from lm_eval.tasks import TaskManager

    lm_eval, _ = harness
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    return lm_eval.simple_evaluate(model="openxlstm", model_args=model_args, tasks=list(names),
                                   task_manager=manager, log_samples=True, bootstrap_iters=0)


# the oracle: one plain forward pass per request ------------------------------------------------------------
def encode(tok, text, special=True):
    inner = getattr(tok, "tokenizer", None)
    if not special and inner is not None:
        return list(inner.encode(text, add_special_tokens=False).ids)
    return [int(t) for t in tok.encode(text)]


def split(tok, context, continuation, prefix):
    """lm-eval's causal split: the whole string encoded, cut after the context's own token count (trailing
    spaces of the context moved to the continuation); an empty context is the prefix token."""
    if not context:
        return [prefix], encode(tok, continuation, special=False)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = encode(tok, context)
    return ctx, encode(tok, context + continuation)[len(ctx):]


@torch.no_grad()
def score(model, tokens, n):
    """(sum of log-probs of the last n tokens given the ones before, each of them the argmax), one pass."""
    logits = model(torch.tensor([tokens[:-1]]))[0, -n:].double()  # (n, V)
    logp, target = torch.log_softmax(logits, dim=-1), torch.tensor(tokens[-n:])
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(dim=-1) == target).all())


def rolling(model, tokens, prefix, window=None):
    """A document's log-likelihood: one pass over [prefix] + tokens, or lm-eval's windows of ``window``."""
    from lm_eval import utils

    if window is None:
        return score(model, [prefix] + tokens, len(tokens))[0]
    pairs = map(utils.make_disjoint_window, utils.get_rolling_token_windows(tokens, prefix, window, 1))
    return sum(score(model, ctx + pred, len(pred))[0] for ctx, pred in pairs)


@torch.no_grad()
def greedy(model, tok, prompt, max_new, until):
    """Greedy decoding by full forward passes, cut at the end-of-document token and the first stop string."""
    ids, new = list(prompt), []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(nxt)
        new.append(nxt)
        if nxt == tok.eod_id or any(s in tok.decode(new) for s in until):
            break
    if tok.eod_id in new:
        new = new[:new.index(tok.eod_id)]
    text = tok.decode(new)
    for s in until:
        text = text.split(s)[0]
    return text


def check_results(out, model, tok, prefix, window=None, rel=1e-9):
    """Every request of the three tasks against the oracle, and the metrics from the known answers."""
    samples = out["samples"]
    accs = []
    for s in samples["tiny_mc"]:
        scores = []
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            ctx, cont = split(tok, context, continuation, prefix)
            want = score(model, ctx + cont, len(cont))
            assert resp[0][0] == pytest.approx(want[0], rel=rel) and resp[0][1] == want[1]
            scores.append(want[0])
        accs.append(float(max(range(len(scores)), key=scores.__getitem__) == s["target"]))
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(accs) / len(accs))
    total_ll = total_bytes = 0.0
    for s in samples["tiny_ppl"]:
        text = s["doc"]["text"]
        want = rolling(model, encode(tok, text), prefix, window)
        assert s["resps"][0][0] == pytest.approx(want, rel=rel)
        total_ll, total_bytes = total_ll + want, total_bytes + len(text.encode())
    assert out["results"]["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(-total_ll / total_bytes / math.log(2))
    matches = []
    for s in samples["tiny_gen"]:
        prompt = encode(tok, s["doc"]["prompt"])
        text = greedy(model, tok, prompt[-(window - 6):] if window else prompt, 6, GEN_UNTIL)
        assert s["resps"][0][0] == text
        matches.append(float(text == s["doc"]["answer"]))
    assert out["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(sum(matches) / len(matches))


# models ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xlstm_run(corpus, tmp_path_factory):
    """A 2-step ``openxlstm train`` run: an xLSTM[1:1] with the byte tokenizer (end-of-document id 256)."""
    out = tmp_path_factory.mktemp("lm_eval_run") / "xlstm"
    assert main(tiny_args("xlstm", corpus, out, steps=2)) == 0
    return out


@pytest.fixture(scope="module")
def large_dir(corpus, tmp_path_factory):
    """A tiny xLSTM-7B-architecture model saved in transformers' layout with a BPE tokenizer.json."""
    torch.manual_seed(0)
    config = openxlstm.xLSTMLargeConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_heads=2,
                                        qk_dim_factor=0.5, v_dim_factor=1.0, ffn_round_up_to_multiple_of=16)
    model = openxlstm.xLSTMLargeLM(config)
    model.tokenizer = train_bpe((p.read_text() for p in sorted(corpus.iterdir())), 300)
    return model.save_pretrained(tmp_path_factory.mktemp("lm_eval_large") / "large")


def test_xlstm_run_through_simple_evaluate(harness, tasks, xlstm_run):
    """model="openxlstm" with model_args from a run directory: all three request types equal the oracle."""
    out = evaluate(harness, tasks, f"pretrained={xlstm_run},dtype=float64,batch_size=3,max_length=16")
    model = openxlstm.from_pretrained(xlstm_run, dtype="float64")
    assert isinstance(model.tokenizer, ByteTokenizer) and model.tokenizer.eod_id == 256
    check_results(out, model, model.tokenizer, prefix=256)
    assert out["config"]["model_num_parameters"] == model.num_params()


def test_xlstm_large_with_a_bpe_tokenizer(harness, tasks, large_dir):
    """xLSTM-7B's architecture from a transformers directory; BPE contexts split as lm-eval's hf model does;
    the prefix token is the tokenizer's <|endoftext|>."""
    out = evaluate(harness, tasks, f"pretrained={large_dir},dtype=float64,batch_size=2,max_length=16")
    model = openxlstm.from_pretrained(large_dir, dtype="float64")
    assert model.tokenizer.eod_id == model.tokenizer.tokenizer.token_to_id("<|endoftext|>")
    check_results(out, model, model.tokenizer, prefix=model.tokenizer.eod_id)


def test_transformer_windows_and_truncation(harness, tasks):
    """The Transformer's KV cache grows: rolling windows of max_length and contexts cut from the left, as hf."""
    _, integration = harness
    torch.manual_seed(1)
    cfg = {"vocab_size": 257, "embedding_dim": 32, "num_layers": 2, "num_heads": 2}
    model = build_model("transformer", cfg).double()
    model.tokenizer = ByteTokenizer()
    lm = integration.OpenXLSTMLM(pretrained=model, batch_size=4, max_length=16)
    from lm_eval.tasks import TaskManager

    lm_eval, _ = harness
    out = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    assert lm.grows and integration.OpenXLSTMLM(pretrained=model).max_length == model.config.context_length
    check_results(out, _Truncated(model, 16), model.tokenizer, prefix=256, window=16)


class _Truncated(torch.nn.Module):
    """The model reading at most the last ``keep`` + 1 tokens of a request (lm-eval's left truncation)."""

    def __init__(self, model, keep):
        super().__init__()
        self.model, self.keep = model, keep

    def forward(self, ids):
        return self.model(ids[:, -self.keep:])


def requests(tok):
    """Loglikelihood requests of many lengths: shared contexts, one-token continuations, an empty context,
    inputs longer than max_length, identical duplicates."""
    from lm_eval.api.instance import Instance

    pairs = [("The cat", " sat"), ("The cat", " s"), ("The cat", " r"), ("The cat", " ran away quickly"),
             ("", "abc"), ("Hello", " world"), ("a" * 40, "b" * 7), ("x", "y"), ("The cat", " sat"),
             ("One two three four five six", " seven eight nine"), ("z", " " * 3 + "q"),
             ("ab", " c"), ("ab", " de"), ("ab", "c")]
    return [Instance("loglikelihood", {}, pair, j) for j, pair in enumerate(pairs)]


SMALL = {"xlstm": {"embedding_dim": 32, "num_blocks": 2, "slstm_at": [1], "mlstm_num_heads": 2, "slstm_num_heads": 2},
         "lstm": {"embedding_dim": 32, "num_layers": 2}}


@pytest.fixture(scope="module", params=["xlstm", "lstm"])
def lone(request, harness):
    """(a float64 model, the requests, what a forward pass of each request alone gives)."""
    torch.manual_seed(2)
    model = build_model(request.param, {"vocab_size": 257, **SMALL[request.param]}).double().eval()
    model.tokenizer = ByteTokenizer()
    reqs = requests(model.tokenizer)
    pairs = [split(model.tokenizer, *r.args, prefix=256) for r in reqs]
    return model, reqs, pairs, [score(model, ctx + cont, len(cont)) for ctx, cont in pairs]


@pytest.mark.parametrize("batch_size, share", [(1, True), (3, True), (16, True), (1, False), (3, False), (16, False)])
def test_packed_batches_equal_lone_requests(harness, lone, batch_size, share):
    """Requests packed into rows (each its own document), pieces with the state carried past max_length,
    identical inputs computed once, and contexts run once with their state carried into each continuation
    (a 2-token one shorter than the convolution window included) give each request what it gets alone."""
    _, integration = harness
    model, reqs, pairs, want = lone
    lm = integration.OpenXLSTMLM(pretrained=model, batch_size=batch_size, max_length=16, share_context=share)
    assert len(lm._shared_contexts([(tuple(c + k), len(k)) for c, k in pairs])[0]) == 2 * share
    for (logprob, is_greedy), (want_logprob, want_greedy) in zip(lm.loglikelihood(reqs, disable_tqdm=True), want):
        assert logprob == pytest.approx(want_logprob, rel=1e-10) and is_greedy == want_greedy


def test_float32_batches_agree_with_lone_requests(harness):
    """In float32 the packed, pieced and lone computations differ only by rounding."""
    _, integration = harness
    torch.manual_seed(3)
    model = build_model("xlstm", {"vocab_size": 257, "embedding_dim": 32, "num_blocks": 2, "slstm_at": [1],
                                  "mlstm_num_heads": 2, "slstm_num_heads": 2}).eval()
    model.tokenizer = ByteTokenizer()
    lm = integration.OpenXLSTMLM(pretrained=model, batch_size=4, max_length=16)
    reqs = requests(model.tokenizer)
    for req, (logprob, _) in zip(reqs, lm.loglikelihood(reqs, disable_tqdm=True)):
        ctx, cont = split(model.tokenizer, *req.args, prefix=256)
        assert logprob == pytest.approx(score(model, ctx + cont, len(cont))[0], rel=1e-5)


def test_generation_cuts_at_the_first_of_several_stops(harness):
    """generate_until stops a row at the list's first stop string and cuts the text at whichever stop comes
    first, and at an end-of-document token."""
    from lm_eval.api.instance import Instance

    _, integration = harness
    torch.manual_seed(4)
    model = build_model("xlstm", {"vocab_size": 257, **SMALL["xlstm"]}).double().eval()
    tok = model.tokenizer = ByteTokenizer()
    lm = integration.OpenXLSTMLM(pretrained=model, batch_size=2)
    reqs, wants = [], []
    for j, prompt in enumerate(["The quick", "ab", "def f(x):"]):
        free = greedy(model, tok, encode(tok, prompt), 12, [])
        ascii_chars = [c for c in dict.fromkeys(free[1:]) if ord(c) < 128]
        until = ascii_chars[1::-1]  # the later of two characters first: generation stops at it, the text is cut earlier
        want = greedy(model, tok, encode(tok, prompt), 12, until)
        assert len(want) < len(free)
        reqs.append(Instance("generate_until", {}, (prompt, {"until": until, "max_gen_toks": 12}), j))
        wants.append(want)
    assert lm.generate_until(reqs, disable_tqdm=True) == wants
    assert lm._cut(list(b"ab") + [256] + list(b"cd"), ["z"]) == "ab" and lm._cut(list(b"abcd"), ["z", "c"]) == "ab"


def test_model_argument_errors_are_user_errors(harness, xlstm_run, tmp_path):
    _, integration = harness
    cases = [({"pretrained": str(tmp_path / "missing")}, "does not exist"),
             ({"pretrained": str(xlstm_run), "batch_size": "auto"}, "automatic batch sizes"),
             ({"pretrained": str(xlstm_run), "dtype": "int8"}, "dtype 'int8'"),
             ({"pretrained": str(xlstm_run), "prefix_token_id": 999}, "prefix_token_id"),
             ({"pretrained": str(xlstm_run), "tokenizer": str(tmp_path / "none.json")}, "not a file")]
    for kwargs, needle in cases:
        with pytest.raises(UserError, match=needle):
            integration.OpenXLSTMLM(**kwargs)
    lm = integration.OpenXLSTMLM(pretrained=str(xlstm_run))
    from lm_eval.api.instance import Instance

    with pytest.raises(UserError, match="not supported"):
        lm.generate_until([Instance("generate_until", {}, ("a", {"until": ["."], "num_beams": 4}), 0)])
    old_run = build_model("lstm", {"vocab_size": 256, "embedding_dim": 16, "num_layers": 1})
    old_run.tokenizer = ByteTokenizer(eod=False)  # no end-of-document token to condition a document on
    with pytest.raises(UserError, match="pass prefix_token_id=ID"):
        integration.OpenXLSTMLM(pretrained=old_run).loglikelihood_rolling(
            [Instance("loglikelihood_rolling", {}, ("abc",), 0)], disable_tqdm=True)
    old_run.tokenizer = None
    with pytest.raises(UserError, match="has no tokenizer"):
        integration.OpenXLSTMLM(pretrained=old_run)


# the command line ------------------------------------------------------------------------------------------
def eval_parser():
    """The options ``openxlstm eval`` gives the harness: its own model options plus add_harness_arguments."""
    from openxlstm.integrations.lm_eval_cli import add_harness_arguments

    p = argparse.ArgumentParser()
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint")
    g.add_argument("--model")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    add_harness_arguments(p)
    return p


def test_cli_runs_the_harness(harness, tasks, xlstm_run, tmp_path, capsys):
    from openxlstm.integrations.lm_eval_cli import run_harness

    out = tmp_path / "results.json"
    args = ["--checkpoint", str(xlstm_run), "--tasks", "tiny_mc,tiny_ppl", "--include_path", str(tasks),
            "--limit", "2", "--batch-size", "2", "--output-path", str(out), "--dtype", "float32",
            "--model-args", "max_length=16"]
    assert run_harness(eval_parser().parse_args(args)) == 0
    table = capsys.readouterr().out
    assert "tiny_mc" in table and "bits_per_byte" in table
    saved = json.loads(out.read_text())
    assert saved["results"]["tiny_ppl"]["sample_len"] == 2 and "samples" not in saved
    model = openxlstm.from_pretrained(xlstm_run)
    text = PPL[0]["text"] + PPL[1]["text"]
    want = -sum(rolling(model, encode(model.tokenizer, d["text"]), 256) for d in PPL[:2]) / len(text.encode())
    assert saved["results"]["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(want / math.log(2), rel=1e-5)
    with pytest.raises(UserError, match="exists; add --overwrite"):
        run_harness(eval_parser().parse_args(args))


def test_cli_mistakes_are_one_line(harness, tasks, xlstm_run, tmp_path, monkeypatch):
    from openxlstm.integrations.lm_eval_cli import run_harness

    base = ["--model", str(xlstm_run), "--include-path", str(tasks)]
    cases = [(["--tasks", " , "], "name at least one task"),
             (["--tasks", "tiny_mc", "--include-path", str(tmp_path / "none")], "is not a folder"),
             (["--tasks", "tiny_mc", "--model-args", "batch_size=4"], "set by"),
             (["--tasks", "tiny_mc", "--model-args", "colour=red"], "allowed: tokenizer"),
             (["--tasks", "tiny_mc", "--log-samples"], "--output-path"),
             (["--tasks", "tiny_mc", "--output-path", str(tmp_path)], "is a folder")]
    for extra, needle in cases:
        with pytest.raises(UserError, match=needle) as e:
            run_harness(eval_parser().parse_args(base + extra))
        assert "\n" not in str(e.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    cfg = {"task": "tiny_broken", "dataset_path": "json", "test_split": "test", **TASKS["tiny_mc"],
           "dataset_kwargs": {"data_files": {"test": str(tmp_path / "missing.jsonl")}, "cache_dir": str(tmp_path)}}
    (broken / "tiny_broken.yaml").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="cannot load a task's data: Unable to find") as e:
        run_harness(eval_parser().parse_args(["--model", str(xlstm_run), "--tasks", "tiny_broken",
                                              "--include-path", str(broken)]))
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(UserError, match=r"pip install 'openxlstm\[eval\]'"):
        run_harness(eval_parser().parse_args(base + ["--tasks", "tiny_mc"]))


def test_unknown_task(harness, tasks, xlstm_run):
    from openxlstm.integrations.lm_eval_cli import run_harness

    with pytest.raises(UserError, match=r"unknown task 'tiny_mcq' \(did you mean tiny_mc"):
        run_harness(eval_parser().parse_args(["--model", str(xlstm_run), "--tasks", "tiny_mcq",
                                              "--include-path", str(tasks)]))


def test_import_openxlstm_does_not_import_lm_eval():
    import subprocess

    code = "import sys, openxlstm, openxlstm.integrations; print('lm_eval' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
