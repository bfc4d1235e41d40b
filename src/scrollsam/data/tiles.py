"""Tile windows inside the mask, a spatial train / validation split, balanced tile sampling.

A :class:`Region` is a rectangle of one fragment that belongs to one side of the split. A tile
(an S x S window) of a region lies wholly inside it, except across the image border: where a
region touches the border of the image, its tiles may reach past it (the reader pads with 0 and
the ``valid`` map marks those pixels invalid). So a tile of one side never covers an image pixel
of the other side, input context included: validation never overlaps training pixels.

Coordinates are image pixels, rows y and columns x, half-open ranges.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from scrollsam.data.fragment import Fragment
from scrollsam.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Region:
    """Rectangle ``[y0, y1) x [x0, x1)`` of fragment ``fragment`` (its id)."""

    fragment: str
    y0: int
    y1: int
    x0: int
    x1: int


@dataclass(frozen=True)
class Tile:
    """An S x S window at (y0, x0) of fragment ``fragment``: ``valid`` = fraction of its pixels
    inside the mask, ``ink`` = fraction of those that are ink (0 without labels)."""

    fragment: str
    y0: int
    x0: int
    size: int
    valid: float
    ink: float

    @property
    def y1(self) -> int:
        return self.y0 + self.size

    @property
    def x1(self) -> int:
        return self.x0 + self.size


def split_regions(
    fragments: Sequence[Fragment],
    *,
    valid_fragments: Sequence[str] = (),
    valid_band: tuple[float, float] | None = None,
    axis: str = "y",
) -> tuple[list[Region], list[Region]]:
    """(train regions, validation regions).

    Fragments named in ``valid_fragments`` (ids) go wholly to validation. Of every other
    fragment, ``valid_band`` = (start, stop) as fractions of its height (``axis="y"``) or width
    (``axis="x"``) is held out for validation and the rest trains; None holds out nothing.
    """
    ids = [f.id for f in fragments]
    unknown = [v for v in valid_fragments if v not in ids]
    if unknown:
        raise InputError(f"valid_fragments: unknown fragment ids {unknown}, have {ids}")
    if axis not in ("y", "x"):
        raise InputError(f"axis: expected 'y' or 'x', got {axis!r}")
    if valid_band is not None:
        lo, hi = valid_band
        if not 0.0 <= lo < hi <= 1.0:
            raise InputError(f"valid_band: expected 0 <= start < stop <= 1, got {valid_band}")
    train: list[Region] = []
    valid: list[Region] = []
    for f in fragments:
        whole = Region(f.id, 0, f.height, 0, f.width)
        if f.id in valid_fragments:
            valid.append(whole)
            continue
        if valid_band is None:
            train.append(whole)
            continue
        length = f.height if axis == "y" else f.width
        b0, b1 = round(valid_band[0] * length), round(valid_band[1] * length)
        parts = [(0, b0, train), (b0, b1, valid), (b1, length, train)]
        for a, b, side in parts:
            if b > a and axis == "y":
                side.append(Region(f.id, a, b, 0, f.width))
            elif b > a:
                side.append(Region(f.id, 0, f.height, a, b))
    return train, valid


def tile_windows(
    fragment: Fragment, region: Region, *, size: int, stride: int | None = None,
    min_valid: float = 0.5,
) -> list[Tile]:
    """Tiles of ``size`` on a grid of ``stride`` (default size // 2) covering ``region``, kept
    when at least ``min_valid`` of their pixels are inside the mask."""
    if size < 1:
        raise InputError(f"size: expected a positive integer, got {size}")
    stride = size // 2 if stride is None else stride
    if stride < 1:
        raise InputError(f"stride: expected a positive integer, got {stride}")
    if not 0.0 <= min_valid <= 1.0:
        raise InputError(f"min_valid: expected a fraction in [0, 1], got {min_valid}")
    if region.fragment != fragment.id:
        raise InputError(f"region: belongs to fragment {region.fragment}, not {fragment.id}")
    ys = _starts(region.y0, region.y1, fragment.height, size, stride)
    xs = _starts(region.x0, region.x1, fragment.width, size, stride)
    labels = fragment.labels()
    tiles = []
    for y0 in ys:
        for x0 in xs:
            inside = fragment.mask_window(y0, y0 + size, x0, x0 + size)  # [S, S]
            n = int(np.count_nonzero(inside))
            if n == 0 or n < min_valid * size * size:
                continue
            ink = 0.0
            if labels is not None:
                ink_px = fragment.labels_window(y0, y0 + size, x0, x0 + size) & inside
                ink = np.count_nonzero(ink_px) / n
            tiles.append(Tile(fragment.id, y0, x0, size, n / (size * size), float(ink)))
    return tiles


def make_tiles(
    fragments: Mapping[str, Fragment] | Sequence[Fragment], regions: Sequence[Region], *,
    size: int, stride: int | None = None, min_valid: float = 0.5,
) -> list[Tile]:
    """Tiles of every region (see :func:`tile_windows`), in region order."""
    by_id = fragments if isinstance(fragments, Mapping) else {f.id: f for f in fragments}
    tiles = []
    for region in regions:
        found = tile_windows(
            by_id[region.fragment], region, size=size, stride=stride, min_valid=min_valid
        )
        if not found:
            log.warning("no %d px tile of rows %d..%d, columns %d..%d of fragment %s has "
                        "%.0f%% of its pixels inside the mask", size, region.y0,
                        region.y1 - 1, region.x0, region.x1 - 1, region.fragment,
                        100 * min_valid)
        tiles.extend(found)
    return tiles


class BalancedTiles:
    """Draws tile indices so that about ``ink_share`` of draws are ink tiles (ink fraction >=
    ``min_ink``) and the rest background tiles; uniform within each group. With one group empty
    it draws from the other."""

    def __init__(self, tiles: Sequence[Tile], *, ink_share: float = 0.5, min_ink: float = 0.01):
        if not tiles:
            raise InputError("tiles: expected at least one tile, got none")
        if not 0.0 <= ink_share <= 1.0:
            raise InputError(f"ink_share: expected a fraction in [0, 1], got {ink_share}")
        ink = np.array([t.ink >= min_ink for t in tiles])
        self.ink_idx = np.flatnonzero(ink)
        self.background_idx = np.flatnonzero(~ink)
        self.ink_share = ink_share

    def draw(self, n: int, *, rng: np.random.Generator) -> np.ndarray:
        """int64 [n] tile indices."""
        groups = [g for g in (self.ink_idx, self.background_idx) if g.size]
        if len(groups) == 1:
            return groups[0][rng.integers(0, groups[0].size, n)]
        pick_ink = rng.random(n) < self.ink_share  # [n]
        ink = self.ink_idx[rng.integers(0, self.ink_idx.size, n)]
        bg = self.background_idx[rng.integers(0, self.background_idx.size, n)]
        return np.where(pick_ink, ink, bg)


def balanced_indices(
    tiles: Sequence[Tile], n: int, *, rng: np.random.Generator, ink_share: float = 0.5,
    min_ink: float = 0.01,
) -> np.ndarray:
    """int64 [n] indices into ``tiles``, balanced between ink and background tiles."""
    return BalancedTiles(tiles, ink_share=ink_share, min_ink=min_ink).draw(n, rng=rng)


def _starts(r0: int, r1: int, length: int, size: int, stride: int) -> list[int]:
    """Tile starts along one axis covering region [r0, r1) of an image axis of ``length``.

    A tile stays inside the region, except that it may pass the image border where the region
    touches it. Empty when the region is interior and shorter than ``size``.
    """
    lo = r0 if r0 > 0 else r0 - size + 1  # past the top / left border is allowed
    hi = r1 - size if r1 < length else r1 - 1  # past the bottom / right border is allowed
    if lo > hi:
        return []
    first = min(max(r0, lo), hi)
    last = min(max(r1 - size, lo), hi)
    if last <= first:
        return [first]
    starts = list(range(first, last, stride))
    return starts + [last]
