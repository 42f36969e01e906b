"""Training: the engine every run uses, the ``openxlstm train`` run, LR schedule, checkpoints, DDP / FSDP
set-up and run logs."""

from ..io.run import load_model, resolve_checkpoint, save_checkpoint
from .engine import Engine, EngineConfig, EvalResult, FitResult, evaluate_model
from .loop import TrainConfig, Trainer, bits_per_byte, lm_batches, train
from .metrics import plot_losses
from .schedule import CosineSchedule

__all__ = ["Engine", "EngineConfig", "EvalResult", "FitResult", "evaluate_model", "TrainConfig", "Trainer", "train",
           "lm_batches", "bits_per_byte", "save_checkpoint", "load_model", "resolve_checkpoint", "plot_losses",
           "CosineSchedule"]
