"""``python -m scrollsam ...``: the same as the ``scrollsam`` command (torchrun launches this)."""

from scrollsam.cli import console

console()
