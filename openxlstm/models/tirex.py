"""TiRex, the sLSTM time-series forecaster, on openxlstm's layers and sLSTM op.

Data flow of one forecast window (B series, L values, patch P, Q quantile levels, E model width):

    values (B, L), NaN = missing
    -> scaled by each series' NaN-aware mean and std               (B, L)      ``scale_stats``
    -> patches of P values + P mask values (1 = observed, NaN -> 0)  (B, N, 2P)  ``tokenize``, N = L / P
    -> residual MLP patch embedding                               (B, N, E)
    -> num_blocks x [x + sLSTM(RMSNorm(x)); x + SwiGLU(RMSNorm(x))]  (B, N, E)
    -> RMSNorm, residual MLP quantile head                        (B, N, Q, P)
    -> output n is the forecast of patch n + 1, in scaled units; rescaled by the series' mean and std.

The sLSTM layer has no convolution: head-wise (block-diagonal) projections of the block input give the gate
pre-activations [i | f | z | o], the cell is ``openxlstm.ops.slstm.slstm`` (any backend), and a per-head
norm follows. Two details of TiRex's cell need nothing here: its first-step rule (m = i while the
normalizer is zero, tested once for the whole batch) is ours, because from the zero initial state every
element has n = 0 at the first step and n >= 1 afterwards; and it clamps the forget pre-activation at 15
before the log-sigmoid, which changes log f by less than 3.1e-7 (log-sigmoid(15)): below float32 rounding
of the stabilizer (forecasts with every forget gate saturated agree with TiRex's to 4e-7, as unsaturated
ones do; tests/forecasting).

Forecasting beyond one patch appends a patch of missing values per predicted patch. ``rollout="window"``
(TiRex's way) runs the whole window again for every new patch, the window sliding once it is longer than
the context; ``rollout="state"`` runs the window once and then one sLSTM step per new patch from the
carried states (the cost of one token instead of N). The two differ where the window would slide or where
a padded window would lose a leading padding patch (see docs/forecasting.md for the measured gap).

Training (``forward`` with ``labels``): labels are float targets aligned with the input values, label
position n*P + j holding value j of the patch that output n forecasts; NaN where nothing is scored. The loss
is the pinball (quantile) loss in scaled units, averaged over quantile levels and scored values.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..layers import BlockDiagonalLinear, MultiHeadNorm, RMSNorm
from ..ops.slstm import BACKENDS as SLSTM_BACKENDS
from ..ops.slstm import slstm
from .base import Model

SCALE_EPS = 1e-5  # a series with zero spread is scaled by |mean| + SCALE_EPS
RMS_EPS = 1e-6
HEAD_NORM_EPS = 1e-5
ROLLOUTS = ("window", "state")
MATMULS = ("float32", "bfloat16")


def _default_quantiles() -> list[float]:
    return [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


@dataclass
class TiRexConfig:
    """TiRex: patches of ``patch_size`` values in and out, ``num_blocks`` sLSTM blocks of width
    ``embedding_dim`` with ``num_heads`` heads, a quantile head for ``quantiles``.

    patch_size: values per token, in (with as many mask values) and out (per quantile).
    embedding_dim, num_heads, num_blocks: the residual stack of sLSTM blocks (head width E / NH).
    ffn_proj_factor: SwiGLU hidden width = embedding_dim * factor rounded up to a multiple of 64.
    input_ff_dim: hidden width of the residual MLPs of the patch embedding and the quantile head.
    quantiles: the levels the head predicts, increasing in (0, 1); 0.5 is among them (the point forecast).
    train_ctx_len: values of context per forecast window (a multiple of patch_size); longer contexts are cut
        to their last train_ctx_len values unless the caller asks for more.
    pad_context: left-pad shorter contexts with missing values to train_ctx_len, as TiRex was trained (True,
        TiRex checkpoints); False: no padding, each series starts the recurrence at its own first patch
        (models trained here on packed series).
    """

    patch_size: int = 32
    embedding_dim: int = 512
    num_heads: int = 4
    num_blocks: int = 12
    ffn_proj_factor: float = 2.6667
    input_ff_dim: int = 2048
    quantiles: list = field(default_factory=_default_quantiles)
    train_ctx_len: int = 2048
    pad_context: bool = True

    vocab_size = None  # not a field: a forecaster reads values, so the engine's checkpoints record no vocabulary

    def __post_init__(self):
        for name in ("patch_size", "embedding_dim", "num_heads", "num_blocks", "input_ff_dim", "train_ctx_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TiRexConfig: {name} must be a positive integer, got {value!r}")
        if self.embedding_dim % self.num_heads:
            raise ValueError(f"TiRexConfig: embedding_dim {self.embedding_dim} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.train_ctx_len % self.patch_size:
            raise ValueError(f"TiRexConfig: train_ctx_len {self.train_ctx_len} is not a multiple of patch_size "
                             f"{self.patch_size}")
        f = self.ffn_proj_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
            raise ValueError(f"TiRexConfig: ffn_proj_factor must be a positive number, got {f!r}")
        if not isinstance(self.pad_context, bool):
            raise ValueError(f"TiRexConfig: pad_context must be true or false, got {self.pad_context!r}")
        q = self.quantiles
        if (not isinstance(q, (list, tuple)) or not q or
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in q)):
            raise ValueError(f"TiRexConfig: quantiles must be a non-empty list of levels in (0, 1), got {q!r}")
        if any(b <= a for a, b in zip(q, q[1:])):
            raise ValueError(f"TiRexConfig: quantiles must be increasing, got {list(q)}")
        if 0.5 not in q:
            raise ValueError(f"TiRexConfig: quantiles must include 0.5 (the point forecast), got {list(q)}")
        self.quantiles = [float(v) for v in q]

    @property
    def head_dim(self) -> int:
        return self.embedding_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden width: embedding_dim * ffn_proj_factor rounded up to a multiple of 64."""
        return int(math.ceil(self.embedding_dim * self.ffn_proj_factor / 64) * 64)

    @property
    def median_index(self) -> int:
        return self.quantiles.index(0.5)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TiRexConfig":
        if not isinstance(d, dict):
            raise ValueError(f"TiRexConfig: expected a JSON object of config fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TiRexConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)


PRESETS = {
    "tirex-35m": {},  # the published TiRex (35.3M parameters)
    "small": dict(embedding_dim=128, num_heads=4, num_blocks=4, input_ff_dim=256, train_ctx_len=512,
                  pad_context=False),
    "tiny": dict(embedding_dim=64, num_heads=2, num_blocks=2, input_ff_dim=128, patch_size=16, train_ctx_len=256,
                 pad_context=False),
}


def preset(name: str) -> TiRexConfig:
    """A named configuration: "tirex-35m" (the published model), "small" (1M parameters), "tiny"."""
    if name not in PRESETS:
        raise ValueError(f"unknown TiRex preset {name!r}; choose one of {sorted(PRESETS)}")
    return TiRexConfig(**PRESETS[name])


# -- input and output conventions ---------------------------------------------------------------------------
def scale_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-aware location and scale of each row of x (B, L): (loc (B, 1), scale (B, 1)).

    loc is the mean of the observed values (0 when none), scale their standard deviation (1 when none;
    |loc| + SCALE_EPS when it is 0)."""
    loc = torch.nan_to_num(torch.nanmean(x, dim=-1, keepdim=True), nan=0.0)
    scale = torch.nan_to_num(torch.nanmean((x - loc).square(), dim=-1, keepdim=True).sqrt(), nan=1.0)
    return loc, torch.where(scale == 0, loc.abs() + SCALE_EPS, scale)


def segment_scale_stats(x: torch.Tensor, segment: torch.Tensor, num_segments: int) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
    """``scale_stats`` per segment of packed values: x (B, L) and segment (B, L) int64 in [0, num_segments).
    Returns loc, scale (B, L): each position's segment's statistics."""
    flat, seg = x.reshape(-1), segment.reshape(-1)
    seen = ~torch.isnan(flat)
    zero = flat.new_zeros(num_segments)
    count = zero.index_add(0, seg, seen.to(flat.dtype))
    total = zero.index_add(0, seg, torch.where(seen, flat, 0.0))
    loc = torch.where(count > 0, total / count.clamp(min=1), 0.0)
    dev = torch.where(seen, flat - loc[seg], 0.0)
    var = zero.index_add(0, seg, dev.square()) / count.clamp(min=1)
    scale = torch.where(count > 0, var.sqrt(), 1.0)
    scale = torch.where(scale == 0, loc.abs() + SCALE_EPS, scale)
    return loc[seg].view_as(x), scale[seg].view_as(x)


def tokenize(scaled: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Scaled values (B, L), L a multiple of patch_size -> tokens (B, L / P, 2P): [values with NaN as 0 |
    mask, 1 where observed]."""
    patches = scaled.unflatten(-1, (-1, patch_size))  # (B, N, P)
    mask = (~torch.isnan(patches)).to(patches.dtype)
    return torch.cat([torch.nan_to_num(patches, nan=0.0), mask], dim=-1)


def pinball_loss(pred: torch.Tensor, target: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantile loss summed over levels and scored targets, and the number of scored targets.

    pred (..., Q, P), target (..., P) with NaN where nothing is scored, levels (Q,). The loss of level q at a
    target y and prediction p is max(q (y - p), (q - 1)(y - p)).
    """
    scored = ~torch.isnan(target)
    diff = torch.nan_to_num(target, nan=0.0).unsqueeze(-2) - pred  # (..., Q, P)
    q = levels.view(-1, 1).to(pred.dtype)
    loss = torch.maximum(q * diff, (q - 1) * diff)
    return torch.where(scored.unsqueeze(-2), loss, 0.0).sum(), scored.sum()


def _float_array(s, what: str) -> np.ndarray:
    try:
        return np.asarray(s.detach().cpu() if isinstance(s, torch.Tensor) else s, dtype=np.float32)
    except (TypeError, ValueError):
        raise UserError(f"forecast: {what} must hold numbers (NaN for missing values)") from None


def as_series_batch(context, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of series from a tensor or array (L,) or (B, L), or a list of 1-D series of any lengths.

    Returns values (B, Lmax) float32, shorter series left-padded with NaN, and lengths (B,) int64 (each
    series' own length; the missing values inside a series count). Raises UserError for anything else.
    """
    if isinstance(context, (list, tuple)):
        if not context:
            raise UserError("forecast: the context is an empty list; pass at least one series")
        rows = [torch.from_numpy(_float_array(s, f"series {j}")) for j, s in enumerate(context)]
        for j, r in enumerate(rows):
            if r.dim() != 1 or r.numel() == 0:
                raise UserError(f"forecast: series {j} must be a non-empty 1-D sequence of numbers, got shape "
                                f"{tuple(r.shape)}")
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        out = torch.full((len(rows), int(lengths.max())), math.nan, dtype=torch.float32)
        for j, r in enumerate(rows):
            out[j, out.shape[1] - len(r):] = r
        return out.to(device), lengths.to(device)
    if isinstance(context, (np.ndarray, torch.Tensor)):
        if isinstance(context, torch.Tensor):
            t = context.detach().to(device=device, dtype=torch.float32)
        else:
            t = torch.from_numpy(_float_array(context, "the context")).to(device)
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
            raise UserError(f"forecast: a context tensor must have shape (L,) or (B, L) with B, L >= 1, got "
                            f"{tuple(context.shape)}")
        return t, torch.full((t.shape[0],), t.shape[1], dtype=torch.int64, device=device)
    raise UserError(f"forecast: the context must be a tensor, an array or a list of 1-D series, got "
                    f"{type(context).__name__}")


# -- layers ----------------------------------------------------------------------------------------------
class ResidualMLP(nn.Module):
    """out(relu(hidden(x))) + skip(x): TiRex's patch embedding (2P -> E) and quantile head (E -> Q*P)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.hidden = nn.Linear(in_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, out_dim)
        self.skip = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.hidden(x))) + self.skip(x)


class SwiGLU(nn.Module):
    """down(silu(g) * u) with [g | u] = up(x): E -> 2F -> F -> E, no biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.up = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class TiRexsLSTM(nn.Module):
    """The sLSTM layer without convolution: x (B, S, E) -> per-head norm of the cell's h (B, S, E).

    igate, fgate, zgate, ogate: head-wise projections of x to the cell's gates in the order [i | f | z | o]
    (computed together as one batched product, straight into the cell's gate-major layout);
    recurrent: R (NH, d, 4, d); bias: (4E,) gate-major; norm: per-head LayerNorm without bias, weight (E,).
    """

    def __init__(self, config: TiRexConfig):
        super().__init__()
        E, NH = config.embedding_dim, config.num_heads
        self.num_heads, self.head_dim = NH, E // NH
        self.igate, self.fgate = BlockDiagonalLinear(E, NH), BlockDiagonalLinear(E, NH)
        self.zgate, self.ogate = BlockDiagonalLinear(E, NH), BlockDiagonalLinear(E, NH)
        self.recurrent = nn.Parameter(torch.zeros(NH, E // NH, 4, E // NH))
        self.bias = nn.Parameter(torch.zeros(4 * E))
        self.norm = MultiHeadNorm(NH, E // NH, eps=HEAD_NORM_EPS)

    def forward(self, x: torch.Tensor, state=None, cu_seqlens: Optional[torch.Tensor] = None,
                backend: str = "auto", float32_cell: bool = False):
        """x (B, S, E), state: the cell's (h, c, n, m) or None; cu_seqlens in tokens. -> (y, new state).
        float32_cell: the cell runs in float32 outside any autocast (projections may be bfloat16)."""
        B, S, _ = x.shape
        NH, d = self.num_heads, self.head_dim
        w = torch.stack([g.weight for g in (self.igate, self.fgate, self.zgate, self.ogate)], dim=1)  # (NH, 4, d, d)
        pre = torch.einsum("bshi,hgoi->bsgho", x.view(B, S, NH, d), w).reshape(B, S, 4 * NH * d)  # (B, S, 4E)
        kw = dict(backend=backend, return_state=True, cu_seqlens=cu_seqlens)
        if float32_cell:
            with torch.autocast(x.device.type, enabled=False):
                h, new_state = slstm(pre.float(), self.recurrent.float(), self.bias.float(), state, **kw)
        else:
            h, new_state = slstm(pre, self.recurrent, self.bias, state, **kw)
        return self.norm(h.view(B, S, self.num_heads, self.head_dim)), new_state


class TiRexBlock(nn.Module):
    """x + sLSTM(RMSNorm(x)), then + SwiGLU(RMSNorm(x)); x (B, S, E)."""

    def __init__(self, config: TiRexConfig):
        super().__init__()
        E = config.embedding_dim
        self.norm_slstm = RMSNorm(E, eps=RMS_EPS)
        self.slstm = TiRexsLSTM(config)
        self.norm_ffn = RMSNorm(E, eps=RMS_EPS)
        self.ffn = SwiGLU(E, config.ffn_dim)

    def forward(self, x, state=None, cu_seqlens=None, backend="auto", keep_last: Optional[int] = None,
                float32_cell: bool = False):
        """-> (x (B, S, E), the cell's state); with ``keep_last`` only the last positions leave the block
        (the FFN runs on them alone: the recurrence needs every position, the FFN does not)."""
        y, state = self.slstm(self.norm_slstm(x), state, cu_seqlens, backend, float32_cell)
        x = x + y
        if keep_last is not None:
            x = x[:, -keep_last:]
        return x + self.ffn(self.norm_ffn(x)), state


@dataclass
class ForecastOutput:
    """quantiles (B, N, Q, P): output n forecasts patch n + 1, in scaled units; loss: mean pinball loss over
    the scored targets and quantile levels (with labels); num_tokens: scored target values; state: the
    blocks' sLSTM states (with return_state)."""

    quantiles: torch.Tensor
    loss: Optional[torch.Tensor] = None
    num_tokens: Optional[torch.Tensor] = None
    state: Any = None


# -- the model -------------------------------------------------------------------------------------------
class TiRex(Model):
    """The TiRex forecaster. ``forecast`` for predictions, ``forward`` for training (see the module docstring).

    The sLSTM backend is a run-time choice (``set_backends``), never part of the config.
    """

    config_class = TiRexConfig

    def __init__(self, config: TiRexConfig):
        super().__init__(config)
        P, E, Q = config.patch_size, config.embedding_dim, len(config.quantiles)
        self.embed = ResidualMLP(2 * P, config.input_ff_dim, E)
        self.blocks = nn.ModuleList(TiRexBlock(config) for _ in range(config.num_blocks))
        self.norm = RMSNorm(E, eps=RMS_EPS)
        self.head = ResidualMLP(E, config.input_ff_dim, Q * P)
        self.register_buffer("levels", torch.tensor(config.quantiles, dtype=torch.float32), persistent=False)
        self.slstm_backend = "auto"
        self.matmul = "float32"
        self.reset_parameters()

    def reset_parameters(self):
        """The initialization for training from scratch: the xLSTM recipe for the blocks (small-init
        projections, depth-scaled output projections, zero recurrent weights, forget-gate biases spread
        over each head), PyTorch's defaults for the MLPs, unit norms."""
        E, L, d = self.config.embedding_dim, self.config.num_blocks, self.config.head_dim
        std_in, std_out = math.sqrt(2.0 / (5.0 * E)), 2.0 / L / math.sqrt(E)
        for j, block in enumerate(self.blocks):
            cell = block.slstm
            for gate in (cell.igate, cell.fgate, cell.zgate, cell.ogate):
                nn.init.normal_(gate.weight, std=std_in)
            nn.init.zeros_(cell.recurrent)
            depth = j / (L - 1) if L > 1 else 0.0
            pos = torch.arange(d, dtype=torch.float32) / max(d - 1, 1)
            with torch.no_grad():
                cell.bias.zero_()
                cell.bias[E:2 * E] = (-(-5.0 + 12.0 * pos ** (0.3 + 1.3 * depth))).repeat(self.config.num_heads)
            cell.norm.reset_parameters()
            block.norm_slstm.reset_parameters()
            block.norm_ffn.reset_parameters()
            nn.init.normal_(block.ffn.up.weight, std=std_in)
            nn.init.normal_(block.ffn.down.weight, std=std_out)
        self.norm.reset_parameters()
        for mlp in (self.embed, self.head):
            for lin in (mlp.hidden, mlp.out, mlp.skip):
                lin.reset_parameters()

    # run-time choices -----------------------------------------------------------------------------------
    def set_backends(self, slstm: str = "auto", matmul: str = "float32", **_ignored):
        """Run-time choices (never saved). slstm: the sLSTM kernel, "auto" (Triton on CUDA, else fused),
        "fused", "recurrent" or "triton". matmul: "float32", or "bfloat16" to run the projections, FFNs,
        patch embedding and head under bfloat16 autocast while the recurrence, the norms and the residual
        stream stay float32 (about twice the matmul speed on CPUs with AVX512-BF16 or AMX, and on GPUs).
        Other cells' choices are accepted and ignored (this model has none). Returns the model."""
        if slstm not in SLSTM_BACKENDS:
            raise ValueError(f"unknown sLSTM backend {slstm!r}; choose one of {SLSTM_BACKENDS}")
        if matmul not in MATMULS:
            raise ValueError(f"unknown matmul precision {matmul!r}; choose one of {MATMULS}")
        self.slstm_backend, self.matmul = slstm, matmul
        return self

    # the network ----------------------------------------------------------------------------------------
    def forward_tokens(self, tokens: torch.Tensor, state: Optional[Sequence] = None,
                       cu_seqlens: Optional[torch.Tensor] = None, keep_last: Optional[int] = None
                       ) -> tuple[torch.Tensor, list]:
        """tokens (B, N, 2P) -> (quantile forecasts (B, N, Q, P) in scaled units, the blocks' sLSTM states).

        state: one (h, c, n, m) per block from an earlier call (None: zeros); cu_seqlens: packed series over
        the B*N tokens (``openxlstm.ops.slstm``'s convention), each running from a zero state; keep_last: the
        forecasts of the last positions only (B, keep_last, Q, P), skipping the last FFN and the head
        elsewhere."""
        amp = self.matmul == "bfloat16"
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16) if amp else nullcontext():
            x = self.embed(tokens.to(self.embed.hidden.weight.dtype))  # (B, N, E), in the weights' dtype
            if amp:
                x = x.float()  # the residual stream stays float32
            states = []
            for j, block in enumerate(self.blocks):
                last = keep_last if j == len(self.blocks) - 1 else None
                x, st = block(x, None if state is None else state[j], cu_seqlens, self.slstm_backend, last, amp)
                states.append(st)
            out = self.head(self.norm(x))  # (B, N, Q * P)
        return out.unflatten(-1, (len(self.config.quantiles), self.config.patch_size)), states

    def forward(self, input: torch.Tensor, labels: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None, state=None, return_state: bool = False,
                return_logits: bool = False) -> ForecastOutput:
        """Training and evaluation on windows of values.

        input (B, S) values, NaN = missing, S a multiple of patch_size; labels (B, S) float targets (label
        n*P + j: value j of the patch that output n forecasts; NaN: not scored); cu_seqlens: packed series
        over the B*S values (boundaries at multiples of patch_size), each scaled by its own statistics and
        run from a zero state. ``return_logits`` is accepted for the training engine; the quantiles are always
        in the output. Returns a ForecastOutput (loss and num_tokens with labels).
        """
        P = self.config.patch_size
        if not isinstance(input, torch.Tensor) or not input.is_floating_point() or input.dim() != 2:
            raise ValueError(f"TiRex: input must be a float tensor (B, S) of values, got "
                             f"{getattr(input, 'shape', type(input).__name__)}")
        B, S = input.shape
        if S % P:
            raise ValueError(f"TiRex: the input length {S} is not a multiple of the patch size {P}")
        x = input.float()
        cu_tokens = None
        if cu_seqlens is None:
            loc, scale = scale_stats(x)
        else:
            torch._assert_async((cu_seqlens % P == 0).all(), f"TiRex: cu_seqlens must be multiples of the patch "
                                                             f"size {P}")
            segment = torch.searchsorted(cu_seqlens[1:].contiguous(),
                                         torch.arange(B * S, device=x.device, dtype=cu_seqlens.dtype), right=True)
            loc, scale = segment_scale_stats(x, segment.view(B, S), cu_seqlens.numel() - 1)
            cu_tokens = torch.div(cu_seqlens, P, rounding_mode="floor")
        pred, states = self.forward_tokens(tokenize((x - loc) / scale, P), state, cu_tokens)
        pred = pred.float()
        out = ForecastOutput(quantiles=pred, state=states if return_state else None)
        if labels is not None:
            if labels.shape != input.shape:
                raise ValueError(f"TiRex: labels must have the shape of the input {tuple(input.shape)}, got "
                                 f"{tuple(labels.shape)}")
            target = ((labels.float() - loc) / scale).unflatten(-1, (-1, P))  # (B, N, P)
            total, count = pinball_loss(pred, target, self.levels)
            out.loss = total / (count.clamp(min=1) * len(self.config.quantiles))
            out.num_tokens = count
        return out

    # forecasting ----------------------------------------------------------------------------------------
    def _window(self, values: torch.Tensor, lengths: torch.Tensor, max_context: int):
        """The forecast window of each series: the last ``max_context`` values, left-padded with NaN to
        train_ctx_len (``pad_context``) or to a multiple of the patch size. Returns (window (B, L'),
        lengths within it, cu_seqlens in tokens or None)."""
        P, B = self.config.patch_size, values.shape[0]
        if values.shape[1] > max_context:
            values = values[:, -max_context:]
        lengths = lengths.clamp(max=values.shape[1])
        target = values.shape[1]
        if self.config.pad_context:
            target = max(target, self.config.train_ctx_len)
        target = -(-target // P) * P
        if target > values.shape[1]:
            pad = values.new_full((B, target - values.shape[1]), math.nan)
            values = torch.cat([pad, values], dim=1)
        cu = None
        if not self.config.pad_context:
            N = target // P
            first = N - torch.div(lengths + P - 1, P, rounding_mode="floor")  # (B,) first token of each series
            if bool((first > 0).any()):
                rows = torch.arange(B, device=values.device) * N
                cu = torch.cat([rows, rows + first, values.new_tensor([B * N]).long()]).unique(sorted=True)
        return values, lengths, cu

    def _forecast_window(self, values, lengths, steps: int, max_context: int) -> torch.Tensor:
        """TiRex's rollout: every new patch reruns the whole (sliding) window. -> (B, Q, steps * P)."""
        P = self.config.patch_size
        preds = []
        for k in range(steps):
            window, _, cu = self._window(values, lengths, max_context)
            loc, scale = scale_stats(window)
            pred, _ = self.forward_tokens(tokenize((window - loc) / scale, P), None, cu, keep_last=1)
            preds.append(pred[:, -1].float() * scale[:, :, None] + loc[:, :, None])  # (B, Q, P)
            if k + 1 < steps:
                values = torch.cat([values, values.new_full((values.shape[0], P), math.nan)], dim=1)
                lengths = lengths + P
        return torch.cat(preds, dim=-1)

    def _forecast_state(self, values, lengths, steps: int, max_context: int) -> torch.Tensor:
        """The stateful rollout: the window once, then one step per new patch. -> (B, Q, steps * P)."""
        P = self.config.patch_size
        window, _, cu = self._window(values, lengths, max_context)
        loc, scale = scale_stats(window)
        pred, state = self.forward_tokens(tokenize((window - loc) / scale, P), None, cu, keep_last=1)
        preds = [pred[:, -1]]
        if steps > 1:
            blank = tokenize(window.new_full((window.shape[0], P), math.nan), P)  # (B, 1, 2P): a missing patch
            for _ in range(steps - 1):
                pred, state = self.forward_tokens(blank, state)
                preds.append(pred[:, -1])
        return torch.cat([p.float() * scale[:, :, None] + loc[:, :, None] for p in preds], dim=-1)

    @torch.no_grad()
    def forecast(self, context, prediction_length: Optional[int] = None,
                 quantile_levels: Optional[Sequence[float]] = None, *, rollout: str = "window",
                 max_context: Optional[int] = None, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantile forecasts of a batch of series.

        Args:
            context: a tensor or array (L,) or (B, L), or a list of 1-D series of different lengths (left-padded
                with NaN, as TiRex does); NaN marks missing values.
            prediction_length: H, the values to forecast (default: one patch).
            quantile_levels: a subset of the config's quantiles (default: all of them).
            rollout: "window" (TiRex's: the whole window again per new patch) or "state" (the window once, then
                one sLSTM step per new patch).
            max_context: the most recent values used (default train_ctx_len; larger runs the recurrence over
                longer contexts than the model was trained on).
            batch_size: series per forward pass.

        Returns (quantiles (B, H, Q), mean (B, H)) as float32 tensors on the model's device; the mean is the
        0.5 quantile.
        """
        P = self.config.patch_size
        H = P if prediction_length is None else prediction_length
        if isinstance(H, bool) or not isinstance(H, (int, np.integer)) or H < 1:
            raise UserError(f"forecast: prediction_length must be a positive integer, got {prediction_length!r}")
        if rollout not in ROLLOUTS:
            raise UserError(f"forecast: rollout must be one of {ROLLOUTS}, got {rollout!r}")
        max_context = self.config.train_ctx_len if max_context is None else max_context
        if isinstance(max_context, bool) or not isinstance(max_context, (int, np.integer)) or max_context < 1:
            raise UserError(f"forecast: max_context must be a positive integer, got {max_context!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UserError(f"forecast: batch_size must be a positive integer, got {batch_size!r}")
        index = self._level_index(quantile_levels)
        device = next(self.parameters()).device
        values, lengths = as_series_batch(context, device)
        steps = -(-int(H) // P)
        run = self._forecast_window if rollout == "window" else self._forecast_state
        was_training = self.training
        self.eval()
        try:
            outs = [run(values[i:i + batch_size], lengths[i:i + batch_size], steps, int(max_context))
                    for i in range(0, values.shape[0], batch_size)]
        finally:
            self.train(was_training)
        q = torch.cat(outs, dim=0)[..., :H].transpose(1, 2).float()  # (B, H, Q)
        mean = q[..., self.config.median_index]
        return q[..., index], mean

    def _level_index(self, quantile_levels) -> list[int]:
        levels = self.config.quantiles
        if quantile_levels is None:
            return list(range(len(levels)))
        try:
            wanted = [float(q) for q in quantile_levels]
        except (TypeError, ValueError):
            raise UserError(f"forecast: quantile_levels must be a list of numbers from {levels}") from None
        index = []
        for q in wanted:
            near = [j for j, v in enumerate(levels) if abs(v - q) < 1e-9]
            if not near:
                raise UserError(f"forecast: quantile level {q:g} is not one the model predicts; choose from {levels}")
            index.append(near[0])
        return index


__all__ = ["TiRexConfig", "PRESETS", "preset", "TiRex", "ForecastOutput", "ROLLOUTS", "scale_stats", "segment_scale_stats", "tokenize",
           "pinball_loss", "as_series_batch"]
