"""Training tiles from the loader: the augmentation as it was (numpy) against ours.

- ``train_tiles_xray_256`` / ``train_tiles_xray_1024``: ``TileDataset`` items of the
  recommended x-ray view (``configs/xray_depth.yaml``: 26 slices, depth jitter 3, each pixel's
  band standardised) with every augmentation on (turns, flips, brightness / contrast / noise),
  from a synthetic 2048 x 2048 x 65 fragment through the page cache, one process. One call
  reads 16 tiles at 256 px or 2 at 1024 px. Baseline: ``augment_sample`` as it was written
  before (numpy's float32 normals, numpy's copy of a quarter-turned band, a new array per
  operation); ours: :func:`scrollsam.data.augment.augment_sample` now. The view's work is the
  same on both sides. A GPU at 880 images/s (vit_b, 256 px) needs that many tiles a second
  from the loader's workers together.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from common import compare, needs_modules, register, synthetic_fragment

from scrollsam.data.augment import Augment
from scrollsam.data.views import CLIP

XRAY = ["data.input=slices", "data.strategy=range", "data.z_start=20", "data.z_end=46",
        "data.view={depth_shift: 3, align: sheet, profile: true}"]


def numpy_augment(image: np.ndarray, label: np.ndarray, valid: np.ndarray, *,
                  rng: np.random.Generator, augment: Augment,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The augmentation before: the same draws, numpy's normals and plain copies."""
    if augment.rot90:
        k = int(rng.integers(0, 4))
        image, label, valid = (np.rot90(a, k, axes=(1, 2)) for a in (image, label, valid))
    if augment.flips:
        for axis in (1, 2):
            if rng.random() < 0.5:
                image, label, valid = (np.flip(a, axis=axis) for a in (image, label, valid))
    image = np.ascontiguousarray(image, dtype=np.float32)
    if augment.pixel:
        scale = 1.0 + rng.uniform(-augment.contrast, augment.contrast)
        shift = rng.uniform(-augment.brightness, augment.brightness)
        noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(augment.noise)
        image = (image * np.float32(scale) + np.float32(shift) + noise) * (valid > 0)
        image = np.clip(image, -CLIP, CLIP).astype(np.float32)
    return image, np.ascontiguousarray(label), np.ascontiguousarray(valid)


def _tiles(size: int, count: int, quick: bool) -> dict[str, Any]:
    import scrollsam.data.dataset as dataset
    from scrollsam.config import load_config
    from scrollsam.data.fragment import Fragment
    from scrollsam.data.views import view_from_config

    fragment = Fragment(synthetic_fragment(2048, 2048, 65))
    cfg = load_config(None, XRAY)
    view = view_from_config(cfg.data, cache_dir=None)
    train, _ = dataset.make_datasets([fragment], view, size=size, valid_band=(0.9, 1.0),
                                     samples_per_epoch=100_000)
    ours_fn = dataset.augment_sample
    start = [0]

    def read(fn) -> None:
        dataset.augment_sample = fn
        try:
            for i in range(count):
                train[start[0] + i]  # the next tiles of one sequence: fresh pages each call
            start[0] += count
        finally:
            dataset.augment_sample = ours_fn

    result = compare(lambda: read(numpy_augment), lambda: read(ours_fn),
                     repeats=2 if quick else 5)
    fragment.close()
    result["metrics"] = {"tiles_per_s_baseline": round(count / result["baseline_s"], 1),
                         "tiles_per_s_ours": round(count / result["ours_s"], 1)}
    result["settings"] = {"fragment": "2048x2048x65 uint16", "view": "slices/range 20..46, "
                          "profile, depth_shift 3", "tile": size, "tiles_per_call": count,
                          "augment": "turns, flips, brightness / contrast / noise",
                          "processes": 1}
    return result


@register("train_tiles_xray_256", goal=None,
          about="x-ray training tiles (26 slices, 256 px, all augmentations): numpy vs ours",
          needs=needs_modules("scrollsam.data.dataset"))
def train_tiles_xray_256(quick: bool) -> dict[str, Any]:
    return _tiles(256, 16, quick)


@register("train_tiles_xray_1024", goal=None,
          about="x-ray training tiles (26 slices, 1024 px, all augmentations): numpy vs ours",
          needs=needs_modules("scrollsam.data.dataset"))
def train_tiles_xray_1024(quick: bool) -> dict[str, Any]:
    return _tiles(1024, 2, quick)
