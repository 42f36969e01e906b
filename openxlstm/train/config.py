"""What a training run is: ``TrainConfig``, one dataclass whose fields carry their range, default, help text
and command-line flag (``openxlstm.options``): the ``openxlstm train`` parser and the experiments' shared
hardware options are generated from it, and a config built in Python is checked by the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Union

from ..device import DEVICE_RE
from ..errors import UserError
from ..models import LANGUAGE_MODELS
from ..options import BOOL, TEXT, int_range, number, one_of, option, optional, validate
from .schedule import CosineSchedule

BIN_DTYPES = ("uint8", "uint16", "int16", "uint32", "int32", "int64", "uint64")


@dataclass
class TrainConfig:
    """Everything a run needs; saved in each checkpoint. The defaults are the README's default run: a ~0.5M
    parameter byte-level xLSTM (4 blocks, sLSTM at block 1) trained for ~6 minutes on 2 CPU cores."""

    # model -----------------------------------------------------------------------------------------------
    arch: str = option("xlstm", "architecture; xlstm-large: xLSTM-7B's architecture (small by default); "
                               "forecasters train with openxlstm forecast-train",
                       one_of(*LANGUAGE_MODELS), choices=list(LANGUAGE_MODELS), group="model")
    model: Optional[dict] = option(
        None, "model config: a JSON file or inline JSON of the architecture's config fields (default: the "
              "architecture's default model)",
        ((lambda v: v is None or isinstance(v, dict)), "a JSON object of model config fields"), flag="--config",
        kind="text", metavar="JSON", group="model")
    preset: Optional[str] = option(None, "xLSTM paper model SIZE[:RATIO], e.g. 125m:7:1 or 350m:1:0",
                                   (TEXT[0], "SIZE[:RATIO], e.g. 125m:7:1"), group="model")
    size: Optional[int] = option(None, "baselines: target parameter count (default: equal to the default xLSTM)",
                                 optional(int_range(1)), group="model")
    init: Optional[str] = option(
        None, "fine-tune: start from the weights of DIR, a transformers xLSTMForCausalLM directory (e.g. "
              "xLSTM-7B's), the authors' xlstm_large layout or an openxlstm run; the architecture and model config "
              "come from DIR (no --arch, --config, --preset, --size), and the tokenizer too unless --tokenizer is "
              "given; weights loaded in float32 (default: none, a freshly initialized model)",
        (TEXT[0], "a model directory (transformers, xlstm_large or an openxlstm run)"), metavar="DIR", group="model")
    # data ------------------------------------------------------------------------------------------------
    data: Optional[str] = option(None, "a text file or folder, or a token file (.bin / .npy); default: the "
                                       "built-in corpus (Python docs + stdlib sources)",
                                 (TEXT[0], "a text file or folder, or a .bin / .npy token file"), group="data")
    tokenizer: Optional[str] = option(
        None, "'byte' (default for text), 'bpe:N' (train a BPE of vocabulary N), or a tokenizer.json path; token "
              "files: none by default (the model reads ids)", (TEXT[0], "byte, bpe:N or a tokenizer.json path"),
        group="data")
    val_fraction: float = option(0.05, "held-out validation fraction", number(0, True, 1, True), group="data")
    bin_dtype: str = option("uint16", "dtype of raw .bin token files", one_of(*BIN_DTYPES), choices=list(BIN_DTYPES),
                            group="data")
    pack_documents: Optional[bool] = option(
        None, "each document ends with an end-of-document token and starts from a fresh state, and no loss "
              "crosses a boundary (default: on for a folder or the built-in corpus, off for one text file; a token "
              "file's documents end at the tokenizer's end-of-document id)",
        ((lambda v: v is None or isinstance(v, bool)), "true or false (or not given)"), kind="bool", group="data")
    # training --------------------------------------------------------------------------------------------
    out: str = option("runs/default", "run directory; a fresh run needs it new or empty",
                      ((lambda v: isinstance(v, str) and v.strip() != ""), "a directory path"))
    max_steps: int = option(1200, "optimizer steps", int_range(1))
    max_time: Optional[float] = option(None, "stop (with a checkpoint) after this many minutes (default: no limit)",
                                       optional(number(0, True)))
    stop_at: Optional[int] = option(None, "stop at this step as if interrupted, resume later (the schedule still "
                                          "uses --max-steps; default: run to --max-steps)", optional(int_range(1)))
    batch_size: int = option(16, "global batch in sequences, over all processes and micro-batches", int_range(1))
    grad_accum: int = option(1, "gradient accumulation steps", int_range(1))
    seq_len: int = option(128, "training context in tokens", int_range(1))
    lr: float = option(3e-3, "peak learning rate", number(0, True))
    min_lr: Optional[float] = option(None, "final learning rate (default: lr/10)", optional(number(0)))
    warmup: int = option(60, "warm-up steps", int_range(0))
    weight_decay: float = option(0.1, "AdamW weight decay on the weight matrices", number(0))
    grad_clip: float = option(1.0, "gradient norm clip, 0 for none", number(0))
    beta2: float = option(0.95, "AdamW beta2", number(0, False, 1, True))
    seed: int = option(0, "seed of the initialization and of the batches", int_range(0, 2**63 - 1))
    eval_every: int = option(200, "validate every N steps", int_range(1))
    eval_tokens: int = option(65536, "validation tokens per evaluation", int_range(1))
    log_every: int = option(10, "metrics CSV row every N steps", int_range(1))
    save_every: int = option(400, "checkpoint every N steps", int_range(1))
    samples: int = option(3, "samples generated at the end", int_range(0))
    sample_tokens: int = option(160, "tokens per sample", int_range(0))
    progress: bool = option(True, "log lines instead of a progress bar (default: a progress bar)", BOOL,
                            flag="--no-progress", kind="negflag")
    overwrite: bool = option(False, "replace the run in --out (its checkpoints, metrics, plot and summary; other "
                                    "files stay) (default: off: a fresh run needs --out new or empty)", BOOL,
                             kind="flag")
    # hardware: the engine's options, shared with the experiments ----------------------------------------
    device: str = option("auto", "auto (a GPU if there is one), cpu, cuda or cuda:N",
                         ((lambda v: isinstance(v, str) and DEVICE_RE.match(v) is not None),
                          "auto, cpu, cuda or cuda:N"), group="hardware")
    dtype: str = option("auto", "autocast dtype: auto (bf16 on GPU, float32 on CPU), float32 or bfloat16",
                        one_of("auto", "float32", "bfloat16"), choices=["auto", "float32", "bfloat16"],
                        group="hardware")
    compile: Union[bool, str] = option(
        False, "torch.compile the model (each block under --fsdp); the first steps are slower. BACKEND: inductor "
               "when left out, or another torch.compile backend such as aot_eager (default: off)",
        ((lambda v: isinstance(v, bool) or (isinstance(v, str) and v != "")), "a torch.compile backend"),
        kind="optional-value", metavar="BACKEND", group="hardware")
    activation_checkpointing: bool = option(
        False, "recompute each block's forward during backward instead of keeping its activations: less memory "
               "for about one more forward pass (default: off)", BOOL, kind="flag", group="hardware")
    fsdp: bool = option(False, "under torchrun: shard parameters, gradients and optimizer state over the "
                               "processes (FSDP2; bf16 parameters on GPU) instead of DDP; checkpoints are sharded "
                               "(DCP) (default: off)", BOOL, kind="flag", group="hardware")

    def __post_init__(self):
        validate(self)
        if self.min_lr is not None and self.min_lr > self.lr:
            raise UserError(f"--min-lr {self.min_lr:g} is above --lr {self.lr:g}")

    @property
    def last_step(self) -> int:
        """The step this launch trains to: --max-steps, or --stop-at when that comes first."""
        return self.max_steps if self.stop_at is None else min(self.max_steps, self.stop_at)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A config from a checkpoint's record (fields it does not know are left out: older or newer runs)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def engine_config(self):
        from .engine import EngineConfig

        return EngineConfig(weight_decay=self.weight_decay, betas=(0.9, self.beta2), grad_clip=self.grad_clip,
                            grad_accum=self.grad_accum, device=self.device, dtype=self.dtype, compile=self.compile,
                            activation_checkpointing=self.activation_checkpointing, fsdp=self.fsdp)

    def schedule(self) -> CosineSchedule:
        return CosineSchedule(self.lr, self.min_lr if self.min_lr is not None else self.lr / 10, self.warmup,
                              self.max_steps)


__all__ = ["TrainConfig", "BIN_DTYPES"]
