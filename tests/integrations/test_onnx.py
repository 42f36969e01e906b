"""ONNX export: prefill.onnx and step.onnx of every recurrent language model, run by onnxruntime, equal the
PyTorch model (float32, 1e-5 relative) at batch sizes and prompt lengths other than the traced ones; a
greedy loop in onnxruntime equals openxlstm.generate; the command line and its errors."""

import json

import numpy as np
import pytest
import torch
from helpers import one_line_error, tiny_args, tiny_model

import openxlstm
from openxlstm.cli import main
from openxlstm.errors import UserError
from openxlstm.integrations.onnx import OnnxForecaster, OnnxLM, export_onnx
from openxlstm.models.tirex import TiRex, TiRexConfig

pytest.importorskip("onnxruntime")
RECURRENT = ["xlstm", "xlstm-large", "lstm", "reslstm"]


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("arch", RECURRENT)
def test_onnx_files_equal_the_model(arch, tmp_path):
    model = tiny_model(arch, seed=4)
    out = export_onnx(model, tmp_path / "onnx")
    lm = OnnxLM(out)
    ids = torch.randint(0, 64, (3, 13), generator=torch.Generator().manual_seed(0))  # traced at batch 2, 1 token
    with torch.no_grad():
        ref, state = model(ids, return_state=True)
        nxt = torch.randint(0, 64, (3, 1))
        ref_step, ref_state = model(nxt, state, return_state=True)
    logits, onnx_state = lm.prefill(ids.numpy())
    assert logits.shape == (3, 13, 64) and rel(logits, ref) <= 1e-5
    leaves = [t for t in torch.utils._pytree.tree_flatten(state)[0] if t is not None]
    assert len(onnx_state) == len(leaves) and all(rel(a, b) <= 1e-5 for a, b in zip(onnx_state, leaves))
    step_logits, _ = lm.step(nxt.numpy(), onnx_state)
    assert rel(step_logits, ref_step[:, -1]) <= 1e-5
    prompts = ids[:, :4]
    assert lm.greedy(prompts.numpy(), 8) == openxlstm.generate(model, prompts.tolist(), max_new_tokens=8, temperature=0)
    info = json.loads((out / "onnx.json").read_text())
    assert info["arch"] == arch and len(info["state"]) == len(leaves)


def test_forecaster_onnx_equals_forecast(tmp_path):
    """forecast.onnx (one window -> the next patch's quantiles) rolled out by OnnxForecaster equals TiRex's
    own window rollout, with missing values, a shorter series and a horizon of several patches."""
    torch.manual_seed(0)
    model = TiRex(TiRexConfig(patch_size=8, embedding_dim=32, num_heads=2, num_blocks=1, input_ff_dim=32,
                              train_ctx_len=32)).eval()
    out = export_onnx(model, tmp_path / "f")
    series = [np.sin(np.arange(40) / 3.0).astype(np.float32), np.cos(np.arange(32) / 5.0).astype(np.float32) + 2]
    series[0][5:9] = np.nan
    q, mean = OnnxForecaster(out).forecast(series, prediction_length=20)
    want_q, want_mean = model.forecast([torch.from_numpy(s) for s in series], prediction_length=20)
    assert q.shape == (2, 20, 9) and rel(q, want_q) <= 1e-5 and rel(mean, want_mean) <= 1e-5


def test_growing_states_and_other_modules_are_refused_and_the_model_is_left_as_it_was(tmp_path):
    with pytest.raises(UserError, match="grows with the text"):
        export_onnx(tiny_model("transformer"), tmp_path / "t")
    assert not (tmp_path / "t").exists()
    with pytest.raises(UserError, match="takes the language models and the forecaster"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "f")
    model = tiny_model("lstm").bfloat16().train()
    export_onnx(model, tmp_path / "l")
    assert model.training and next(model.parameters()).dtype == torch.bfloat16


def test_command_line(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_args("xlstm", corpus, run, steps=2)) == 0
    assert main(["export", "onnx", "--checkpoint", str(run), "--out", str(tmp_path / "x")]) == 0
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["onnx.json", "prefill.onnx", "step.onnx"]
    capsys.readouterr()
    assert main(["export", "onnx", "--checkpoint", str(run), "--out", str(tmp_path / "x")]) == 2
    one_line_error(capsys, "is not empty")
    assert main(["export", "onnx", "--checkpoint", str(run), "--out", str(tmp_path / "x"), "--overwrite"]) == 0
