"""``python -m replaylog``: the command line (see :mod:`replaylog.cli`)."""

import sys

from .cli import main

sys.exit(main())
