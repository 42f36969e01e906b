"""``python -m openxlstm.serving --checkpoint DIR ...``: ``openxlstm serve`` on its own."""

import sys

from .cli import main

sys.exit(main())
