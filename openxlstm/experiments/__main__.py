"""``python -m openxlstm.experiments grid|ablation|report ...``: the same as ``openxlstm experiment ...``."""

import sys

from ..cli import main

sys.exit(main(["experiment", *sys.argv[1:]]))
