"""Shared helpers of the tests: the one tiny-model factory (every registered architecture), a small text
corpus, the arguments of a tiny training run, and the check of a one-line command-line error."""

import json

import torch

from openxlstm.models import LANGUAGE_MODELS, build_model

TINY = {  # every registered language model at a size that runs in milliseconds
    "xlstm": {"embedding_dim": 32, "num_blocks": 2, "slstm_at": [1], "mlstm_num_heads": 2, "slstm_num_heads": 2},
    "xlstm-large": {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2},
    "transformer": {"embedding_dim": 32, "num_layers": 2, "num_heads": 2},
    "lstm": {"embedding_dim": 32, "num_layers": 2},
    "reslstm": {"embedding_dim": 32, "num_blocks": 2},
}
assert set(TINY) == set(LANGUAGE_MODELS), "a newly registered language model needs its tiny config here"


def tiny_model(arch: str, seed: int = 0, vocab_size: int = 64, **overrides):
    """A freshly initialized tiny model of ``arch`` (seeded), in eval mode."""
    torch.manual_seed(seed)
    return build_model(arch, {**TINY[arch], "vocab_size": vocab_size, **overrides}).eval()


def write_corpus(path, n_docs: int = 12):
    """A folder of small English-ish and Python-ish text files (about 30 KB)."""
    path.mkdir(parents=True, exist_ok=True)
    for j in range(n_docs):
        lines = [f"def function_{j}_{k}(x):\n    return x * {k} + {j}  # the answer\n" for k in range(20)]
        lines += [f"The quick brown fox {j} jumps over the lazy dog {k} times.\n" for k in range(20)]
        (path / f"doc{j:02d}.txt").write_text("".join(lines))
    return path


def tiny_args(arch, data, out, steps=4, extra=()):
    """CLI arguments of a tiny, fast training run."""
    return ["train", "--arch", arch, "--config", json.dumps(TINY[arch]), "--data", str(data), "--out", str(out),
            "--max-steps", str(steps), "--batch-size", "4", "--seq-len", "16", "--eval-every", "2",
            "--eval-tokens", "512", "--warmup", "1", "--samples", "0", "--no-progress", *extra]


def one_line_error(capsys, needle: str) -> str:
    """The command's stderr is one line "error: ..." holding ``needle``; returns it."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    return lines[0]
