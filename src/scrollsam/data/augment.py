"""Training augmentations that move image, label and valid map together.

Spatial augmentations (flips, 90 degree rotations) act on all three arrays [C, S, S] / [1, S, S]
with axis order (channel, y, x); pixel augmentations (brightness, contrast, noise) act on the
image only and keep pixels outside the valid map at 0 and values in [-CLIP, CLIP]. Depth shifts
are drawn by the slice views themselves (``depth_shift``, triplet / every draws).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scrollsam.data.views import CLIP
from scrollsam.errors import InputError


@dataclass(frozen=True)
class Augment:
    """Which augmentations to apply. ``pixel=False`` switches brightness / contrast / noise off.

    ``brightness``: half-width of a uniform additive shift, in normalised units (std).
    ``contrast``: half-width of a uniform scale factor around 1. ``noise``: Gaussian std.
    """

    flips: bool = True
    rot90: bool = True
    pixel: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    noise: float = 0.05

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "noise"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"augment.{name}: expected a number in [0, 1], got {value}")


NO_AUGMENT = Augment(flips=False, rot90=False, pixel=False)


def augment_sample(
    image: np.ndarray, label: np.ndarray, valid: np.ndarray, *, rng: np.random.Generator,
    augment: Augment,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Augmented copies of image [C, S, S], label [1, S, S] and valid [1, S, S] (contiguous)."""
    if augment.rot90:
        k = int(rng.integers(0, 4))
        image, label, valid = (np.rot90(a, k, axes=(1, 2)) for a in (image, label, valid))
    if augment.flips:
        for axis in (1, 2):  # y, x
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
