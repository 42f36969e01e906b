"""xLSTM-7B ("xLSTM Large"): an mLSTM-only language model of post-up residual blocks, the
architecture of the checkpoints published with Hugging Face ``transformers`` (``xLSTMForCausalLM``) and of
the authors' ``xlstm_large``.

    x = embeddings(ids)                                                      (B, S, E)
    for each block:  x = x + mLSTMLayer(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))
    logits = cap * tanh(lm_head(RMSNorm(x)) / cap)                           (B, S, V), float32

Parameter names are those of transformers' checkpoints (``backbone.blocks.3.mlstm_layer.q.weight``), so a
transformers state dict loads and saves without renaming. The cell is ``openxlstm.ops.mlstm`` with every
backend (Triton on CUDA); its conventions (1/sqrt(d_qk) on q, eps added to max(|q.n|, exp(-m))) are those
of transformers' kernels; our stabilizer floor (M_FLOOR) changes an output by at most eps * exp(-10)
relative. The recurrent state is float32 whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..config import ConfigIO, check_field_types
from ..layers.common import MultiHeadNorm, RMSNorm, run_block, small_init_, wang_init_
from ..layers.head import LMOutput, check_input_ids
from ..ops.backends import Backends
from ..ops.cross_entropy import IGNORE_INDEX, linear_cross_entropy
from ..ops.mlstm import mLSTMState, mlstm, mlstm_decode
from ..ops.varlen import check_cu_seqlens
from .base import LanguageModel


def round_up_to_multiple(x: float, multiple: int) -> int:
    """x rounded up to a multiple of ``multiple``, computed as transformers does ((x + m - 1) // m * m), so
    that a float x such as 4096 * 2.667 gives the same width."""
    return int(((x + multiple - 1) // multiple) * multiple)


def soft_cap(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """cap * tanh(x / cap): x squashed smoothly into (-cap, cap); None leaves x unchanged."""
    return x if cap is None else cap * torch.tanh(x / cap)


@dataclass
class xLSTMLargeConfig(ConfigIO):
    """The shape of an xLSTM-7B-style model, with the field names of transformers' ``xLSTMConfig``.

    Derived widths: ``qk_dim = int(hidden_size * qk_dim_factor)`` and ``v_dim = int(hidden_size *
    v_dim_factor)`` (split over ``num_heads``, not rounded), ``ffn_dim = hidden_size * ffn_proj_factor``
    rounded up to ``ffn_round_up_to_multiple_of``. ``max_inference_chunksize``: without gradients, sequences
    run through the blocks in pieces of this many tokens (memory bounded, results unchanged).
    Kernel choices are not config fields: see ``xLSTMLargeLM.set_backends``.
    """

    vocab_size: int = 50304
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_heads: int = 8
    use_bias: bool = False
    norm_eps: float = 1e-6
    norm_reduction_force_float32: bool = True
    add_out_norm: bool = True
    tie_word_embeddings: bool = False
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    eps: float = 1e-6  # of the mLSTM cell's normalizer
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64
    gate_soft_cap: Optional[float] = 15.0
    output_logit_soft_cap: Optional[float] = 30.0
    weight_mode: str = "single"  # "single": q, k, v, gates as separate matrices; "fused": one matrix each
    max_inference_chunksize: int = 16384
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[Union[int, list]] = 2

    def __post_init__(self):
        check_field_types(self)  # strict: use_bias="no" is an error, not true
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "ffn_round_up_to_multiple_of",
                     "max_inference_chunksize"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"xLSTMLargeConfig: {name} must be a positive int, got {value!r}")
        if self.weight_mode not in ("single", "fused"):
            raise ValueError(f"xLSTMLargeConfig: weight_mode must be 'single' or 'fused', got {self.weight_mode!r}")
        for name in ("gate_soft_cap", "output_logit_soft_cap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"xLSTMLargeConfig: {name} must be positive or None (no cap), got {value!r}")
        for name, dim in (("qk_dim", self.qk_dim), ("v_dim", self.v_dim)):
            if dim < self.num_heads or dim % self.num_heads:
                raise ValueError(f"xLSTMLargeConfig: {name} = int(hidden_size * {name[:-4]}_dim_factor) = {dim} must be "
                                 f"a positive multiple of num_heads = {self.num_heads}")

    @property
    def qk_dim(self) -> int:
        return int(self.hidden_size * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.hidden_size * self.v_dim_factor)

    @property
    def ffn_dim(self) -> int:
        return round_up_to_multiple(self.hidden_size * self.ffn_proj_factor, self.ffn_round_up_to_multiple_of)


class mLSTMLargeLayer(nn.Module):
    """q, k (qk_dim), v and the output gate (v_dim), and one input and one forget gate per head, all linear in
    x; gates soft-capped; the mLSTM cell over heads; per-head LayerNorm; sigmoid output gate; out projection.

    weight_mode "single" keeps each projection as its own matrix (q, k, v, ogate_preact, igate_preact,
    fgate_preact); "fused" stacks them as rows of two (qkv_opreact = [q; k; v; o], ifgate_preact = [i; f]).
    The gate projections always have a bias; the others only with ``use_bias``.
    """

    def __init__(self, config: xLSTMLargeConfig):
        super().__init__()
        E, NH, QK, V = config.hidden_size, config.num_heads, config.qk_dim, config.v_dim
        self.config = config
        self.num_heads, self.qk_dim, self.v_dim = NH, QK, V
        bias = config.use_bias
        if config.weight_mode == "single":
            self.q = nn.Linear(E, QK, bias=bias)
            self.k = nn.Linear(E, QK, bias=bias)
            self.v = nn.Linear(E, V, bias=bias)
            self.ogate_preact = nn.Linear(E, V, bias=bias)
            self.igate_preact = nn.Linear(E, NH, bias=True)
            self.fgate_preact = nn.Linear(E, NH, bias=True)
        else:
            self.qkv_opreact = nn.Linear(E, 2 * QK + 2 * V, bias=bias)
            self.ifgate_preact = nn.Linear(E, 2 * NH, bias=True)
        self.multihead_norm = MultiHeadNorm(NH, V // NH, config.norm_eps, bias, config.norm_reduction_force_float32)
        self.out_proj = nn.Linear(V, E, bias=bias)

    def reset_parameters(self):
        """transformers' initialization: small init for the projections, wang init for out_proj, gate weights
        zero, input-gate bias -10, forget-gate bias linspace(3, 6) over heads, other biases zero."""
        E, L, NH = self.config.hidden_size, self.config.num_hidden_layers, self.num_heads
        if self.config.weight_mode == "single":
            projections, gates = (self.q, self.k, self.v, self.ogate_preact), (self.igate_preact, self.fgate_preact)
        else:
            projections, gates = (self.qkv_opreact,), (self.ifgate_preact,)
        for lin in projections:
            small_init_(lin.weight, E)
        wang_init_(self.out_proj.weight, E, L)
        for lin in (*projections, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        gate_bias = torch.cat([torch.full((NH,), -10.0), torch.linspace(3.0, 6.0, NH)])  # [i; f]
        with torch.no_grad():
            for lin, b in zip(gates, gate_bias.split(gates[0].bias.shape[0])):
                nn.init.zeros_(lin.weight)
                lin.bias.copy_(b)
        self.multihead_norm.reset_parameters()

    def _projections(self, x: torch.Tensor):
        """x (B, S, E) -> q, k (B, S, QK), v, o (B, S, V), soft-capped gates i, f (B, S, NH)."""
        NH, QK, V = self.num_heads, self.qk_dim, self.v_dim
        cap = self.config.gate_soft_cap
        if self.config.weight_mode == "single":
            q, k, v, o = self.q(x), self.k(x), self.v(x), self.ogate_preact(x)
            i, f = soft_cap(self.igate_preact(x), cap), soft_cap(self.fgate_preact(x), cap)
        else:
            q, k, v, o = self.qkv_opreact(x).split([QK, QK, V, V], dim=-1)
            i, f = soft_cap(self.ifgate_preact(x), cap).split([NH, NH], dim=-1)
        return q, k, v, o, i, f

    def init_state(self, batch_size: int, device=None) -> mLSTMState:
        """Zeros in float32: C (B, NH, QK/NH, V/NH), n (B, NH, QK/NH), m (B, NH)."""
        NH = self.num_heads
        f32 = dict(device=device if device is not None else self.out_proj.weight.device, dtype=torch.float32)
        return mLSTMState(torch.zeros(batch_size, NH, self.qk_dim // NH, self.v_dim // NH, **f32),
                          torch.zeros(batch_size, NH, self.qk_dim // NH, **f32), torch.zeros(batch_size, NH, **f32))

    def forward(self, x: torch.Tensor, state: Optional[mLSTMState] = None, cu_seqlens: Optional[torch.Tensor] = None,
                *, backends: Backends = Backends()):
        """x: (B, S, E) (normalized) -> (y (B, S, E), new mLSTMState (float32)); cu_seqlens: packed documents."""
        B, S, _ = x.shape
        q, k, v, o, i, f = self._projections(x)

        def heads(t):  # (B, S, NH * d) -> (B, NH, S, d)
            return t.view(B, S, self.num_heads, -1).transpose(1, 2)

        h, cell = mlstm(heads(q), heads(k), heads(v), i.transpose(1, 2), f.transpose(1, 2), state,
                        backend=backends.mlstm, chunk_size=backends.chunk_size, eps=self.config.eps,
                        return_state=True, cu_seqlens=cu_seqlens)
        return self.out_proj(torch.sigmoid(o) * self.multihead_norm(h.transpose(1, 2))), cell

    def step(self, x: torch.Tensor, state: Optional[mLSTMState], *, backends: Backends = Backends()):
        """One token per sequence: x (B, 1, E) -> (y (B, 1, E), new state), with the cell's fused step."""
        B, NH = x.shape[0], self.num_heads
        q, k, v, o, i, f = self._projections(x)
        h, cell = mlstm_decode(q.view(B, NH, -1), k.view(B, NH, -1), v.view(B, NH, -1), i.view(B, NH),
                               f.view(B, NH), state, backend=backends.mlstm, eps=self.config.eps)
        return self.out_proj(torch.sigmoid(o) * self.multihead_norm(h[:, None])), cell


class SwiGLU(nn.Module):
    """proj_down(SiLU(gate(x)) * up(x)) with inner width ffn_dim; "fused" stacks [gate; up] in proj_up_gate_z."""

    def __init__(self, config: xLSTMLargeConfig):
        super().__init__()
        E, Fd, bias = config.hidden_size, config.ffn_dim, config.use_bias
        self.config, self.ffn_dim = config, Fd
        if config.weight_mode == "single":
            self.proj_up_gate = nn.Linear(E, Fd, bias=bias)
            self.proj_up = nn.Linear(E, Fd, bias=bias)
        else:
            self.proj_up_gate_z = nn.Linear(E, 2 * Fd, bias=bias)
        self.proj_down = nn.Linear(Fd, E, bias=bias)

    def reset_parameters(self):
        E, L = self.config.hidden_size, self.config.num_hidden_layers
        ups = (self.proj_up_gate, self.proj_up) if self.config.weight_mode == "single" else (self.proj_up_gate_z,)
        for lin in ups:
            small_init_(lin.weight, E)
        wang_init_(self.proj_down.weight, self.ffn_dim, L)
        for lin in (*ups, self.proj_down):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, S, E) -> (B, S, E)."""
        if self.config.weight_mode == "single":
            gate, up = self.proj_up_gate(x), self.proj_up(x)  # (B, S, F) each
        else:
            gate, up = self.proj_up_gate_z(x).split([self.ffn_dim, self.ffn_dim], dim=-1)
        return self.proj_down(F.silu(gate) * up)


class xLSTMLargeBlock(nn.Module):
    """x <- x + mLSTM(RMSNorm(x)); x <- x + SwiGLU(RMSNorm(x))."""

    def __init__(self, config: xLSTMLargeConfig):
        super().__init__()
        f32 = config.norm_reduction_force_float32
        self.norm_mlstm = RMSNorm(config.hidden_size, config.norm_eps, config.use_bias, f32)
        self.mlstm_layer = mLSTMLargeLayer(config)
        self.norm_ffn = RMSNorm(config.hidden_size, config.norm_eps, config.use_bias, f32)
        self.ffn = SwiGLU(config)

    def reset_parameters(self):
        for module in (self.norm_mlstm, self.mlstm_layer, self.norm_ffn, self.ffn):
            module.reset_parameters()

    def forward(self, x: torch.Tensor, state: Optional[mLSTMState], backends: Backends,
                cu_seqlens: Optional[torch.Tensor] = None, step: bool = False):
        """x: (B, S, E) -> (x, new state); ``step``: one token per row through the layer's step."""
        h = self.norm_mlstm(x)
        y, state = (self.mlstm_layer.step(h, state, backends=backends) if step else
                    self.mlstm_layer(h, state, cu_seqlens, backends=backends))
        x = x + y
        return x + self.ffn(self.norm_ffn(x)), state


class xLSTMLargeBackbone(nn.Module):
    """Embeddings, the blocks and the output norm (a module of its own for the checkpoints' ``backbone.``)."""

    def __init__(self, config: xLSTMLargeConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(xLSTMLargeBlock(config) for _ in range(config.num_hidden_layers))
        # transformers' output norm has no bias whatever use_bias says
        self.out_norm = (RMSNorm(config.hidden_size, config.norm_eps, False, config.norm_reduction_force_float32)
                         if config.add_out_norm else nn.Identity())


def soft_capped_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cap: Optional[float],
                              chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Mean cross-entropy of ``soft_cap(h @ weight.T, cap)`` (float32 logits, float64 for a float64 model)
    against ``labels`` (-100 ignored).

    Without a cap this is ``ops.cross_entropy.linear_cross_entropy``. With one, the rows go in chunks, each
    under activation checkpointing: a chunk's (n, V) logits exist only while that chunk's loss, or later its
    gradient, is computed, so no (N, V) tensor is ever held. h: (..., E); weight: (V, E); labels: h's (...).
    """
    if cap is None:
        return linear_cross_entropy(h, weight, labels)
    h2, lab = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    chunk = chunk_rows or max(1, (1 << 25) // weight.shape[0])  # about 2**25 logits (128 MB float32) a chunk
    keep_graph = torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad)
    total = h2.new_zeros((), dtype=torch.promote_types(h2.dtype, torch.float32))
    for s in range(0, h2.shape[0], chunk):
        args = (h2[s:s + chunk], weight, lab[s:s + chunk], cap)
        total = total + (torch.utils.checkpoint.checkpoint(_chunk_loss_sum, *args, use_reentrant=False)
                         if keep_graph else _chunk_loss_sum(*args))
    return total / (lab != IGNORE_INDEX).sum().clamp(min=1)


def _chunk_loss_sum(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cap: float) -> torch.Tensor:
    logits = F.linear(h, weight)
    logits = soft_cap(logits.to(torch.promote_types(logits.dtype, torch.float32)), cap)  # (n, V), float32 or more
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


class xLSTMLargeLM(LanguageModel):
    """xLSTM-7B-style language model. ``forward(input_ids, state=None, return_state=False, labels=None,
    return_logits=False)`` like every model of the package: logits (B, S, V) in float32 (soft-capped), or
    (logits, state), or with ``labels`` an ``LMOutput``. The state is one float32 ``mLSTMState`` (C, n, m)
    per block; passing it back continues the sequence exactly, and it is never modified.

    Load checkpoints with ``openxlstm.from_pretrained``; ``save_pretrained(directory, max_shard_size="5GB",
    overwrite=False)`` writes transformers' format (``openxlstm.io.hf``), which transformers reads back.
    ``tokenizer`` is the checkpoint's tokenizer when it had one (used by ``generate``), else None.
    """

    config_class = xLSTMLargeConfig

    def __init__(self, config: xLSTMLargeConfig, backends: Optional[Backends] = None):
        super().__init__(config)
        self.backends = backends or Backends()
        self.backbone = xLSTMLargeBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self.reset_parameters()

    def reset_parameters(self):
        """transformers' initialization of xLSTM (small init, wang init, gate biases -10 and 3..6)."""
        E = self.config.hidden_size
        small_init_(self.backbone.embeddings.weight, E)
        if not self.config.tie_word_embeddings:
            small_init_(self.lm_head.weight, E)
        for block in self.backbone.blocks:
            block.reset_parameters()
        if isinstance(self.backbone.out_norm, RMSNorm):
            self.backbone.out_norm.reset_parameters()

    @property
    def blocks(self) -> nn.ModuleList:
        """The residual blocks (``backbone.blocks``): the units that FSDP shards one by one."""
        return self.backbone.blocks

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings

    def init_state(self, batch_size: int, device=None) -> tuple[mLSTMState, ...]:
        """One zero float32 mLSTMState per block."""
        return tuple(block.mlstm_layer.init_state(batch_size, device) for block in self.backbone.blocks)

    def _check(self, input_ids: torch.Tensor, state) -> None:
        check_input_ids("xLSTMLargeLM", input_ids, self.config.vocab_size)
        if state is None:
            return
        blocks = len(self.backbone.blocks)
        if len(state) != blocks:
            raise ValueError(f"xLSTMLargeLM: state must hold one (C, n, m) per block ({blocks}), got {len(state)}")
        for j, s in enumerate(state):
            if len(s) != 3 or s[0].shape[0] != input_ids.shape[0]:
                raise ValueError(f"xLSTMLargeLM: state[{j}] must be (C, n, m) with batch size {input_ids.shape[0]}")

    def hidden_states(self, input_ids: torch.Tensor, state: Optional[Sequence[mLSTMState]] = None,
                      last_only: bool = False, cu_seqlens: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, tuple[mLSTMState, ...]]:
        """(final-norm hidden states (B, S, E), or (B, 1, E) of the last position with ``last_only``; new state).

        Without gradients the sequence goes through all blocks in pieces of ``max_inference_chunksize``
        tokens, carrying the state, so activation memory is bounded whatever the length (packed documents,
        ``cu_seqlens``, go in one piece).
        """
        S = input_ids.shape[1]
        piece = S if torch.is_grad_enabled() or cu_seqlens is not None else self.config.max_inference_chunksize
        states = [None] * len(self.backbone.blocks) if state is None else list(state)
        backends = self.backends.resolve(input_ids.device)
        step = S == 1 and cu_seqlens is None and not torch.is_grad_enabled()
        outs = []
        for s in range(0, S, piece):
            x = self.backbone.embeddings(input_ids[:, s:s + piece])  # (B, piece, E)
            for j, block in enumerate(self.backbone.blocks):
                x, states[j] = run_block(block, self.activation_checkpointing, x, states[j], backends, cu_seqlens,
                                         step)
            outs.append(x[:, -1:] if last_only else x)
        x = outs[-1] if last_only or len(outs) == 1 else torch.cat(outs, dim=1)
        return self.backbone.out_norm(x), tuple(states)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., E) -> soft-capped logits (..., V) in float32 (float64 for a float64 model)."""
        logits = self.lm_head(hidden)
        return soft_cap(logits.to(torch.promote_types(logits.dtype, torch.float32)), self.config.output_logit_soft_cap)

    def forward(self, input_ids: torch.Tensor, state: Optional[Sequence[mLSTMState]] = None,
                return_state: bool = False, labels: Optional[torch.Tensor] = None, return_logits: bool = False,
                logits_to_keep: int = 0, cu_seqlens: Optional[torch.Tensor] = None):
        """input_ids: (B, S) -> logits (B, S, V), or (logits, state) with ``return_state=True``;
        ``logits_to_keep=1`` (generation's prefill) keeps the last position only and, without gradients,
        runs long prompts in pieces of ``max_inference_chunksize`` tokens.

        With ``labels`` (B, S) (the next token of each position, -100 where nothing is scored) the result is
        an ``LMOutput`` whose mean loss comes from the soft-capped logits, computed in chunks of rows (see
        ``soft_capped_cross_entropy``); ``logits`` only with ``return_logits=True``, ``state`` only with
        ``return_state=True``. ``cu_seqlens``: packed documents, as ``xLSTMLM.forward``.
        """
        self._check(input_ids, state)
        if cu_seqlens is not None:
            check_cu_seqlens("xLSTMLargeLM", cu_seqlens, *input_ids.shape, input_ids.device)
        last_only = labels is None and logits_to_keep == 1
        hidden, new_state = self.hidden_states(input_ids, state, last_only=last_only, cu_seqlens=cu_seqlens)
        if labels is None:
            logits = self.logits(hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden)
            return (logits, new_state) if return_state else logits
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        loss = soft_capped_cross_entropy(hidden, self.lm_head.weight, labels, self.config.output_logit_soft_cap)
        return LMOutput(loss=loss, logits=self.logits(hidden) if return_logits else None,
                        state=new_state if return_state else None, num_tokens=(labels != IGNORE_INDEX).sum())


__all__ = ["xLSTMLargeConfig", "xLSTMLargeLM", "xLSTMLargeBlock", "mLSTMLargeLayer", "SwiGLU",
           "soft_cap", "soft_capped_cross_entropy", "round_up_to_multiple"]
