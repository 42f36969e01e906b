"""Next-token loss straight from the last hidden states: the output projection and the cross-entropy fused,
in chunks of rows, so that the (N, V) float32 logits are never held whole, nor kept for backward.

``linear_cross_entropy(h, weight, labels)`` equals ``F.cross_entropy(F.linear(h, weight).float(), labels,
ignore_index=-100)`` (the reference, ``linear_cross_entropy_reference``). Backward keeps only h (N, E) in the
compute dtype and recomputes each chunk's logits (one matmul more than the plain form, which instead keeps
(N, V) float32 log-probabilities: 200 KB per token at a 50k vocabulary). Under autocast the matmuls run in
the autocast dtype, exactly as ``F.linear`` would; the log-sum-exp and the sums are float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 25  # logits per chunk: 128 MB in float32


def linear_cross_entropy_reference(h, weight, labels, ignore_index: int = IGNORE_INDEX):
    """The plain form: logits (N, V) in float32 (float64 stays float64), then the mean cross-entropy over
    the labels != ignore_index."""
    logits = F.linear(h, weight)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    kind = h.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return h.dtype


def _chunk_losses(hc, w, tgt, keep, acc):
    """Per-row losses of one chunk and its float logits: hc (n, E), w (V, E) in the compute dtype."""
    logits = (hc @ w.t()).to(acc)  # (n, V)
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    return torch.where(keep, lse - logits.gather(1, tgt)[:, 0], 0.0), logits, lse


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward: the summed loss, chunk by chunk. Backward: each chunk's logits again (one more matmul),
    softmax minus one-hot, then dh and dW; saved for it: h in the compute dtype (N, E) and nothing else."""

    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index, chunk, dtype):
        acc = torch.float64 if dtype == torch.float64 else torch.float32  # log-sum-exp and sums
        hd, w = h.to(dtype), weight.to(dtype)
        valid = labels != ignore_index  # (N,)
        count = valid.sum().clamp(min=1).to(acc)
        safe = torch.where(valid, labels, 0)
        total = torch.zeros((), device=h.device, dtype=acc)
        for s in range(0, h.shape[0], chunk):
            losses, _, _ = _chunk_losses(hd[s:s + chunk], w, safe[s:s + chunk, None], valid[s:s + chunk], acc)
            total = total + losses.sum()
        ctx.save_for_backward(hd, weight, safe, valid, count)
        ctx.meta = (chunk, dtype, acc, h.dtype)
        return total / count

    @staticmethod
    def backward(ctx, g):
        hd, weight, safe, valid, count = ctx.saved_tensors
        chunk, dtype, acc, h_dtype = ctx.meta
        w = weight.to(dtype)
        scale = (g / count).to(acc)
        dh = torch.empty_like(hd)
        dw = torch.zeros(weight.shape, device=hd.device, dtype=acc)
        for s in range(0, hd.shape[0], chunk):
            hc, tgt, keep = hd[s:s + chunk], safe[s:s + chunk, None], valid[s:s + chunk]
            _, logits, lse = _chunk_losses(hc, w, tgt, keep, acc)
            grad = torch.exp(logits.sub_(lse[:, None]))  # softmax, in place of the logits
            grad.scatter_add_(1, tgt, torch.full_like(lse[:, None], -1.0))
            grad = (grad * (keep[:, None] * scale)).to(dtype)  # (n, V): d loss / d logits
            dh[s:s + chunk] = grad @ w
            dw += (grad.t() @ hc).to(acc)
        return dh.to(h_dtype), dw.to(weight.dtype), None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``labels`` over the positions not equal to ignore_index.

    Args:
        h: (N, E) hidden states (any leading shape is flattened); weight: (V, E) the output projection.
        labels: (N,) target ids (same leading shape as h), ``ignore_index`` where nothing is scored.
        chunk_size: rows per chunk (default: about 2**25 logits per chunk).

    Returns a float32 scalar (float64 for float64 inputs; 0 when nothing is scored). Differentiable in h and weight.
    """
    E = h.shape[-1]
    h2 = h.reshape(-1, E)
    lab = labels.reshape(-1)
    if lab.shape[0] != h2.shape[0]:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} do not match the hidden states "
                         f"{tuple(h.shape[:-1])}")
    V = weight.shape[0]
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // V)
    dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h2, weight, lab, ignore_index, chunk, dtype)


__all__ = ["IGNORE_INDEX", "linear_cross_entropy", "linear_cross_entropy_reference"]
