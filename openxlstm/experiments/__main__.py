"""``python -m openxlstm.experiments grid|ablation|report ...``."""

import sys

from .cli import main

sys.exit(main())
