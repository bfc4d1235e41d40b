"""Test-time augmentation: the 8 flips / 90 degree rotations of a window and their inverses.

Axis order: the last two axes are (y, x); anything before them is carried along.
"""

from __future__ import annotations

import torch

# (quarter turns k, flip first): x -> rot90(flip(x), k); the first entry is the identity.
DIHEDRAL = tuple((k, flip) for flip in (False, True) for k in range(4))


def dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """``rot90(flip(x), k)`` over the last two axes (flip = mirror left-right)."""
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, dims=(-2, -1))


def undo_dihedral(y: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """The inverse of :func:`dihedral`: maps a prediction back to the original frame."""
    y = torch.rot90(y, -k, dims=(-2, -1))
    return y.flip(-1) if flip else y
