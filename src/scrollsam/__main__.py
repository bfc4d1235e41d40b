"""``python -m scrollsam ...``: the same as the ``scrollsam`` command (torchrun launches this)."""

import sys

from scrollsam.cli import main

sys.exit(main())
