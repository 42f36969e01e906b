"""Training: the loop, LR schedule, checkpoints, DDP set-up and run logs."""

from .checkpoint import load_model, resolve_checkpoint, save_checkpoint
from .loop import TrainConfig, Trainer, evaluate_loss, train
from .metrics import plot_losses
from .schedule import CosineSchedule

__all__ = ["TrainConfig", "Trainer", "train", "evaluate_loss", "save_checkpoint", "load_model",
           "resolve_checkpoint", "plot_losses", "CosineSchedule"]
