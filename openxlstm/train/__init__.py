"""Training: the run's config (``config.py``), the ``openxlstm train`` application (``app.py``), the engine
every run trains through (``engine.py``), parallelism applied from outside the model (``parallel.py``), the
checkpointer (``checkpoint.py``), the run directory's lock (``rundir.py``), torchrun set-up
(``distributed.py``), the LR schedule and the run logs."""

from ..evaluate import EvalResult, evaluate_model
from ..io.run import load_model, resolve_checkpoint, save_checkpoint
from .app import Trainer, train
from .config import TrainConfig
from .engine import Engine, EngineConfig, FitResult, Preempted, TrainingDiverged
from .metrics import plot_losses
from .schedule import CosineSchedule

__all__ = ["Engine", "EngineConfig", "EvalResult", "FitResult", "Preempted", "TrainingDiverged", "evaluate_model",
           "TrainConfig", "Trainer", "train", "save_checkpoint", "load_model", "resolve_checkpoint", "plot_losses",
           "CosineSchedule"]
