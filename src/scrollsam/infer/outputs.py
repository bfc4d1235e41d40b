"""What `scrollsam predict` writes for one fragment, every file atomically (temp file + rename).

- ``prob.png``: 8-bit ink probability, ``round(255 * p)``;
- ``mask.png``: 0/255, ink where ``p >= threshold`` (the rule of :mod:`scrollsam.metrics`) inside
  the fragment mask, whatever the threshold (0 included);
- ``overlay.png``: the infrared image (or a slice) with predicted ink tinted red and the ground
  truth outlined in cyan when labels exist, block-averaged so the long side is at most
  :data:`OVERLAY_MAX_SIDE` pixels;
- ``prob.tif``: float32 probabilities, on request;
- ``metrics.json``: F0.5, precision, recall, dice, IoU, counts and the threshold inside the
  fragment mask (plus the best threshold for this fragment, for reference), when labels exist.

Every image is [H, W] indexed (y, x) = (row, column), the fragment's own size. Large maps are
processed in row bands so no full-size float temporary is made.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from scrollsam.errors import InputError, WriteError
from scrollsam.infer.band_state import BandScore
from scrollsam.infer.publish import Staging
from scrollsam.io import atomic_path, atomic_write_text, write_png
from scrollsam.metrics import (
    binarize_prediction,
)

OVERLAY_MAX_SIDE = 4096
BAND_PIXELS = 1 << 18  # pixels per band of rows: bounds temporary memory
INK_BGR = np.array([40, 40, 255], np.float32)  # red tint for predicted ink
TRUTH_BGR = np.array([255, 255, 0], np.uint8)  # cyan outline for labelled ink

Rows = Callable[[int, int], np.ndarray]  # (y0, y1) -> rows [y1 - y0, W]


@dataclass
class Written:
    """Files written for one fragment (name -> path) and the metrics, None without labels."""

    files: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None


def write_outputs(
    out_dir: str | os.PathLike[str],
    prob: np.ndarray,
    *,
    threshold: float,
    valid: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    background: Rows | None = None,
    save_tif: bool = False,
    info: dict[str, Any] | None = None,
    staging: Staging | None = None,
) -> Written:
    """Write prob.png, mask.png, overlay.png (+ prob.tif, metrics.json) into ``out_dir``; with
    ``staging``, under its hidden names, for the caller to put in place together
    (:meth:`.publish.Staging.publish`). ``Written.files`` names the final paths.

    prob: float32 [H, W] in [0, 1], read as probabilities even where it holds only 0 and 1.
    valid: bool [H, W] fragment mask: ink is only ever marked, and scores only counted, inside
    it. labels: bool [H, W] ink truth. background: rows of the picture under the overlay (any
    numeric type; contrast-stretched); None for a black one. info: extra keys for metrics.json.
    """
    if prob.ndim != 2 or prob.dtype != np.float32:
        raise InputError(f"prob: expected float32 [H, W], got {prob.dtype} {list(prob.shape)}")
    for name, arr in (("valid", valid), ("labels", labels)):
        if arr is not None and arr.shape != prob.shape:
            raise InputError(f"{name}: expected shape {list(prob.shape)} (that of prob), got "
                             f"{list(arr.shape)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h, w = prob.shape
    prob8 = np.empty(prob.shape, np.uint8)  # (H, W)
    mask8 = np.empty(prob.shape, np.uint8)  # (H, W) 0 / 255
    score = BandScore()
    step = _band_rows(w)
    for y0 in range(0, h, step):
        rows = slice(y0, y0 + step)
        band = np.clip(prob[rows], 0.0, 1.0)  # blending may round 1 to 1 + 1e-7
        prob8[rows] = np.rint(band * 255.0)
        binary, _ = binarize_prediction(band, threshold=threshold, binary=False)
        v = None if valid is None else valid[rows]
        if v is not None:
            binary &= v.astype(bool, copy=False)  # ink only inside the fragment
        mask8[rows] = binary.astype(np.uint8) * 255
        if labels is not None:
            score = score + BandScore.of(band, binary, labels[rows], v)

    written = Written()

    def where(key: str, name: str) -> Path:  # the file to write; its final path in .files
        written.files[key] = out / name
        return out / name if staging is None else staging.path(out / name)

    try:
        write_png(where("prob", "prob.png"), prob8)
        write_png(where("mask", "mask.png"), mask8)
        picture = overlay(mask8, labels=labels, valid=valid, background=background)
        write_png(where("overlay", "overlay.png"), picture)
        if save_tif:
            write_tif(where("prob_tif", "prob.tif"), prob)
        if labels is not None:
            metrics = score.metrics(threshold, info or {})
            written.metrics = metrics
            atomic_write_text(where("metrics", "metrics.json"),
                              json.dumps(metrics, indent=2) + "\n")
    except WriteError as err:  # name the file being written, not its staged name
        if staging is None:
            raise
        raise WriteError(staging.unstaged(str(err))) from err
    return written


def write_tif(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write a float32 [H, W] TIFF (zlib-compressed), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, image.astype(np.float32, copy=False), compression="zlib")
    return path


# --- overlay -------------------------------------------------------------------------------------


def overlay_factor(shape: tuple[int, int], max_side: int = OVERLAY_MAX_SIDE) -> int:
    """Integer block size f so that ceil(side / f) <= max_side for both sides."""
    return max(1, math.ceil(max(shape) / max_side))


def _band_rows(width: int, factor: int = 1) -> int:
    """Rows per band (a multiple of ``factor``) so one band holds about BAND_PIXELS pixels."""
    return max(1, BAND_PIXELS // max(width, 1) // factor) * factor


def block_mean(rows: Rows, shape: tuple[int, int], factor: int, *,
               dtype: type = np.float32) -> np.ndarray:
    """Mean over f x f blocks of an [H, W] image given by row bands: [ceil(H/f), ceil(W/f)] of
    ``dtype`` (rounded for integer types); partial blocks at the far borders average their real
    pixels."""
    h, w = shape
    oh, ow = -(-h // factor), -(-w // factor)
    out = np.empty((oh, ow), dtype)
    step = _band_rows(w, factor)
    col_count = np.full(ow, factor, np.float32)
    col_count[-1] = w - (ow - 1) * factor
    for y0 in range(0, h, step):
        y1 = min(y0 + step, h)
        band = np.asarray(rows(y0, y1), dtype=np.float32)  # (y1 - y0, W)
        n = -(-(y1 - y0) // factor)
        if factor > 1:
            padded = np.zeros((n * factor, ow * factor), np.float32)
            padded[:y1 - y0, :w] = band
            band = padded.reshape(n, factor, ow, factor).sum(axis=(1, 3))  # (n, ow) sums
            row_count = np.full(n, factor, np.float32)
            row_count[-1] = (y1 - y0) - (n - 1) * factor
            band /= np.outer(row_count, col_count)
        if np.issubdtype(dtype, np.integer):
            band = np.rint(band)
        out[y0 // factor:y0 // factor + n] = band
    return out


def overlay(
    mask8: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    background: Rows | None = None,
    max_side: int = OVERLAY_MAX_SIDE,
) -> np.ndarray:
    """BGR uint8 picture [h, w, 3] (at most ``max_side`` long): the background (contrast
    stretched inside ``valid``, dimmed outside it), predicted ink (``mask8`` > 0) tinted red in
    proportion to its share of each block, and the outline of ``labels`` in cyan.

    Memory: a few bytes per picture pixel (at most ``max_side`` squared) plus one band."""
    shape = mask8.shape
    f = overlay_factor(shape, max_side)
    ink = block_mean(lambda a, b: mask8[a:b], shape, f, dtype=np.uint8)  # (h, w) 255 * share
    h, w = ink.shape
    inside = None
    if valid is not None:
        inside = block_mean(lambda a, b: valid[a:b] * np.uint8(255), shape, f,
                            dtype=np.uint8) >= 128  # (h, w)
    outline = None
    if labels is not None:
        truth = (block_mean(lambda a, b: labels[a:b] * np.uint8(255), shape, f,
                            dtype=np.uint8) >= 128).astype(np.uint8)  # (h, w)
        grad = cv2.morphologyEx(truth, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
        outline = (grad > 0) & (truth == 0)  # outer outline: the ink itself stays visible
        del truth, grad
    grey = (block_mean(background, shape, f) if background is not None
            else np.zeros((h, w), np.float32))  # (h, w)
    lo, hi = _percentiles(grey, inside)
    scale = np.float32(255.0 / max(hi - lo, 1e-6))
    pic = np.empty((h, w, 3), np.uint8)
    for r0 in range(0, h, _band_rows(w)):
        r1 = min(r0 + _band_rows(w), h)
        g = np.clip((grey[r0:r1] - np.float32(lo)) * scale, 0, 255)  # (n, w)
        if inside is not None:
            g[~inside[r0:r1]] *= 0.35
        a = ink[r0:r1, :, None] * np.float32(0.65 / 255)  # (n, w, 1)
        band = (1 - a) * g[..., None] + a * INK_BGR  # (n, w, 3)
        pic[r0:r1] = np.clip(np.rint(band), 0, 255)
        if outline is not None:
            pic[r0:r1][outline[r0:r1]] = TRUTH_BGR
    return pic


def _percentiles(img: np.ndarray, inside: np.ndarray | None) -> tuple[float, float]:
    """1st and 99th percentile of ``img`` inside the mask, from at most ~1M samples."""
    step = max(1, int(math.sqrt(img.size / BAND_PIXELS)))
    sample = img[::step, ::step]
    if inside is not None and inside[::step, ::step].any():
        sample = sample[inside[::step, ::step]]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, [1, 99])
    return float(lo), float(hi)
