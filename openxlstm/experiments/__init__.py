"""The paper's experiments, runnable: formal languages, MQAR, the model zoo, grids and the LM ablation ladder.

``openxlstm experiment grid|ablation|report`` (see ``cli.py``) runs them from the command line.
"""

from .formal import IGNORE, TASKS, FormalTask, get_task
from .zoo import PAPER_MODELS, build_model, canonical_name
from .mqar import MQARTask
from .runner import ALL_TASKS, CellSpec, grid_specs, run_cell, run_grid, write_report

__all__ = ["IGNORE", "TASKS", "FormalTask", "get_task", "PAPER_MODELS", "build_model",
           "canonical_name", "MQARTask", "ALL_TASKS", "CellSpec", "grid_specs", "run_cell", "run_grid", "write_report"]
