"""``python -m openxlstm ...`` and ``torchrun -m openxlstm train ...``."""

import sys

from .cli import main

sys.exit(main())
