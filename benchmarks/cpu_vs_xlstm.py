"""Forward+backward time on CPU: openxlstm against the authors' xlstm package on the same model.

The reference runs its sLSTM on the vanilla (PyTorch) backend and its mLSTM in the parallel form, which is
what it offers without CUDA. Both models get identical weights (``load_official``), and the logits are
checked to agree before timing. Usage:

    python benchmarks/cpu_vs_xlstm.py [--embedding-dim 256 --blocks 4 --slstm-at 1 --batch 4 --seq-len 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from xlstm import (FeedForwardConfig, mLSTMBlockConfig, mLSTMLayerConfig, sLSTMBlockConfig, sLSTMLayerConfig,
                   xLSTMLMModel, xLSTMLMModelConfig)

from openxlstm import load_official


def time_fwd_bwd(model, ids, repeats: int) -> float:
    """Median seconds of one forward + backward of the mean logit-loss."""
    times = []
    for r in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        if r:  # the first run warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedding-dim", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--slstm-at", type=str, default="1", help="comma-separated sLSTM block indices ('' for none)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    slstm_at = [int(s) for s in args.slstm_at.split(",") if s.strip()]
    torch.manual_seed(0)
    config = xLSTMLMModelConfig(
        mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(conv1d_kernel_size=4, qkv_proj_blocksize=4, num_heads=4)),
        slstm_block=sLSTMBlockConfig(slstm=sLSTMLayerConfig(backend="vanilla", num_heads=4, conv1d_kernel_size=4),
                                     feedforward=FeedForwardConfig(proj_factor=1.3, act_fn="gelu")),
        context_length=args.seq_len, num_blocks=args.blocks, embedding_dim=args.embedding_dim, slstm_at=slstm_at,
        vocab_size=args.vocab)
    theirs = xLSTMLMModel(config)
    theirs.reset_parameters()
    ours = load_official(dataclasses.asdict(config), theirs.state_dict())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    with torch.no_grad():
        ref = theirs(ids)
        err = float((ours(ids) - ref).norm() / ref.norm())
    t_theirs = time_fwd_bwd(theirs, ids, args.repeats)
    t_ours = time_fwd_bwd(ours, ids, args.repeats)
    print(f"config: E={args.embedding_dim} blocks={args.blocks} slstm_at={slstm_at} B={args.batch} S={args.seq_len} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"logits rel. error vs xlstm: {err:.2e}")
    print(f"xlstm (vanilla sLSTM, parallel mLSTM): {t_theirs * 1e3:8.1f} ms fwd+bwd")
    print(f"openxlstm (fused sLSTM, chunkwise mLSTM): {t_ours * 1e3:8.1f} ms fwd+bwd")
    print(f"speed-up: {t_theirs / t_ours:.2f}x")


if __name__ == "__main__":
    main()
