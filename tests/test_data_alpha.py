"""Masks and labels whose shape is their alpha channel (white, transparent outside): QA found
them read as all inside (mask 100% of the image, training and predict over empty space)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from scrollsam.data.fragment import Fragment
from scrollsam.data.synthetic import write_fragment
from scrollsam.io import read_image


def _shape_as_alpha(inside: np.ndarray, mode: str) -> Image.Image:
    alpha = np.where(inside, 255, 0).astype(np.uint8)
    white = np.full(inside.shape, 255, np.uint8)
    if mode == "LA":
        return Image.fromarray(np.stack([white, alpha], -1), "LA")
    return Image.fromarray(np.stack([white, white, white, alpha], -1), "RGBA")


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_mask_drawn_as_alpha_reads_as_its_shape(tmp_path, mode):
    frag = write_fragment(tmp_path / "f", height=32, width=48, depth=2, seed=0)
    inside = np.zeros((32, 48), bool)
    inside[4:20, 10:40] = True
    _shape_as_alpha(inside, mode).save(frag / "mask.png")
    assert np.array_equal(Fragment(frag).mask(), inside)  # was all True
    assert np.array_equal(read_image(frag / "mask.png") != 0, inside)  # evaluate's reader


def test_opaque_alpha_changes_nothing(tmp_path):
    frag = write_fragment(tmp_path / "f", height=32, width=48, depth=2, seed=0)
    before = Fragment(frag).mask()
    grey = np.where(before, 255, 0).astype(np.uint8)
    Image.fromarray(np.stack([grey, grey, grey, np.full_like(grey, 255)], -1),
                    "RGBA").save(frag / "mask.png")
    assert np.array_equal(Fragment(frag).mask(), before)
