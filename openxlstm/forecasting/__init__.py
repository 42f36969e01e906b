"""Time-series forecasting with xLSTM: TiRex (an sLSTM forecaster) on openxlstm's layers and sLSTM op.

    model = openxlstm.forecasting.from_pretrained("path/to/TiRex")   # TiRex's model.ckpt, or a directory of ours
    quantiles, mean = model.forecast(context, prediction_length=64)  # (B, H, Q), (B, H)

The model is ``openxlstm.models.tirex`` (registered as "tirex"), TiRex's checkpoints are read by
``openxlstm.io.tirex``, our forecaster directories and runs are run-format directories (``openxlstm.io``;
``model.save_pretrained``). Here: ``data.py`` series from CSV / Parquet and packed training windows;
``train.py`` fine-tuning and training through the training engine; ``cli.py`` the ``openxlstm forecast``
and ``openxlstm forecast-train`` commands.
"""

from ..io.tirex import load_tirex_checkpoint
from ..models.tirex import PRESETS, ForecastOutput, TiRex, TiRexConfig, preset


def from_pretrained(path, device="cpu", dtype=None) -> TiRex:
    """A forecaster in eval mode from TiRex's ``model.ckpt`` (or its directory), one of our forecaster
    directories or a ``forecast-train`` run (``openxlstm.from_pretrained``, checked to hold a forecaster)."""
    return TiRex.from_pretrained(path, dtype=dtype, device=device)


__all__ = ["TiRex", "TiRexConfig", "ForecastOutput", "PRESETS", "preset", "from_pretrained", "load_tirex_checkpoint"]
