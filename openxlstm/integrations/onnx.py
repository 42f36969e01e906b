"""ONNX export of the language models: ``step.onnx`` and ``prefill.onnx``, run by onnxruntime or any ONNX
runtime, with the batch size and the prompt length dynamic.

    step.onnx     input_ids (B, 1) int64, state_0 ... state_{n-1}  ->  logits (B, V), new_state_0 ...
    prefill.onnx  input_ids (B, S) int64                           ->  logits (B, S, V), state_0 ...

The step is the model's own decode step (``model(ids, state, return_state=True)`` for one token without
gradients), exported with ``torch.onnx.export``: plain tensor ops, no custom ops. The prefill is an ONNX
``Loop`` over the prompt whose body is that step graph, starting from the empty state: exact for every
recurrent model (prefill then steps equals one pass, the models' contract), whatever kernels the model uses
in PyTorch (the chunkwise mLSTM's cummax and the fused sLSTM op have no ONNX counterpart and are not needed).
The state tensors are the leaves of the model's state in ``torch.utils._pytree`` order; ``export_onnx``
writes their names, shapes and batch dimensions into ``onnx.json`` beside the two files. Models whose state
grows with the text (the Transformer baseline's KV cache) are refused.

The forecaster (TiRex) gives ``forecast.onnx``: a window of ``train_ctx_len`` values (B, L) float32, NaN for
missing ones (left-padded with NaN when the history is shorter) -> the quantiles of the next patch
(B, Q, P), with the sLSTM recurrence unrolled over the window's patches; ``OnnxForecaster`` rolls it out
over longer horizons as TiRex does (a missing patch appended per predicted patch, the window sliding).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import UserError
from ..io.files import check_writable_dir, replace_dir, write_error
from ..models import LanguageModel, arch_of

INSTALL = "pip install 'openxlstm[onnx]'"
FILES = ("prefill.onnx", "step.onnx", "onnx.json")


def _require():
    """The onnx module; torch.onnx's exporter needs onnxscript too."""
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UserError(f"ONNX export needs {e.name}: {INSTALL}") from None
    return onnx


class _Step(nn.Module):
    """The model's decode step on flat state tensors (the non-None leaves of its state pytree)."""

    def __init__(self, model: LanguageModel, spec, present: list[bool]):
        super().__init__()
        self.model, self.spec, self.present = model, spec, present

    def forward(self, input_ids: torch.Tensor, *leaves: torch.Tensor):
        it = iter(leaves)
        state = tree_unflatten([next(it) if p else None for p in self.present], self.spec)
        logits, new = self.model(input_ids, state, return_state=True)
        return (logits[:, -1], *(t for t in tree_flatten(new)[0] if t is not None))


def state_layout(model: LanguageModel) -> tuple[object, list[bool], list[dict]]:
    """(pytree spec, which leaves are tensors, one {"shape" at batch 1, "dtype", "batch_dim"} per tensor leaf).
    The batch dimension is the one that differs between ``init_state(1)`` and ``init_state(2)``."""
    one, spec = tree_flatten(model.init_state(1))
    two, _ = tree_flatten(model.init_state(2))
    present = [t is not None for t in one]
    meta = []
    for a, b in zip(one, two):
        if a is None:
            continue
        dims = [d for d in range(a.dim()) if a.shape[d] != b.shape[d]]
        if len(dims) != 1 or 0 in a.shape:
            raise UserError(f"{type(model).__name__}'s state grows with the text (a tensor of shape "
                            f"{tuple(a.shape)} at the start), so it has no fixed-size ONNX step; export a recurrent "
                            f"model (xlstm, xlstm-large, lstm, reslstm)")
        meta.append({"shape": list(a.shape), "dtype": str(a.dtype).removeprefix("torch."), "batch_dim": dims[0]})
    return spec, present, meta


def _export_step(model: LanguageModel, path: Path, spec, present, meta) -> None:
    """step.onnx from the model's decode step, traced at batch 2 with the batch size dynamic."""
    step = _Step(model, spec, present)
    leaves = [t for t in tree_flatten(model.init_state(2))[0] if t is not None]
    tok = torch.zeros(2, 1, dtype=torch.long, device=leaves[0].device)
    batch = torch.export.Dim("batch", min=1)
    shapes = ({0: batch}, tuple({m["batch_dim"]: batch} for m in meta))
    names = [f"state_{j}" for j in range(len(meta))]
    _quiet_export(step, (tok, *leaves), shapes, ["input_ids", *names], ["logits", *(f"new_{n}" for n in names)], path)


def _quiet_export(module: nn.Module, args: tuple, shapes, input_names, output_names, path: Path) -> None:
    """torch.onnx.export (its exporter, dynamic shapes ``shapes``) without its progress lines and notes."""
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the exporter's notes on missing torchvision ops
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # its progress
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=shapes, verbose=False,
                                        input_names=input_names, output_names=output_names)
    finally:
        quiet.setLevel(level)
    program.save(str(path), external_data=False)


def _prefill_from_step(onnx, step, meta: list[dict]):
    """prefill.onnx: a Loop over the prompt's positions whose body is the step graph, from the zero state.

    The body reads position i of the outer ``input_ids`` and the carried states, and hands on the new states
    and the position's logits (scan output, (S, B, V), transposed to (B, S, V) after the loop). The weights stay
    initializers of the outer graph, which the body reads by name."""
    from onnx import TensorProto, helper

    g = step.graph
    state_inputs = [i for i in g.input if i.name != "input_ids"]
    n = len(state_inputs)
    nodes = []

    def const(name, values, dtype=TensorProto.INT64):
        nodes.append(helper.make_node("Constant", [], [name], value=helper.make_tensor(name + "_v", dtype,
                                                                                      [len(values)], values)))

    nodes.append(helper.make_node("Shape", ["input_ids"], ["ids_shape"]))
    const("i0", [0])
    const("i1", [1])
    nodes.append(helper.make_node("Gather", ["ids_shape", "i0"], ["B"], axis=0))  # (1,)
    nodes.append(helper.make_node("Gather", ["ids_shape", "i1"], ["S_1"], axis=0))
    nodes.append(helper.make_node("Squeeze", ["S_1"], ["S"]))
    nodes.append(helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("cond_v", TensorProto.BOOL, [],
                                                                                    [True])))
    for j, inp in enumerate(state_inputs):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        batch_dim = meta[j]["batch_dim"]
        parts = []
        for d, size in enumerate(dims):
            if d == batch_dim:
                parts.append("B")
            else:
                const(f"s{j}_d{d}", [size])
                parts.append(f"s{j}_d{d}")
        nodes.append(helper.make_node("Concat", parts, [f"s{j}_shape"], axis=0))
        zero = helper.make_tensor(f"s{j}_zero", inp.type.tensor_type.elem_type, [1], [0])
        nodes.append(helper.make_node("ConstantOfShape", [f"s{j}_shape"], [f"init_{j}"], value=zero))

    # the body: position i's token, then the step's nodes on the carried states
    body_nodes = [
        helper.make_node("Unsqueeze", ["iter", "b_axes0"], ["iter_1"]),
        helper.make_node("Add", ["iter_1", "b_one"], ["iter_end"]),
        helper.make_node("Slice", ["input_ids", "iter_1", "iter_end", "b_axes1"], ["step_ids"]),
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
    ]
    body_consts = [helper.make_node("Constant", [], ["b_axes0"], value=helper.make_tensor("b0", TensorProto.INT64,
                                                                                          [1], [0])),
                   helper.make_node("Constant", [], ["b_axes1"], value=helper.make_tensor("b1", TensorProto.INT64,
                                                                                          [1], [1])),
                   helper.make_node("Constant", [], ["b_one"], value=helper.make_tensor("b2", TensorProto.INT64,
                                                                                        [1], [1]))]
    outs = list(g.output)
    rename = {"input_ids": "step_ids", outs[0].name: "step_logits",
              **{inp.name: f"carry_{j}" for j, inp in enumerate(state_inputs)}}
    for node in g.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for field in (copy.input, copy.output):
            for k, name in enumerate(field):
                if name in rename:
                    field[k] = rename[name]
        body_nodes.append(copy)
    body_outputs = [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])]
    body_outputs += [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None) for o in outs[1:]]
    body_outputs += [helper.make_tensor_value_info("step_logits", outs[0].type.tensor_type.elem_type, None)]
    body_inputs = [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
                   helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])]
    body_inputs += [helper.make_tensor_value_info(f"carry_{j}", inp.type.tensor_type.elem_type, None)
                    for j, inp in enumerate(state_inputs)]
    body = helper.make_graph(body_consts + body_nodes, "prefill_step", body_inputs, body_outputs)
    finals = [f"state_{j}" for j in range(n)]
    nodes.append(helper.make_node("Loop", ["S", "cond", *(f"init_{j}" for j in range(n))],
                                  [*finals, "logits_sbv"], body=body))
    nodes.append(helper.make_node("Transpose", ["logits_sbv"], ["logits"], perm=[1, 0, 2]))
    vocab = outs[0].type.tensor_type.shape.dim[1]
    logits_info = helper.make_tensor_value_info("logits", outs[0].type.tensor_type.elem_type,
                                                ["batch", "sequence", vocab.dim_value or None])
    state_infos = [helper.make_tensor_value_info(f"state_{j}", inp.type.tensor_type.elem_type,
                                                 [d.dim_param or d.dim_value or None for d in
                                                  inp.type.tensor_type.shape.dim]) for j, inp in enumerate(state_inputs)]
    ids_info = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    graph = helper.make_graph(nodes, "prefill", [ids_info], [logits_info, *state_infos], initializer=list(g.initializer))
    model = helper.make_model(graph, opset_imports=list(step.opset_import), producer_name="openxlstm")
    model.functions.extend(step.functions)
    model.ir_version = step.ir_version
    return model


class _NextPatch(nn.Module):
    """The forecaster on one full window: values (B, L) -> quantiles of the next patch (B, Q, P)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        from ..models.tirex import scale_stats, tokenize

        loc, scale = scale_stats(window)
        pred, _ = self.model.forward_tokens(tokenize((window - loc) / scale, self.model.config.patch_size), None,
                                            None, keep_last=1)
        return pred[:, -1].float() * scale[:, :, None] + loc[:, :, None]


def _export_forecaster(model, target: Path, overwrite: bool) -> Path:
    check_writable_dir(target, overwrite)
    backend = model.slstm_backend
    model.set_backends(slstm="recurrent")  # plain ops, unrolled over the window's patches
    cfg = model.config
    window = torch.zeros(2, cfg.train_ctx_len)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _quiet_export(_NextPatch(model), (window,), ({0: torch.export.Dim("batch", min=1)},), ["context"],
                      ["quantiles"], tmp / "forecast.onnx")
        info = {"arch": "tirex", "context": cfg.train_ctx_len, "patch_size": cfg.patch_size,
                "quantiles": list(cfg.quantiles), "inputs": {"forecast": ["context"]},
                "outputs": {"forecast": ["quantiles"]}}
        (tmp / "onnx.json").write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, f"the ONNX files into {str(target)!r}") or e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.set_backends(slstm=backend)
    return target


def export_onnx(model: LanguageModel, out_dir, overwrite: bool = False) -> Path:
    """Write ``prefill.onnx``, ``step.onnx`` and ``onnx.json`` (the state's layout) for ``model`` into
    ``out_dir`` (a new or empty directory, or replaced with ``overwrite``), atomically, in float32 (the caller's
    model is not changed). The files hold the weights inline: models up to 2 GB (protobuf's limit). Returns the
    directory."""
    onnx = _require()
    from ..models.tirex import TiRex

    if not isinstance(model, (LanguageModel, TiRex)):
        raise UserError(f"ONNX export takes the language models and the forecaster; got a {type(model).__name__}")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()  # the caller's model keeps its dtype
    was_training = model.training
    try:
        if isinstance(model, TiRex):
            return _export_forecaster(model.eval(), Path(out_dir).expanduser(), overwrite)
        return _export(onnx, model.eval(), Path(out_dir).expanduser(), overwrite)
    finally:
        model.train(was_training)


def _export(onnx, model: LanguageModel, target: Path, overwrite: bool) -> Path:
    spec, present, meta = state_layout(model)
    check_writable_dir(target, overwrite)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _export_step(model, tmp / "step.onnx", spec, present, meta)
        step = onnx.load(str(tmp / "step.onnx"))
        info = {"arch": arch_of(model), "vocab_size": model.config.vocab_size, "state": meta,
                "inputs": {"step": ["input_ids", *(f"state_{j}" for j in range(len(meta)))], "prefill": ["input_ids"]},
                "outputs": {"step": ["logits", *(f"new_state_{j}" for j in range(len(meta)))],
                            "prefill": ["logits", *(f"state_{j}" for j in range(len(meta)))]}}
        step.metadata_props.add(key="openxlstm", value=json.dumps(info))
        onnx.save(step, str(tmp / "step.onnx"))
        prefill = _prefill_from_step(onnx, step, meta)
        onnx.checker.check_model(prefill)
        onnx.save(prefill, str(tmp / "prefill.onnx"))
        (tmp / "onnx.json").write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, f"the ONNX files into {str(target)!r}") or e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


class OnnxLM:
    """The exported files run with onnxruntime: ``prefill(ids)`` -> (logits (B, S, V), state list) and
    ``step(tok, state)`` -> (logits (B, V), state list), numpy arrays in and out; ``greedy`` continues ids."""

    def __init__(self, directory, providers: Optional[list] = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(f"running ONNX files needs onnxruntime: {INSTALL}") from None
        d = Path(directory)
        self.info = json.loads((d / "onnx.json").read_text())
        providers = providers or ["CPUExecutionProvider"]
        self._prefill = ort.InferenceSession(str(d / "prefill.onnx"), providers=providers)
        self._step = ort.InferenceSession(str(d / "step.onnx"), providers=providers)

    def prefill(self, ids):
        logits, *state = self._prefill.run(None, {"input_ids": ids})
        return logits, state

    def step(self, tok, state):
        names = [i.name for i in self._step.get_inputs()]
        logits, *state = self._step.run(None, dict(zip(names, [tok, *state])))
        return logits, state

    def greedy(self, ids, max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of the rows of ``ids`` (B, S) int64: the new ids of each row."""
        import numpy as np

        logits, state = self.prefill(ids)
        last = logits[:, -1]
        out = []
        for _ in range(max_new_tokens):
            tok = last.argmax(-1).astype(np.int64)[:, None]
            out.append(tok[:, 0])
            last, state = self.step(tok, state)
        return np.stack(out, 1).tolist() if out else [[] for _ in range(ids.shape[0])]


class OnnxForecaster:
    """forecast.onnx run with onnxruntime: ``forecast(context (B, L) or a list of series, prediction_length)``
    -> (quantiles (B, H, Q), mean (B, H)) numpy arrays, TiRex's rollout: each window the last
    ``context`` values, left-padded with NaN; a missing patch appended per predicted patch."""

    def __init__(self, directory, providers: Optional[list] = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(f"running ONNX files needs onnxruntime: {INSTALL}") from None
        d = Path(directory)
        self.info = json.loads((d / "onnx.json").read_text())
        self._session = ort.InferenceSession(str(d / "forecast.onnx"), providers=providers or ["CPUExecutionProvider"])

    def forecast(self, context, prediction_length: Optional[int] = None):
        import numpy as np

        L, P = self.info["context"], self.info["patch_size"]
        rows = [np.asarray(c, dtype=np.float32).ravel() for c in (context if isinstance(context, list) else
                                                                 np.atleast_2d(np.asarray(context, np.float32)))]
        values = np.full((len(rows), max(L, max(len(r) for r in rows))), np.nan, dtype=np.float32)
        for b, r in enumerate(rows):
            values[b, values.shape[1] - len(r):] = r
        H = P if prediction_length is None else prediction_length
        preds = []
        for _ in range(-(-H // P)):
            q = self._session.run(None, {"context": values[:, -L:]})[0]  # (B, Q, P)
            preds.append(q)
            values = np.concatenate([values, np.full((values.shape[0], P), np.nan, np.float32)], axis=1)
        q = np.concatenate(preds, axis=-1)[:, :, :H].transpose(0, 2, 1)  # (B, H, Q)
        return q, q[:, :, self.info["quantiles"].index(0.5)]


__all__ = ["export_onnx", "state_layout", "OnnxLM", "OnnxForecaster", "FILES"]
