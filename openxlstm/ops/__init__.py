"""The maths of xLSTM: one folder per cell, plain-PyTorch references and fast kernels side by side."""

from .conv import causal_conv1d
from .mlstm import mlstm, mlstm_decode, mlstm_step, mLSTMState
from .slstm import slstm, sLSTMState

__all__ = ["causal_conv1d", "mlstm", "mlstm_decode", "mlstm_step", "mLSTMState", "slstm", "sLSTMState"]
