import sys

from bpleader.simworld.runner import main

sys.exit(main())
