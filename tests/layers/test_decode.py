"""The decode step: the sLSTM single-token path equals the sequence path, generate reads nothing on the host
per token, and a compiled step (fullgraph, static shapes) gives the tokens of the eager one."""

import sys

import pytest
import torch
from conftest import rel_err
from helpers import TINY, tiny_model
from torch._dynamo.backends.registry import lookup_backend
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import openxlstm.layers.slstm as slstm_layer_module
from openxlstm import xLSTMConfig
from openxlstm.data import ByteTokenizer
from openxlstm.generation import _decode_step, _run_step, generate
from openxlstm.layers.slstm import sLSTMLayer
from openxlstm.models import build_model
from openxlstm.ops.slstm import slstm
from openxlstm.ops.slstm.recurrent import slstm_decode

PROMPTS = [[72, 101, 108, 108, 111], [100, 101], [1, 2, 3, 4, 5, 6, 7, 8]]


def tiny(arch, seed=0):
    return tiny_model(arch, seed, vocab_size=256)


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("with_state", [False, True])
def test_slstm_decode_steps_equal_the_sequence(forget_gate, with_state):
    g = torch.Generator().manual_seed(1)
    B, S, NH, d = 2, 7, 3, 4
    E = NH * d
    x = torch.randn(B, S, 4 * E, generator=g, dtype=torch.float64)
    R = torch.randn(NH, d, 4, d, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(4 * E, generator=g, dtype=torch.float64)
    state = None
    if with_state:
        h, c, m = (torch.randn(B, E, generator=g, dtype=torch.float64) for _ in range(3))
        state = (h, c, torch.rand(B, E, generator=g, dtype=torch.float64) + 0.5, m)
    for backend in ("recurrent", "fused"):
        h_seq, final = slstm(x, R, b, state, forget_gate=forget_gate, backend=backend, return_state=True)
        st, hs = state, []
        for t in range(S):
            h, st = slstm_decode(x[:, t], R, b, st, forget_gate=forget_gate)
            hs.append(h)
        assert rel_err(torch.stack(hs, 1), h_seq) <= 1e-12, backend
        for name, got, want in zip("hcnm", st, final):
            assert rel_err(got, want) <= 1e-12, (backend, name)


def test_slstm_layer_decodes_without_the_sequence_op(monkeypatch):
    """``step`` does not call the sequence op and continues the state of a prefill exactly: prefill + steps
    equal one pass over the sequence (float64)."""
    cfg = xLSTMConfig(vocab_size=16, embedding_dim=16, num_blocks=2, slstm_at=[1], slstm_num_heads=2,
                      context_length=32)
    torch.manual_seed(0)
    layer = sLSTMLayer(cfg, block_idx=1).double().eval()
    with torch.no_grad():
        layer.recurrent.normal_(std=0.3)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        y_full, final = layer(x)
        _, state = layer(x[:, :4])

        def no_sequence_op(*args, **kwargs):
            raise AssertionError("the sLSTM sequence op ran for a single decode token")

        monkeypatch.setattr(slstm_layer_module, "slstm", no_sequence_op)
        ys = []
        for t in range(4, 9):
            y, state = layer.step(x[:, t:t + 1], state)
            ys.append(y)
    assert rel_err(torch.cat(ys, 1), y_full[:, 4:]) <= 1e-12
    for name in ("conv", "h", "c", "n", "m"):
        assert rel_err(getattr(state, name), getattr(final, name)) <= 1e-12, name


class HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's value into Python or build a tensor from Python data: each is a
    device sync on a GPU."""

    NAMES = {"item", "__int__", "__bool__", "__float__", "__index__", "tolist", "cpu", "numpy", "nonzero"}

    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES or (func is torch.tensor and args and not isinstance(args[0], torch.Tensor)):
            frame = sys._getframe(1)
            self.sites.append(f"{name} @ {frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}")
        return func(*args, **(kwargs or {}))


def host_reads(fn):
    with HostReads() as counter:
        fn()
    return counter.sites


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_k=40, top_p=0.9, seed=1)])
def test_generate_reads_the_host_once_per_call_not_per_token(sampling):
    model = tiny("xlstm")
    few = host_reads(lambda: generate(model, PROMPTS, max_new_tokens=1, **sampling))
    many = host_reads(lambda: generate(model, PROMPTS, max_new_tokens=7, **sampling))
    assert many == few, many  # nothing per token
    assert len(many) <= 2, many  # the prompts sent once, the tokens read once


def test_generate_with_stop_or_streaming_reads_the_host_once_per_token():
    model, tok = tiny("xlstm"), ByteTokenizer()
    for kw in (dict(stop="\x00\x00\x00"), dict(on_text=lambda b, t: None)):
        few = host_reads(lambda: generate(model, ["ab", "cde"], tok, max_new_tokens=1, temperature=0, **kw))
        many = host_reads(lambda: generate(model, ["ab", "cde"], tok, max_new_tokens=7, temperature=0, **kw))
        assert len(many) - len(few) == 6, many


def counting_backend(calls):
    """A torch.compile backend: aot_eager (the captured graph through AOTAutograd's functionalization and
    decompositions, run by eager kernels) that also counts the runs of the compiled graph."""

    def backend(gm, example_inputs):
        compiled = lookup_backend("aot_eager")(gm, example_inputs)

        def run(*args):
            calls.append(1)
            return compiled(*args)

        return run

    return backend


def test_compiled_step_gives_the_eager_tokens():
    model = tiny("xlstm")  # mLSTM and sLSTM blocks
    calls = []
    backend = counting_backend(calls)
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=30, seed=2)):
        eager = generate(model, PROMPTS, max_new_tokens=6, **kw)
        before = len(calls)
        assert generate(model, PROMPTS, max_new_tokens=6, compile=backend, **kw) == eager
        # positions 2 (the shortest prompt) to 13 (the longest, 8, + 6 new) take 11 steps; the first runs
        # eagerly (it shows that the state has a fixed size), the others run the compiled graph (a step that
        # failed to compile would have warned and run eagerly)
        assert len(calls) - before == 10


def test_compile_falls_back_to_eager_for_growing_or_uncompilable_states():
    calls = []
    transformer = tiny("transformer")  # the KV cache grows: shapes are not static
    want = generate(transformer, PROMPTS, max_new_tokens=4, temperature=0)
    assert generate(transformer, PROMPTS, max_new_tokens=4, temperature=0, compile=counting_backend(calls)) == want
    assert calls == []
    lstm = tiny("lstm")  # nn.LSTM does not go through torch.compile
    want = generate(lstm, PROMPTS, max_new_tokens=4, temperature=0)
    with pytest.warns(UserWarning, match="did not compile"):
        assert generate(lstm, PROMPTS, max_new_tokens=4, temperature=0, compile=counting_backend(calls)) == want


def test_cuda_graph_step_hands_back_copies_of_the_state():
    """After a CUDA-graph replay the state is cloned out of the graph's memory (the next replay overwrites
    it): same values, same NamedTuple types, new storage (the path runs on CPU too, without a graph)."""
    model = tiny("xlstm")
    with torch.no_grad():
        _, state = model(torch.tensor([[1, 2, 3]]), return_state=True)
        want_logits, want = _run_step(_decode_step, False, model, torch.tensor([[4]]), state)
        logits, got = _run_step(_decode_step, True, model, torch.tensor([[4]]), state)
    assert [type(s) for s in got] == [type(s) for s in want]
    assert torch.equal(logits, want_logits)
    for a, b in zip(tree_leaves(got), tree_leaves(want)):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
