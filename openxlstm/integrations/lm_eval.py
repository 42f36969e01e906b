"""EleutherAI's lm-evaluation-harness (lm-eval 0.4) for every openxlstm model: ``OpenXLSTMLM``, registered as
"openxlstm" when this module is imported (lm-eval finds models outside its own package only by import)::

    import lm_eval
    import openxlstm.integrations.lm_eval  # registers "openxlstm"
    out = lm_eval.simple_evaluate(model="openxlstm", model_args="pretrained=runs/default,batch_size=16",
                                  tasks=["lambada_openai"])

How the three request types are computed:

* ``loglikelihood`` (multiple choice, LAMBADA): each request's context + continuation minus its last token is
  one input. Inputs of any lengths are packed end to end into at most ``batch_size`` rows as long as the
  batch's longest input, each its own document (``cu_seqlens``: it runs exactly as if alone), so no padding
  enters any input and rows are full. Requests with the same input (one-token continuations of one context)
  are computed once. With ``share_context`` (recurrent models), a context followed by several continuations
  (HellaSwag, ARC) runs once and its state is carried into each. A recurrent model scores an input longer
  than ``max_length`` in pieces of
  ``max_length`` tokens with its state carried; the Transformer baseline cuts its context from the left to
  ``max_length`` tokens, as lm-eval's hf model does.
* ``loglikelihood_rolling`` (perplexity): a recurrent model (a state of fixed size: xLSTM, LSTM, xLSTM-7B)
  scores each document in one pass, in pieces of ``max_length`` tokens with the state carried, so every
  token is scored with the whole document before it. The Transformer, whose state (a KV cache) grows, is
  scored in lm-eval's rolling windows of ``max_length`` tokens, as the hf model does.
* ``generate_until``: ``openxlstm.generate`` over batches of prompts (greedy unless the task samples), the
  output cut at the first end-of-document token and at the first of the task's stop strings.

Tokenization is the model's own tokenizer (``model.tokenizer``: bytes or a tokenizer.json). A context and its
continuation are split as lm-eval's hf model splits them: the whole string is encoded and cut after as many
tokens as the context alone has (trailing spaces of the context go to the continuation), so a continuation
is scored as the tokens the model reads in running text (a BPE may merge across the boundary) and the
numbers compare with those of hf models. A request with an empty context, and every rolling document, is
conditioned on ``prefix_token_id`` (default: the tokenizer's end-of-document token, else the config's
``bos_token_id``), as the hf model conditions on the tokenizer's BOS or EOS token.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from ..errors import UserError

try:
    import lm_eval.models  # noqa: F401 - lm-eval's own models first: its registry loads them only while empty
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
except ImportError as e:  # the module is imported explicitly: say what to install
    raise ImportError(f"openxlstm.integrations.lm_eval needs lm-evaluation-harness ({e}): "
                      f"pip install 'openxlstm[eval]'") from e

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
DEFAULT_MAX_LENGTH = 2048  # a recurrent model's piece length; the Transformer's context when its config has none
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")  # after normalize_gen_kwargs
Item = tuple[tuple[int, ...], int]  # (tokens, n): score the last n tokens given the ones before them


def _positive_int(value, name: str, allow_none: bool = False) -> Optional[int]:
    """``value`` (an int or its text, as lm-eval's argument strings give it) as a positive int."""
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " (automatic batch sizes are not supported)" if str(value).startswith("auto") else ""
        raise UserError(f"openxlstm model: {name} must be a positive integer, got {value!r}{extra}")
    return value


def _bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise UserError(f"openxlstm model: {name} must be true or false, got {value!r}")


def _device(device) -> torch.device:
    """None or "auto": the GPU when there is one, else the CPU; a CUDA device without CUDA is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"openxlstm model: device {device!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"openxlstm model: device {device!r}: CUDA is not available on this machine")
    return resolved


def _load(pretrained, dtype: Optional[str], device: torch.device, hub: dict):
    """The model of ``openxlstm.from_pretrained`` (Hub arguments passed only when given and accepted)."""
    import openxlstm

    accepted = inspect.signature(openxlstm.from_pretrained).parameters
    refused = sorted(k for k in hub if k not in accepted)
    if refused:
        raise UserError(f"openxlstm model: {', '.join(refused)} need(s) a model name on the Hugging Face Hub, which "
                        f"this openxlstm does not fetch; pass a local model directory as pretrained")
    return openxlstm.from_pretrained(str(pretrained), dtype=dtype, device=device, **hub)


def _state_shapes(state) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tree_leaves(state) if isinstance(t, torch.Tensor)]


@register_model("openxlstm")
class OpenXLSTMLM(TemplateLM):
    """An openxlstm model (xLSTM, xLSTM-7B, the LSTM and Transformer baselines) for lm-eval.

    Args (all also model_args of ``lm_eval --model openxlstm --model_args k=v,...``):
        pretrained: a model directory (``openxlstm train`` run or checkpoint, transformers xLSTM directory such
            as xLSTM-7B, the authors' xlstm_large layout), or a model instance (moved to ``device`` and
            ``dtype`` in place when they are given).
        tokenizer: None (the model's own, ``model.tokenizer``), a tokenizer.json path, or a tokenizer object
            with ``encode``/``decode``/``eod_id``.
        dtype: "auto" keeps the checkpoint's; float32, bfloat16, float16 or float64.
        device: "cuda", "cuda:N", "cpu"; None or "auto": the GPU when there is one.
        batch_size: rows per forward pass (loglikelihood packs several requests into a row) and prompts per
            generation batch.
        max_batch_size: accepted for lm-eval's interface; unused (no automatic batch size).
        max_length: tokens per forward pass of one row. A recurrent model reads any length (longer inputs run
            in pieces with the state carried); for the Transformer it is the context (default: the config's
            ``context_length``). Default 2048 for recurrent models.
        max_gen_toks: tokens generated when a task does not say (256, as hf).
        prefix_token_id: the token that conditions a continuation without context and a rolling document's
            first token.
        mlstm_backend, slstm_backend, chunk_size: kernel choice (``model.set_backends``); default: the model's.
        share_context: run a context followed by several continuations once and carry its state into each
            (default: on for recurrent models); costs one state per batch row, off saves that memory.
        revision, cache_dir, local_files_only: for a Hugging Face Hub name as ``pretrained``.
    """

    def __init__(self, pretrained: Union[str, Path, torch.nn.Module], tokenizer=None, dtype: str = "auto",
                 device: Optional[str] = None, batch_size: Union[int, str] = 1, max_batch_size=None,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, prefix_token_id: Optional[int] = None,
                 mlstm_backend: Optional[str] = None, slstm_backend: Optional[str] = None,
                 chunk_size: Optional[int] = None, share_context=None, revision: Optional[str] = None,
                 cache_dir: Optional[str] = None, local_files_only=None):
        super().__init__()
        if str(dtype) not in DTYPES and not isinstance(dtype, torch.dtype):
            raise UserError(f"openxlstm model: dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        load_dtype = None if str(dtype) == "auto" else dtype
        self._batch_size = _positive_int(batch_size, "batch_size")
        self._max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        if isinstance(pretrained, torch.nn.Module):
            model = pretrained
            if device is not None:
                model = model.to(_device(device))
            if load_dtype is not None:
                model = model.to(getattr(torch, str(load_dtype).removeprefix("torch.")))
            self._path = None
        else:
            if pretrained is None or str(pretrained) == "":
                raise UserError("openxlstm model: pass pretrained=DIR (a model directory)")
            hub = {k: v for k, v in (("revision", revision), ("cache_dir", cache_dir),
                                     ("local_files_only", local_files_only)) if v is not None}
            if "local_files_only" in hub:
                hub["local_files_only"] = _bool(hub["local_files_only"], "local_files_only")
            model = _load(pretrained, load_dtype, _device(device), hub)
            self._path = str(pretrained)
        self.model = model.eval()
        if mlstm_backend is not None or slstm_backend is not None or chunk_size is not None:
            if not hasattr(model, "set_backends"):
                raise UserError(f"openxlstm model: {type(model).__name__} has no kernel choice "
                                f"(mlstm_backend, slstm_backend, chunk_size are for xLSTM models)")
            current = getattr(model, "backends", None)
            model.set_backends(mlstm=mlstm_backend or getattr(current, "mlstm", "auto"),
                               slstm=slstm_backend or getattr(current, "slstm", "auto"),
                               chunk_size=_positive_int(chunk_size, "chunk_size", allow_none=True))
        self._device = next(model.parameters()).device
        self.tok = self._tokenizer(tokenizer, model)
        self.vocab_size = model.config.vocab_size
        self.grows, self._batch_dims = self._probe_state()
        config_length = getattr(model.config, "context_length", None)
        default = config_length if self.grows and config_length else DEFAULT_MAX_LENGTH
        self._max_length = _positive_int(max_length, "max_length", allow_none=True) or default
        self._prefix = self._prefix_id(prefix_token_id)
        eod = getattr(self.tok, "eod_id", None)
        self._pad_id = int(eod) if eod is not None else 0  # fills rows; never read by a scored position
        can_share = not self.grows and self._batch_dims is not None
        self.share_context = can_share if share_context is None else _bool(share_context, "share_context")
        if self.share_context and not can_share:
            raise UserError(f"openxlstm model: share_context needs a state of fixed size; {type(model).__name__}'s "
                            f"grows with the sequence")

    # set-up -------------------------------------------------------------------------------------------------
    @staticmethod
    def _tokenizer(tokenizer, model):
        if tokenizer is None:
            tokenizer = getattr(model, "tokenizer", None)
            if tokenizer is None:
                raise UserError("openxlstm model: this model has no tokenizer (it reads token ids), and the harness "
                                "gives text; pass tokenizer=PATH of a tokenizer.json")
            return tokenizer
        if isinstance(tokenizer, (str, Path)):
            from ..data import HFTokenizer

            if not Path(tokenizer).is_file():
                raise UserError(f"openxlstm model: tokenizer {str(tokenizer)!r} is not a file (a tokenizer.json)")
            return HFTokenizer.from_file(tokenizer)
        return tokenizer

    @torch.no_grad()
    def _probe_state(self) -> tuple[bool, Optional[list[Optional[int]]]]:
        """(whether the state grows with the sequence, as a KV cache does; the batch dimension of each leaf of
        the state, None for a leaf without one, or None in all when they cannot be told), from states after
        1 and 2 tokens and for 1 and 2 rows."""
        zeros = torch.zeros(2, 2, dtype=torch.long, device=self._device)
        states = {(b, n): self.model(zeros[:b, :n], return_state=True)[1] for b, n in ((1, 1), (1, 2), (2, 1))}
        grows = _state_shapes(states[1, 1]) != _state_shapes(states[1, 2])
        dims = []
        for one, two in zip(tree_flatten(states[1, 1])[0], tree_flatten(states[2, 1])[0]):
            if not isinstance(one, torch.Tensor):
                dims.append(None)
                continue
            differ = [d for d, (a, b) in enumerate(zip(one.shape, two.shape)) if a != b]
            if len(differ) != 1 or one.dim() != two.dim():
                return grows, None
            dims.append(differ[0])
        return grows, dims

    def _prefix_id(self, prefix_token_id) -> Optional[int]:
        if prefix_token_id is None:
            eod = getattr(self.tok, "eod_id", None)
            bos = getattr(self.model.config, "bos_token_id", None)
            if eod is not None:
                return int(eod)
            return bos if isinstance(bos, int) and not isinstance(bos, bool) and 0 <= bos < self.vocab_size else None
        if isinstance(prefix_token_id, str) and prefix_token_id.strip().isdigit():
            prefix_token_id = int(prefix_token_id)
        if isinstance(prefix_token_id, bool) or not isinstance(prefix_token_id, int) or \
                not 0 <= prefix_token_id < self.vocab_size:
            raise UserError(f"openxlstm model: prefix_token_id must be a token id in 0..{self.vocab_size - 1}, "
                            f"got {prefix_token_id!r}")
        return prefix_token_id

    # lm-eval's interface ------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> Optional[int]:
        eod = getattr(self.tok, "eod_id", None)
        return self._prefix if eod is None else int(eod)

    @property
    def prefix_token_id(self) -> int:
        if self._prefix is None:
            raise UserError("openxlstm model: this tokenizer has no end-of-document token to condition a text "
                            "without context on; pass prefix_token_id=ID")
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return type(self.tok).__name__

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """Token ids of ``string``; ``add_special_tokens=False`` leaves out what a tokenizer.json's post-processor
        adds (a BOS), as lm-eval asks for a continuation without context."""
        inner = getattr(self.tok, "tokenizer", None)
        if add_special_tokens is False and inner is not None and hasattr(inner, "encode"):
            return list(inner.encode(string, add_special_tokens=False).ids)
        return [int(t) for t in self.tok.encode(string)]

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens))

    def get_model_info(self) -> dict:
        params = {id(p): p for p in self.model.parameters()}.values()
        return {"model_num_parameters": sum(p.numel() for p in params),
                "model_dtype": str(next(self.model.parameters()).dtype), "model_class": type(self.model).__name__,
                "model_path": self._path, "batch_size": self.batch_size, "device": str(self._device),
                "max_length": self.max_length, "share_context": self.share_context}

    # loglikelihood ------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (log-prob of the
        continuation, whether greedy decoding gives it) each."""
        items, cut = [], 0
        for _, context, continuation in requests:
            tokens, n = tuple(context) + tuple(continuation), len(continuation)
            if n == 0:
                raise UserError("openxlstm model: a loglikelihood request has an empty continuation (nothing to score)")
            if self.grows and len(tokens) > self.max_length + 1:
                if n > self.max_length:
                    raise UserError(f"openxlstm model: a continuation of {n} tokens is longer than max_length = "
                                    f"{self.max_length}; raise max_length")
                tokens, cut = tokens[-(self.max_length + 1):], cut + 1
            items.append((tokens, n))
        if cut:
            logger.warning("%d of %d contexts were cut from the left to fit max_length = %d tokens", cut,
                           len(requests), self.max_length)
        results = self._score(items, disable_tqdm, "loglikelihood requests")
        for (strings, _, _), answer in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-probability of each whole string, its first token conditioned on ``prefix_token_id``."""
        docs = [self.tok_encode(req.args[0]) for req in requests]
        items, owner = [], []
        for d, tokens in enumerate(docs):
            if not tokens:
                continue
            if self.grows:  # lm-eval's windows: every token scored once, each window max_length tokens long
                windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1))
                for context, pred in windows:
                    items.append((tuple(context) + tuple(pred), len(pred)))
                    owner.append(d)
            else:
                items.append(((self.prefix_token_id, *tokens), len(tokens)))
                owner.append(d)
        totals = [0.0] * len(docs)
        for d, (logprob, _) in zip(owner, self._score(items, disable_tqdm, "rolling loglikelihood windows")):
            totals[d] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.no_grad()
    def _score(self, items: list[Item], disable_tqdm: bool, desc: str) -> list[tuple[float, bool]]:
        """(sum of log-probs of the last n tokens, whether each is the argmax) per (tokens, n)."""
        from tqdm import tqdm

        for tokens, n in items:
            if not 1 <= n < len(tokens):
                raise ValueError(f"an item scores n = {n} of its {len(tokens)} tokens (needs 1 <= n < len)")
            if max(tokens) >= self.vocab_size or min(tokens) < 0:
                raise UserError(f"openxlstm model: token id {max(tokens)} is outside the model's vocabulary of "
                                f"{self.vocab_size} (does the tokenizer belong to the model?)")
        results: list = [None] * len(items)
        bar = tqdm(total=len(items), desc=f"openxlstm: {desc}", disable=disable_tqdm)
        shared, alone = self._shared_contexts(items)
        for a in range(0, len(shared), self.batch_size):
            batch = shared[a:a + self.batch_size]
            self._run_shared(batch, items, results)
            bar.update(sum(len(js) for _, js in batch))
        self._score_alone(alone, items, results, bar)
        bar.close()
        return results

    def _shared_contexts(self, items: list[Item]) -> tuple[list[tuple[tuple[int, ...], list[int]]], list[int]]:
        """([(context, its items)] whose context runs once, longest first; the other items). With
        ``share_context``, a context of two or more tokens followed by several different continuations is
        shared when it and every continuation fit in ``max_length``."""
        if not self.share_context:
            return [], list(range(len(items)))
        groups: dict[tuple[int, ...], list[int]] = {}
        for j, (tokens, n) in enumerate(items):
            groups.setdefault(tokens[:-n], []).append(j)
        shared, alone = [], []
        for context, js in groups.items():
            conts = {items[j][0][len(context):] for j in js}
            if len(conts) > 1 and 2 <= len(context) <= self.max_length and max(map(len, conts)) <= self.max_length + 1:
                shared.append((context, js))
            else:
                alone.extend(js)
        shared.sort(key=lambda g: (-len(g[0]), g[0]))
        return shared, sorted(alone)

    def _run_shared(self, batch, items: list[Item], results) -> None:
        """Contexts read once, one per row (shorter ones behind a padding document, so each row's returned
        state is its context's); then every continuation from its context's state, one per row."""
        B, pad = self.batch_size, self._pad_id
        width = len(batch[0][0])
        table, bounds = [], []
        for r, (context, _) in enumerate(batch):
            lead = width - len(context)
            table.append([pad] * lead + list(context))
            bounds.extend([r * width] + ([r * width + lead] if lead else []))
        bounds.append(len(batch) * width)
        ids = torch.tensor(table, dtype=torch.long, device=self._device)  # (R, S)
        cu = torch.tensor(bounds, dtype=torch.int32, device=self._device) if len(bounds) > len(batch) + 1 else None
        last, state = self.model(ids, cu_seqlens=cu, return_state=True, logits_to_keep=1)  # (R, 1, V)
        owned = [j for _, js in batch for j in js]
        rows = [r for r, (_, js) in enumerate(batch) for _ in js]  # the context row of each owned item
        conts = [items[j][0][len(batch[r][0]):] for j, r in zip(owned, rows)]  # (K,) continuation tokens each
        sums = self._accumulate(last.reshape(-1, last.shape[-1]), rows, [k[0] for k in conts],
                                list(range(len(owned))), len(owned))
        longer = sorted((k for k in range(len(owned)) if len(conts[k]) > 1), key=lambda k: -len(conts[k]))
        for a in range(0, len(longer), B):
            sub = longer[a:a + B]
            length = len(conts[sub[0]]) - 1
            ids = torch.tensor([list(conts[k][:-1]) + [pad] * (length + 1 - len(conts[k])) for k in sub],
                               dtype=torch.long, device=self._device)  # (R', L): right padding changes no score
            logits = self.model(ids, self._select_rows(state, [rows[k] for k in sub]))  # (R', L, V)
            pos = [i * length + p for i, k in enumerate(sub) for p in range(len(conts[k]) - 1)]
            tgt = [t for k in sub for t in conts[k][1:]]
            seg = [k for k in sub for _ in range(len(conts[k]) - 1)]
            sums = self._accumulate(logits.reshape(-1, logits.shape[-1]), pos, tgt, seg, len(owned), sums)
        self._finish(sums, owned, results)

    def _select_rows(self, state, rows: list[int]):
        """The state of the given batch rows (each leaf indexed along its batch dimension)."""
        leaves, spec = tree_flatten(state)
        idx = torch.tensor(rows, device=self._device)
        return tree_unflatten([leaf if d is None else leaf.index_select(d, idx)
                               for leaf, d in zip(leaves, self._batch_dims)], spec)

    def _score_alone(self, alone: list[int], items: list[Item], results, bar) -> None:
        """Items with the same input (tokens[:-1]) share it; inputs up to ``max_length`` run packed, longer ones
        (recurrent models only) as rows in pieces with the state carried."""
        index: dict[tuple[int, ...], int] = {}
        users: list[list[int]] = []  # unique input -> the items that read it
        for j in alone:
            u = index.setdefault(items[j][0][:-1], len(index))
            if u == len(users):
                users.append([])
            users[u].append(j)
        inputs = list(index)
        order = sorted(range(len(inputs)), key=lambda u: (-len(inputs[u]), inputs[u]))
        short = [u for u in order if len(inputs[u]) <= self.max_length]
        long = [u for u in order if len(inputs[u]) > self.max_length]
        for batch in _packed_batches([len(inputs[u]) for u in short], self.batch_size):
            placed = [(short[i], r, o) for i, r, o in batch.placements]
            self._run_packed(placed, batch.seq_len, inputs, users, items, results)
            bar.update(sum(len(users[u]) for u, _, _ in placed))
        for a in range(0, len(long), self.batch_size):
            rows = long[a:a + self.batch_size]
            self._run_pieces(rows, inputs, users, items, results)
            bar.update(sum(len(users[u]) for u in rows))

    def _targets(self, placed, width: int, inputs, users, items):
        """Flat positions (M,) into (rows * width) logits, target ids (M,), owning item (M,) and the items, for
        inputs placed as (unique input, row, offset)."""
        pos, tgt, seg, owned = [], [], [], []
        for u, r, o in placed:
            end = r * width + o + len(inputs[u])
            for j in users[u]:
                tokens, n = items[j]
                pos.extend(range(end - n, end))
                tgt.extend(tokens[-n:])
                seg.extend([len(owned)] * n)
                owned.append(j)
        return pos, tgt, seg, owned

    def _run_packed(self, placed, seq_len: int, inputs, users, items, results) -> None:
        """One forward pass of the inputs placed in rows of ``seq_len`` (each a document of its own, the rest
        of a row one document of padding), writing the results of their items."""
        rows = 1 + max(r for _, r, _ in placed)
        pad = self._pad_id
        table = [[pad] * seq_len for _ in range(rows)]
        starts = [set() for _ in range(rows)]
        for u, r, o in placed:
            table[r][o:o + len(inputs[u])] = inputs[u]
            starts[r].update((o, o + len(inputs[u])))
        bounds = sorted({r * seq_len + s for r in range(rows) for s in starts[r] if s < seq_len} | {rows * seq_len})
        ids = torch.tensor(table, dtype=torch.long, device=self._device)  # (B, S)
        cu = None
        if len(bounds) > rows + 1:  # a row holds more than one input, or padding
            cu = torch.tensor(bounds, dtype=torch.int32, device=self._device)
        logits = self.model(ids, cu_seqlens=cu)  # (B, S, V)
        pos, tgt, seg, owned = self._targets(placed, seq_len, inputs, users, items)
        self._finish(self._accumulate(logits.reshape(-1, logits.shape[-1]), pos, tgt, seg, len(owned)), owned, results)

    def _run_pieces(self, rows: list[int], inputs, users, items, results) -> None:
        """Long inputs, one per row, right-padded to the longest, run in pieces of ``max_length`` tokens with the
        state carried (padding follows every real token, so it changes no score)."""
        width = max(len(inputs[u]) for u in rows)
        ids = torch.tensor([list(inputs[u]) + [self._pad_id] * (width - len(inputs[u])) for u in rows],
                           dtype=torch.long, device=self._device)  # (B, L)
        pos, tgt, seg, owned = self._targets([(u, r, 0) for r, u in enumerate(rows)], width, inputs, users, items)
        state, sums = None, None
        for a in range(0, width, self.max_length):
            w = min(self.max_length, width - a)
            logits, state = self.model(ids[:, a:a + w], state, return_state=True)  # (B, w, V)
            keep = [k for k, p in enumerate(pos) if a <= p % width < a + w]
            local = [(pos[k] // width) * w + pos[k] % width - a for k in keep]  # into this piece's (B * w) rows
            sums = self._accumulate(logits.reshape(-1, logits.shape[-1]), local, [tgt[k] for k in keep],
                                    [seg[k] for k in keep], len(owned), sums)
        self._finish(sums, owned, results)

    @staticmethod
    def _accumulate(flat_logits: torch.Tensor, pos: list[int], tgt: list[int], seg: list[int], count: int,
                    sums: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Add the log-probs of the targets ``tgt`` at positions ``pos`` of ``flat_logits`` (N, V), and whether
        each is not the argmax, to their items ``seg`` in ``sums`` (2, count) float64 (row 0 log-probs, row 1
        misses); in float32 at least, on the device."""
        dev = flat_logits.device
        if sums is None:
            sums = torch.zeros(2, count, dtype=torch.float64, device=dev)
        if pos:
            tgt_t, seg_t = torch.tensor(tgt, device=dev), torch.tensor(seg, device=dev)
            chosen = flat_logits[torch.tensor(pos, device=dev)]  # (M, V)
            logp = torch.log_softmax(chosen.to(torch.promote_types(chosen.dtype, torch.float32)), dim=-1)
            sums[0].index_add_(0, seg_t, logp.gather(1, tgt_t[:, None])[:, 0].double())
            sums[1].index_add_(0, seg_t, (logp.argmax(dim=-1) != tgt_t).double())
        return sums

    @staticmethod
    def _finish(sums: torch.Tensor, owned: list[int], results) -> None:
        logprobs, misses = sums.tolist()  # the one host read of a batch
        for k, j in enumerate(owned):
            results[j] = (logprobs[k], misses[k] == 0)

    # generation ---------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each (context, gen_kwargs) continued until one of ``until`` or ``max_gen_toks`` tokens; the text
        before the first stop string (or end-of-document token) is the answer."""
        from tqdm import tqdm

        from ..generation import generate

        bar = tqdm(total=len(requests), desc="openxlstm: generate_until requests", disable=disable_tqdm)
        encoded = {}

        def encode(context: str) -> list[int]:
            if context not in encoded:
                encoded[context] = self.tok_encode(context) or [self.prefix_token_id]
            return encoded[context]

        collator = Collator([req.args for req in requests], sort_fn=lambda x: (-len(encode(x[0])), x[0]),
                            group_by="gen_kwargs", group_fn=lambda x: x[1])
        out = []
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = self._gen_kwargs(all_kwargs[0])
            until, max_new = kwargs.pop("until"), kwargs.pop("max_gen_toks")
            prompts = [encode(c) for c in contexts]
            if self.grows:  # the Transformer keeps max_length tokens: the context is cut from the left
                room = self.max_length - max_new
                if room < 1:
                    raise UserError(f"openxlstm model: max_gen_toks = {max_new} leaves no room for a context in "
                                    f"max_length = {self.max_length}")
                prompts = [p[-room:] for p in prompts]
            stop = until[0] if until else None
            rows = generate(self.model, prompts, self.tok, max_new_tokens=max_new, stop=stop, **kwargs)
            for context, gen_kwargs, new in zip(contexts, all_kwargs, rows):
                text = self._cut(new, until)
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return collator.get_original(out)

    def _gen_kwargs(self, gen_kwargs: dict) -> dict:
        """lm-eval's generation arguments -> ``generate``'s: until (a list, empty strings dropped),
        max_gen_toks, temperature (0: greedy), top_k, top_p."""
        if not isinstance(gen_kwargs, dict):
            raise UserError(f"openxlstm model: generation arguments must be a dict, got {gen_kwargs!r}")
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            raise UserError(f"openxlstm model: generation argument(s) {unknown} are not supported; allowed: "
                            f"{', '.join(GEN_KWARGS)} (and max_new_tokens for max_gen_toks)")
        until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=None) if s]
        if not all(isinstance(s, str) for s in until):
            raise UserError(f"openxlstm model: until must be text (a string or a list of strings), got {until!r}")
        sampled = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if sampled else 0.0))
        out = {"until": until, "max_gen_toks": _positive_int(kwargs.pop("max_gen_toks"), "max_gen_toks"),
               "temperature": temperature if sampled else 0.0}
        top_k, top_p = kwargs.get("top_k"), kwargs.get("top_p")
        if not temperature >= 0 or (top_k is not None and int(top_k) < 1) or \
                (top_p is not None and not 0 < float(top_p) <= 1):
            raise UserError(f"openxlstm model: generation needs temperature >= 0, top_k >= 1 and top_p in (0, 1], "
                            f"got temperature={temperature}, top_k={top_k}, top_p={top_p}")
        if sampled:
            if top_k is not None:
                out["top_k"] = int(top_k)
            if top_p is not None:
                out["top_p"] = float(top_p)
        return out

    def _cut(self, new: list[int], until: list[str]) -> str:
        """The text of generated ids up to the first end-of-document token, then up to the first stop string."""
        eod = getattr(self.tok, "eod_id", None)
        if eod is not None and eod in new:
            new = new[:new.index(eod)]
        text = self.tok_decode(new)
        for stop in until:
            text = text.split(stop)[0]
        return text


class _Batch:
    """Inputs placed into rows: ``placements`` (index into the lengths, row, offset), rows of ``seq_len``."""

    __slots__ = ("seq_len", "placements")

    def __init__(self, seq_len: int, placements: list[tuple[int, int, int]]):
        self.seq_len, self.placements = seq_len, placements


def _packed_batches(lengths: Sequence[int], max_rows: int):
    """Batches of inputs of ``lengths`` (sorted longest first): each batch's rows are as long as its first
    input, and every input goes into the first of at most ``max_rows`` rows where it fits (first fit
    decreasing); a batch ends when the next input fits in none."""
    placements: list[tuple[int, int, int]] = []
    fill: list[int] = []
    seq_len = 0
    for i, n in enumerate(lengths):
        row = next((r for r, used in enumerate(fill) if used + n <= seq_len), None)
        if row is None:
            if len(fill) == max_rows:
                yield _Batch(seq_len, placements)
                placements, fill = [], []
            if not fill:
                seq_len = n
            row = len(fill)
            fill.append(0)
        placements.append((i, row, fill[row]))
        fill[row] += n
    if placements:
        yield _Batch(seq_len, placements)


__all__ = ["OpenXLSTMLM"]
