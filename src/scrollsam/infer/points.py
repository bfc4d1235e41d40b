"""Interactive prediction around clicks with SAM's prompted decoder, for labelling ink by hand.

Clicks file (``--points FILE.json``): a list of ``{"x": column, "y": row, "label": 1}`` in
fragment pixels (label 1 = ink, 0 = not ink; default 1), or, when several fragments are
predicted, ``{"<fragment id>": [clicks ...], ...}``.

How clicks map to tiles (T = tile side, fragment pixels): clicks are taken in file order; a click
that is not in the central half of an existing tile (within T/4 of its centre on both axes) opens
a new T x T tile centred on it, moved inside the image at the borders. Each tile is prompted with
*every* click that falls inside it, as (x, y) pixels of the tile frame scaled to the model input
(S / T). The decoder returns one mask per tile (no multimask); tiles are blended with the same
smooth weights as prompt-free inference. Pixels no tile covers are 0 (so is everything outside
mask.png), and scores (metrics.json) count only covered pixels.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scrollsam.data.fragment import Fragment
from scrollsam.errors import InputError
from scrollsam.infer.meter import memory_status
from scrollsam.infer.predict import Prediction, Predictor
from scrollsam.infer.sliding_window import blend_windows


@dataclass(frozen=True)
class Click:
    """One click in fragment pixels: (x, y) = (column, row); label 1 ink, 0 not ink."""

    x: float
    y: float
    label: int = 1


@dataclass(frozen=True)
class ClickTile:
    """A T x T tile at (y0, x0) and the clicks inside it, in the tile frame."""

    y0: int
    x0: int
    clicks: tuple[Click, ...]


def load_clicks(
    path: str | os.PathLike[str], fragment_ids: Sequence[str]
) -> dict[str, list[Click]]:
    """Read a clicks file; returns fragment id -> clicks. A plain list needs exactly one
    fragment; a mapping must name only given fragments. InputError naming the file otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise InputError(f"--points: cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise InputError(f"--points: expected JSON, got a parse error at line {err.lineno} "
                         f"({path})") from None
    if isinstance(data, list):
        if len(fragment_ids) != 1:
            raise InputError(f"--points: a plain list of clicks needs exactly one --fragment, got "
                             f"{len(fragment_ids)}; use {{\"<id>\": [...]}} ({path})")
        data = {fragment_ids[0]: data}
    if not isinstance(data, Mapping):
        raise InputError(f"--points: expected a list of {{x, y, label}} or a mapping id -> list, "
                         f"got {type(data).__name__} ({path})")
    unknown = sorted(set(data) - set(fragment_ids))
    if unknown:
        raise InputError(f"--points: clicks for fragments not predicted: {', '.join(unknown)} "
                         f"(given: {', '.join(fragment_ids)}) ({path})")
    return {fid: [_click(c, i, path) for i, c in enumerate(clicks)]
            for fid, clicks in data.items()}


def _click(c: object, i: int, path: Path) -> Click:
    where = f"click {i} of {path}"
    if not isinstance(c, Mapping) or not {"x", "y"} <= set(c):
        raise InputError(f"--points: expected {{\"x\": .., \"y\": .., \"label\": 1|0}}, got "
                         f"{c!r} ({where})")
    x, y, label = c["x"], c["y"], c.get("label", 1)
    for name, v in (("x", x), ("y", y)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise InputError(f"--points: {name}: expected a pixel coordinate, got {v!r} ({where})")
    if label not in (0, 1) or isinstance(label, bool):
        raise InputError(f"--points: label: expected 1 (ink) or 0 (not ink), got {label!r} "
                         f"({where})")
    return Click(float(x), float(y), int(label))


def click_tiles(clicks: Sequence[Click], *, shape: tuple[int, int], tile: int) -> list[ClickTile]:
    """Tiles around ``clicks`` (see the module docstring), each with the clicks inside it."""
    h, w = shape
    for c in clicks:
        if not (0 <= c.x < w and 0 <= c.y < h):
            raise InputError(f"--points: expected clicks inside the {w} x {h} (width x height) "
                             f"fragment, got x={c.x:g}, y={c.y:g}")
    corners: list[tuple[int, int]] = []
    for c in clicks:
        if any(abs(c.y - (y0 + tile / 2)) <= tile / 4 and abs(c.x - (x0 + tile / 2)) <= tile / 4
               for y0, x0 in corners):
            continue
        y0 = int(np.clip(round(c.y - tile / 2), 0, max(h - tile, 0)))
        x0 = int(np.clip(round(c.x - tile / 2), 0, max(w - tile, 0)))
        corners.append((y0, x0))
    return [ClickTile(y0, x0, tuple(c for c in clicks
                                    if y0 <= c.y < y0 + tile and x0 <= c.x < x0 + tile))
            for y0, x0 in corners]


def predict_clicks(
    predictor: Predictor, fragment: str | os.PathLike[str] | Fragment, clicks: Sequence[Click]
) -> tuple[Prediction, np.ndarray]:
    """Probabilities around ``clicks`` (prompted decoder) and the bool [H, W] map of pixels the
    click tiles cover inside the mask."""
    frag = predictor.open(fragment)
    view, tile = predictor.view, predictor.tile
    assert view is not None
    t0 = time.perf_counter()
    tiles = click_tiles(clicks, shape=(frag.height, frag.width), tile=tile)

    def predictions():
        for ct in tiles:
            coords = np.array([[c.x - ct.x0, c.y - ct.y0] for c in ct.clicks], np.float32)
            labels = np.array([c.label for c in ct.clicks], np.int64)
            images = view.infer_windows(frag, ct.y0, ct.x0, tile)  # (K, C, T, T)
            yield ct.y0, ct.x0, predictor.predict_points(images, coords, labels)

    prob, covered = blend_windows(predictions(), shape=(frag.height, frag.width), tile=tile,
                                  mask=frag.mask())
    seconds = time.perf_counter() - t0
    stats = {"clicks": len(clicks), "tiles": len(tiles), "seconds": seconds,
             "covered_megapixels": int(np.count_nonzero(covered)) / 1e6,
             "peak_rss_anon_mb": memory_status().get("rss_anon_mb")}
    return Prediction(frag.id, np.clip(prob, 0.0, 1.0), predictor.threshold, stats), covered
