"""``python -m bpleader.sim``: the same as ``bpleader sim``."""

import sys

from bpleader.sim.cli import main

sys.exit(main())
