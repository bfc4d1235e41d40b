"""``python -m scrollsam``: the ``scrollsam`` command (what torchrun and subprocesses launch)."""

import sys

from scrollsam.cli import main

sys.exit(main())
