"""Where to move a fragment's ink labels so that they no longer match its ink, for the chance
level of the per-slice contrast (:func:`.stats.slice_contrast`).

Labels moved far across a fragment land where the papyrus sits at another depth, and the
drifting sheet alone then separates "ink" from background. Moved just past the reach of their
own pattern (the smallest shift at which the moved labels are about uncorrelated with the
labels), they land on papyrus like their own, so what they still separate is what texture,
drift and sampling give by chance. The reach is measured on the labels themselves, so it
follows the letters' size in pixels, whatever the scan's resolution.
"""

from __future__ import annotations

import numpy as np

# The four directions the labels move in (rows, columns).
DIRECTIONS = ((1, 0), (0, 1), (1, 1), (1, -1))
# Moved labels count as unrelated to the labels once their correlation (phi) is at most this.
UNRELATED = 0.1
# Label maps wider than this are subsampled to measure their reach (every k-th pixel).
REACH_SIDE = 1024


def unrelated_shifts(labels: np.ndarray, mask: np.ndarray) -> list[tuple[int, int]]:
    """One shift (dy, dx) in pixels per direction of :data:`DIRECTIONS`: the smallest (growing
    by about a fifth each try) at which the labels moved by it, wrapping around, correlate with
    the labels at most :data:`UNRELATED` over the pixels inside ``mask`` in both places.

    labels, mask: bool [H, W]. A direction whose labels never decorrelate within half the
    fragment takes the largest shift tried."""
    step = max(1, -(-max(labels.shape) // REACH_SIDE))
    ink, inside = (labels & mask)[::step, ::step], mask[::step, ::step]
    h, w = ink.shape
    out = []
    for uy, ux in DIRECTIONS:
        limit = max(1, (h if uy else w) // 2)
        d = 1
        while True:
            if _phi(ink, inside, d * uy, d * ux) <= UNRELATED or d >= limit:
                break
            d = min(limit, max(d + 1, round(d * 1.2)))
        out.append((d * uy * step, d * ux * step))
    return out


def _phi(ink: np.ndarray, inside: np.ndarray, dy: int, dx: int) -> float:
    """Correlation of ``ink`` with itself moved by (dy, dx), over pixels inside in both."""
    both = inside & np.roll(inside, (dy, dx), axis=(0, 1))
    a = ink[both].astype(np.float64)
    b = np.roll(ink, (dy, dx), axis=(0, 1))[both].astype(np.float64)
    if a.size == 0 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.mean((a - a.mean()) * (b - b.mean())) / (a.std() * b.std()))
